"""White-box scoring for the ``fermi`` plugin: how much a prompt favours chosen over rejected answers.

``response_logprobs(model, tokenizer, contexts, responses)`` returns, for every context (a fully
formatted prompt text) and each of its responses, the mean log-probability per token of the
response (its first ``max_response_tokens`` tokens) given the context. Work is batched and the
token prefix that every context shares (the chat template's system part and, with the prompt placed
before the query, the personalized prompt itself) is run once and its KV cache reused for
every row. Runs on the torch thread (call it through ``backend.call``).
"""

from __future__ import annotations

from typing import Any, Sequence


def _common_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence shares (at least one token is left to each)."""
    if not seqs:
        return 0
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for i in range(max(0, n)):
        if any(x[i] != first[i] for x in seqs):
            return i
    return max(0, n)


def _forward_params(model: Any) -> Any:
    import inspect

    return inspect.signature(model.forward).parameters


def _cache_kwarg(model: Any) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def response_logprobs(model: Any, tokenizer: Any, contexts: Sequence[str], responses: Sequence[Sequence[str]],
                      *, max_response_tokens: int = 32, batch_rows: int = 16,
                      reuse_prefix: bool = True) -> list[list[float]]:
    """Mean per-token log p(response | context) for each context's responses (length normalized)."""
    import torch

    full = [tokenizer.encode(ctx, add_special_tokens=False) or [tokenizer.eos_token_id] for ctx in contexts]
    shared = _common_len(full) if len(full) > 1 or reuse_prefix else 0
    p_ids = full[0][:shared] if shared and reuse_prefix else []
    rows: list[tuple[int, int, list[int], int]] = []  # (context idx, response idx, ids, n context tokens)
    for ci, resps in enumerate(responses):
        c_ids = full[ci][len(p_ids):]
        for ri, resp in enumerate(resps):
            r_ids = tokenizer.encode(resp, add_special_tokens=False)[:max_response_tokens] or [tokenizer.eos_token_id]
            rows.append((ci, ri, c_ids + r_ids, len(c_ids)))
    out: list[list[float]] = [[0.0] * len(r) for r in responses]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        cache = None
        if p_ids:
            res = model(torch.tensor([p_ids]), use_cache=True)
            cache = res["cache"] if "cache" in res else res["past_key_values"]
        # Rows of similar length together: less padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))
        for start in range(0, len(order), batch_rows):
            chunk = [rows[i] for i in order[start:start + batch_rows]]
            width = max(len(r[2]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), len(p_ids) + width), dtype=torch.long)
            mask[:, : len(p_ids)] = 1
            for b, (_, _, toks, _) in enumerate(chunk):
                ids[b, : len(toks)] = torch.tensor(toks)
                mask[b, len(p_ids): len(p_ids) + len(toks)] = 1
            kwargs: dict[str, Any] = {"attention_mask": mask}
            if cache is not None:
                # The prefix's cache, repeated for the chunk's rows; cut back to the prefix afterwards
                # (cheaper than a deep copy per chunk).
                cache.batch_repeat_interleave(len(chunk))
                kwargs[_cache_kwarg(model)] = cache
                kwargs["position_ids"] = torch.arange(len(p_ids), len(p_ids) + width).unsqueeze(0).expand(len(chunk), -1)
            try:
                logits = model(ids, use_cache=cache is not None, **kwargs).logits
            finally:
                if cache is not None:
                    extra = cache.get_seq_length() - len(p_ids)
                    if extra > 0:
                        cache.crop(-extra)
                    cache.batch_select_indices(torch.tensor([0]))
            logp = torch.log_softmax(logits.float(), dim=-1)
            for b, (ci, ri, toks, nctx) in enumerate(chunk):
                total = 0.0
                for pos in range(nctx, len(toks)):
                    total += float(logp[b, pos - 1, toks[pos]])
                out[ci][ri] = total / max(1, len(toks) - nctx)
    return out


__all__ = ["response_logprobs"]
