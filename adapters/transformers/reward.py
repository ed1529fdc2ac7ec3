"""Reward-guided decoding (ARGS): a token reward on the policy's own hidden states, one batched
forward per token. Runs on the torch thread with the backend's lock held."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persona_mw.errors import BackendError
from persona_mw.types import Candidate, Decoding

from .decoding import _apply
from .steering import LoopLimits, OnToken, Requests, forward_last, loop_limits, mark_done, new_cache

if TYPE_CHECKING:
    from .backend import TransformersBackend


def _top_k(b: TransformersBackend, rewarders: list[Decoding]) -> int:
    """The candidates scored per step: the rewarders' ``reward_top_k`` (one value per batch)."""
    vocab = b._model.config.vocab_size
    k = int(min(rewarders[0].reward_top_k, vocab))
    if any(min(rd.reward_top_k, vocab) != k for rd in rewarders):
        raise BackendError("reward-guided requests in one batch must use the same top-k")
    return k


def _rewards(rewarders: list[Decoding], hid: Any, groups: int, k: int) -> Any:
    """Each group's ``k`` candidates' rewards ``[groups, k]`` from their hidden states ``[groups, k, d]``."""
    import torch

    if all(rd.token_reward is rewarders[0].token_reward for rd in rewarders):
        reward_fn = rewarders[0].token_reward
        assert reward_fn is not None
        return torch.as_tensor(reward_fn(hid.reshape(groups * k, -1)), dtype=torch.float32).reshape(groups, k)
    return torch.stack([torch.as_tensor(rd.token_reward(hid[g]), dtype=torch.float32).reshape(k)
                        for g, rd in enumerate(rewarders)])


def _reward_loop(b: TransformersBackend, enc: Any, rewarders: list[Decoding], procs: list[list[Any]],
                 s: dict[str, Any], lim: LoopLimits, use_cache: bool, on_token: OnToken | None) -> Any:
    """Decode every group with reward-guided search; returns the generated ids ``[groups, T]``."""
    import torch

    ids, mask = enc["input_ids"], enc["attention_mask"]
    groups = ids.shape[0]
    k = _top_k(b, rewarders)
    w = torch.tensor([[float(rd.reward_weight)] for rd in rewarders])
    if s["seed"] is not None:
        torch.manual_seed(s["seed"])
    cache: Any = new_cache(b) if use_cache else None
    gen = torch.empty((groups, 0), dtype=torch.long)
    done = torch.zeros(groups, dtype=torch.bool)
    rows_mask = mask.repeat_interleave(k, dim=0)
    arange = torch.arange(groups)
    with torch.inference_mode():
        logits = forward_last(b, ids, mask, cache)  # [G, V]
        if use_cache:
            cache.batch_repeat_interleave(k)
        for _ in range(lim.max_new):
            scores = logits
            if any(procs):
                cur = torch.cat([ids, gen], dim=1)
                scores = torch.cat([_apply(procs[g], cur[g : g + 1], scores[g : g + 1])
                                    for g in range(groups)], dim=0)
            top, cand = scores.topk(k, dim=-1)  # [G, k]
            rows_mask = torch.cat([rows_mask, torch.ones((groups * k, 1), dtype=rows_mask.dtype)], dim=1)
            if use_cache:
                step = cand.reshape(-1, 1)
            else:
                prefix = torch.cat([ids, gen], dim=1).repeat_interleave(k, dim=0)
                step = torch.cat([prefix, cand.reshape(-1, 1)], dim=1)
            cand_logits, hid = forward_last(b, step, rows_mask, cache, hidden=True)
            total = top + w * _rewards(rewarders, hid.view(groups, k, -1), groups, k)
            if s["sample"]:
                pick = torch.multinomial(torch.softmax(total / s["temperature"], dim=-1), 1)[:, 0]
            else:
                pick = total.argmax(dim=-1)
            token = cand[arange, pick]
            token = torch.where(done, torch.full_like(token, lim.pad), token)
            gen = torch.cat([gen, token[:, None]], dim=1)
            mark_done(b, token, done, gen, lim, on_token)
            if bool(done.all()):
                break
            chosen = arange * k + pick
            logits = cand_logits[chosen]
            if use_cache:
                cache.reorder_cache(chosen.repeat_interleave(k))
    return gen


def reward_guided(
    b: TransformersBackend,
    requests: Requests,
    n: int,
    s: dict[str, Any],
    use_cache: bool,
    on_token: OnToken | None,
) -> list[Candidate]:
    """ARGS with a reward on the policy's own hidden states, one batched forward per token.

    Each step the ``k`` top next tokens of every answer are fed as ``k`` rows sharing that
    answer's prefix cache; that one forward gives each candidate's hidden state (its reward)
    AND its next-token logits, so the chosen row's logits are the next step's and no further
    policy forward is needed. The cache is then reordered to ``k`` copies of the chosen row.
    """
    from .generation import candidates

    prompts = [b.format_prompt(m) for m, _ in requests for _ in range(n)]
    group_dec = [dec for _, dec in requests for _ in range(n)]
    rewarders = [next(d for d in dec if d.token_reward is not None) for dec in group_dec]
    procs = [[p for d in dec for p in d.logits_processors] for dec in group_dec]
    enc = b._encode(prompts)
    lim = loop_limits(b, s, enc["input_ids"].shape[1])
    gen = _reward_loop(b, enc, rewarders, procs, s, lim, use_cache, on_token)
    per_prompt = [int(x) for x in enc["attention_mask"].sum(dim=1).tolist()[::n]]
    cands = candidates(b, gen, 0, per_prompt, n, s, lim.max_new)
    k = _top_k(b, rewarders)
    for c in cands:
        c.meta["steered"] = [rewarders[c.index].source]
        c.meta["reward_top_k"] = k
    return cands
