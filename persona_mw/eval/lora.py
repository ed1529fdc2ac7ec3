"""``persona-mw eval lora``: do per-node LoRA adapters (and BiPO vectors) make the local model prefer
the user's answers on held-out queries?

The protocol of ``eval fermi`` (``persona_mw.eval.fermi``): the same split of the DSP queries
(observation pool 60% / test pool 40%, fixed seeds), the same simulated users (one per each of the
first four response domains) observing the same ``--history`` choices (the same random draws), and
the same held-out scoring (mean per-token log-likelihood of each of the five answers on their first
32 tokens; ``pairwise`` / ``pairwise_pmi`` / ``top1`` / ``margin`` at ``H<history>``).

Methods: ``none`` (base model), ``lora`` (the user's own adapter, trained by the ``lora`` plugin's
job on their choices), ``lora_group@0`` / ``lora_group@5`` (a new user in a group whose ``--members``
members made ``history`` choices each of the same domain, with 0 / 5 own choices: the request's
scope mixes the group's adapter with the user's by the graph's weights, as the plugin serves it),
with ``residual=True`` (``--residual``) also ``lora_member`` (a member of that group with the user's
``history`` choices, joined after the group's adapter was trained, whose adapter is trained with the
plugin's ``residual: true`` over the group's: served, the group's adapter plus the graph's share of the
member's residual),
``caa`` (the vectors plugin's mean difference at its default layer and strength) and ``bipo``
(a BiPO vector at the same layer, trained with the same loop, multiplier 1). ``persona`` and
``optimized`` are FERMI's prompts: they come from ``eval fermi`` (same users and splits; its JSON,
given as ``--fermi FILE`` and refused unless its seed, history and test queries are this run's);
this command does not re-run FERMI's optimizer. ``ppl_ratio@H:<method>``: perplexity of the
method's greedy answers to the first ``--ppl-queries`` held-out queries under the base model,
divided by that of the base model's own answers (a fluency guard; 1.0 for none).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from persona_mw.errors import PersonaError
from persona_mw.eval.dsp import load
from persona_mw.eval.fermi import HELD_OUT_TOKENS
from persona_mw.nodes import group_node, user_node

LORA = {"use": "lora", "background": False, "every": 10**9, "node_kinds": ["user", "group"]}


def _splits(items: list[dict[str, Any]], seed: int, history: int, test: int, test_frac: float = 0.4) -> Any:
    """``eval fermi``'s split and generator (the same calls in the same order)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(items))
    ntest = min(len(items) - 1, max(1, int(round(len(items) * test_frac))))
    return perm[:ntest][:test], perm[ntest:], np.random.default_rng(seed * 1000 + history)


def _choices(user: str, items: list[dict[str, Any]], seen: Any, domains: list[str], own: str,
             r: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for q in seen:
        others = [items[q]["responses"][d] for d in domains if d != own]
        out.append({"kind": "choice", "user": user, "prompt": items[q]["query"], "chosen": items[q]["responses"][own],
                    "rejected": [others[j] for j in r.permutation(len(others))]})
    return out


def run(data: str | Path, *, history: int = 20, test: int = 24, seed: int = 0, members: int = 2,
        ppl_queries: int = 6, users: int = 4, log: Any = None, residual: bool = False) -> dict[str, float]:
    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.config import parse_config
    from persona_mw.middleware import Middleware

    t_start, cpu_start, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    say = log or (lambda m: None)
    items = load(data)
    domains = [d for d in items[0]["responses"] if all(d in it["responses"] for it in items)]
    if len(domains) < 2 or history < 5 or test < 1:
        raise PersonaError("need two shared response domains, --history >= 5 and --test >= 1")
    udom = domains[:max(1, min(4, users))]  # the first users of eval fermi (the same draws)
    test_q, obs, r = _splits(items, seed, history, test)
    gr = np.random.default_rng(seed * 1000 + history + 7)  # group members: their own draws
    backend = TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=32, threads=1)
    sums: dict[str, list[float]] = {}
    train_s: list[float] = []
    train_cpu: list[float] = []
    with tempfile.TemporaryDirectory(prefix="persona-mw-eval-lora-") as tmp:
        cfg = parse_config(json.dumps({"pipeline": [LORA]}), "<eval lora>")
        cfg.store.path = str(Path(tmp) / "eval.db")
        cfg.trace.store = False
        mw = Middleware(cfg, backend=backend, autoload=False)
        try:
            plugin = mw.plugin("lora")
            for di, dom in enumerate(udom):
                t0 = time.perf_counter()
                u = f"d{di}-u0"
                mine = _choices(u, items, r.choice(obs, size=min(history, len(obs)), replace=False), domains, dom, r)
                group = f"g{di}"
                for mi in range(members):
                    m = f"d{di}-m{mi}"
                    mw.join(m, group)
                    for ev in _choices(m, items, gr.choice(obs, size=min(history, len(obs)), replace=False),
                                       domains, dom, gr):
                        mw.feedback(ev)
                new0, new5 = f"d{di}-new0", f"d{di}-new5"
                mw.join(new0, group)
                mw.join(new5, group)
                for ev in mine:
                    mw.feedback(ev)
                for ev in mine[:5]:
                    mw.feedback({**ev, "user": new5})
                for node in (user_node(u), group_node(group), user_node(new5)):
                    c0 = time.process_time()
                    entry = asyncio.run(plugin.train_node(node, seed=seed)) or {}
                    st = entry.get("stats", {})
                    if node == user_node(u):
                        train_s.append(st.get("total_seconds", 0.0))
                        train_cpu.append(time.process_time() - c0)
                    say(f"  trained {node}: {st}")
                hooks = {"none": None, "lora": _scope_hook(mw, plugin, u), "lora_group@0": _scope_hook(mw, plugin, new0),
                         "lora_group@5": _scope_hook(mw, plugin, new5)}
                if residual:
                    hooks["lora_member"] = _member_hook(mw, plugin, f"d{di}-member", group, mine, seed, say)
                hooks.update(_vector_hooks(backend, [(e["prompt"], e["chosen"], rj) for e in mine for rj in e["rejected"]],
                                           seed, say))
                _score(backend, items, test_q, domains, domains.index(dom), hooks, history, sums)
                _ppl(backend, items, test_q[:ppl_queries], hooks, history, sums)
                say(f"{u} ({dom}): held-out pairwise raw/raise " + ", ".join(
                    f"{k}={sums[f'pairwise@H{history}:{k}'][-1]:.3f}/{sums[f'pairwise_pmi@H{history}:{k}'][-1]:.3f}"
                    for k in hooks) + f" ({time.perf_counter() - t0:.0f} s)")
        finally:
            mw.close()
    metrics = {k: float(np.mean(v)) for k, v in sums.items()}
    metrics["train_seconds_median"] = float(np.median(train_s))
    metrics["train_cpu_seconds_median"] = float(np.median(train_cpu))
    metrics["seconds"] = time.perf_counter() - t_start
    metrics["cpu_seconds"] = time.process_time() - cpu_start
    metrics["load_before"], metrics["load_after"] = load0, os.getloadavg()[0]
    return metrics


FERMI_METHODS = ("persona", "optimized")


def fermi_methods(path: str | Path, *, history: int, test: int, seed: int) -> dict[str, float]:
    """``persona`` / ``optimized`` from an ``eval fermi`` result of the same protocol (seed, history,
    test queries), with its ``none`` as ``fermi_none@H<history>`` (it must equal this run's ``none``)."""
    from persona_mw.eval.common import read_json

    res = read_json(Path(path))  # a clear error names the file
    cfg = res.get("config") if isinstance(res, dict) else None
    if not isinstance(cfg, dict) or res.get("benchmark") != "fermi" or not isinstance(res.get("metrics"), dict):
        raise PersonaError(f"--fermi: {str(path)!r} is not an `eval fermi` result (--out of `persona-mw eval fermi`)")
    want = {"seed": seed, "history": history, "test_queries": test}
    got = {k: cfg.get(k) for k in want}
    if got != want:
        raise PersonaError(f"--fermi: {str(path)!r} was run with {got}, this run is {want}: "
                           "the methods compare only on the same users, splits and queries")
    tag = f"@H{history}:"
    out = {k: float(v) for k, v in res["metrics"].items()
           if tag in k and k.split(tag)[1] in FERMI_METHODS and isinstance(v, (int, float))}
    if not out:
        raise PersonaError(f"--fermi: {str(path)!r} has no persona/optimized figures at H{history}")
    if isinstance(res["metrics"].get(f"pairwise{tag}none"), (int, float)):
        out[f"fermi_none{tag[:-1]}"] = float(res["metrics"][f"pairwise{tag}none"])
    return out


def _member_hook(mw: Any, plugin: Any, member: str, group: str, mine: list[dict[str, Any]], seed: int,
                 say: Any) -> Any:
    """``lora_member``: ``member`` joins ``group`` (whose adapter is already trained and stays as it is),
    makes the user's choices, and gets an adapter trained with ``residual: true``; the hook serves their scope."""
    mw.join(member, group)
    for ev in mine:
        mw.feedback({**ev, "user": member})
    was = plugin.config
    plugin.config = was.model_copy(update={"residual": True})
    try:
        entry = asyncio.run(plugin.train_node(user_node(member), seed=seed)) or {}
    finally:
        plugin.config = was
    if not entry.get("base"):
        raise PersonaError(f"eval lora --residual: {member}'s adapter was not trained over the group's")
    say(f"  trained {user_node(member)} over {entry['base']}: {entry.get('stats', {})}")
    return _scope_hook(mw, plugin, member)


def _scope_hook(mw: Any, plugin: Any, user: str) -> Any:
    """The activation hook the plugin would serve for ``user``'s request (None: no adapter)."""
    from persona_mw.plugins._lora import adapter_hook
    from persona_mw.types import ChatRequest, Message, Turn

    req = ChatRequest(user=user, messages=[Message(role="user", content="hi")])
    scope, profiles = mw.graph.resolve(req)
    turn = Turn(request=req, scope=scope, profiles=profiles)
    adapter, _used, _notes = plugin.scope_adapter(turn, mw.backend.model_name)
    return None if adapter is None else adapter_hook(adapter)


def _vector_hooks(backend: Any, pairs: list[tuple[str, str, str]], seed: int, say: Any) -> dict[str, Any]:
    from persona_mw.plugins import _lora
    from persona_mw.plugins._steering import chat_texts
    from persona_mw.plugins.vectors import SteeringVectors, add_vector_hook, default_layer, pair_differences

    layer = default_layer(backend.model)
    diffs = asyncio.run(backend.call(lambda m, t: pair_differences(m, t, backend, pairs, layer)))
    caa = add_vector_hook(layer, diffs.mean(dim=0).tolist(), SteeringVectors.Config().strength)
    s = _lora.TrainSettings(seed=seed, lr=SteeringVectors.Config().bipo_lr, steps=SteeringVectors.Config().bipo_steps,
                            seconds=SteeringVectors.Config().bipo_seconds)

    def fmt(p: str) -> str:
        return str(chat_texts(backend, p, [])[0])

    vec, st = asyncio.run(backend.call(lambda m, t: _lora.train_bipo(m, t, fmt, pairs, layer, s)))
    say(f"  bipo: {st}")
    return {"caa": caa, "bipo": add_vector_hook(layer, vec, 1.0)}


def _with(backend: Any, hook: Any, fn: Any) -> Any:
    def work(m: Any, t: Any) -> Any:
        handles = hook(m) if hook is not None else []
        try:
            return fn(m, t)
        finally:
            for h in handles if isinstance(handles, (list, tuple)) else [handles]:
                h.remove()

    return asyncio.run(backend.call(work))


def _score(backend: Any, items: list[dict[str, Any]], test_q: Any, domains: list[str], truth: int,
           hooks: dict[str, Any], history: int, sums: dict[str, list[float]]) -> None:
    """``eval fermi``'s held-out numbers, each method's hook installed while scoring."""
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.types import Message

    ctx = [backend.format_prompt([Message(role="user", content=items[q]["query"])]) for q in test_q]
    resps = [[items[q]["responses"][d] for d in domains] for q in test_q]
    base = None
    for label, hook in hooks.items():
        lps = np.asarray(_with(backend, hook, lambda m, t: response_logprobs(
            m, t, ctx, resps, max_response_tokens=HELD_OUT_TOKENS)))
        own, others = lps[:, truth][:, None], np.delete(lps, truth, axis=1)
        base = lps if base is None else base
        lift = lps - base
        d_own, d_oth = lift[:, truth][:, None], np.delete(lift, truth, axis=1)
        sums.setdefault(f"pairwise@H{history}:{label}", []).append(float((others < own).mean()))
        sums.setdefault(f"pairwise_pmi@H{history}:{label}", []).append(
            float(((d_oth < d_own) + 0.5 * (d_oth == d_own)).mean()))
        sums.setdefault(f"top1@H{history}:{label}", []).append(float((others < own).all(1).mean()))
        sums.setdefault(f"margin@H{history}:{label}", []).append(float((own - others).mean()))


def _ppl(backend: Any, items: list[dict[str, Any]], qs: Any, hooks: dict[str, Any], history: int,
         sums: dict[str, list[float]]) -> None:
    """Perplexity under the base model of each method's greedy answers, as a ratio to none's."""
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.types import Decoding, GenerationParams, Message

    if len(qs) == 0:
        return
    msgs = [[Message(role="user", content=items[q]["query"])] for q in qs]
    ctx = [backend.format_prompt(m) for m in msgs]
    ppl: dict[str, float] = {}
    for label, hook in hooks.items():
        dec = [Decoding(source=label, activation_hooks=[hook])] if hook is not None else []
        cands = asyncio.run(backend.generate_batch(msgs, params=GenerationParams(max_tokens=32), decoding=dec))
        answers = [c.text or "." for c in sorted(cands, key=lambda c: c.index)]
        lps = asyncio.run(backend.call(lambda m, t, a=answers: response_logprobs(
            m, t, ctx, [[x] for x in a], max_response_tokens=32)))
        ppl[label] = math.exp(-float(np.mean([row[0] for row in lps])))
        sums.setdefault(f"ppl_ratio@H{history}:{label}", []).append(ppl[label] / ppl["none"])


def config(history: int = 20, test: int = 24, seed: int = 0, members: int = 2, ppl_queries: int = 6,
           residual: bool = False) -> dict[str, Any]:
    from persona_mw.plugins.lora import LoraAdapters

    effective = LoraAdapters.Config.model_validate({k: v for k, v in LORA.items() if k != "use"}).model_dump()
    return {"pipeline": [LORA], "lora": effective, "history": history, "test_queries": test,
            "users_per_domain": 1, "group_members": members, "held_out_tokens": HELD_OUT_TOKENS,
            "ppl_queries": ppl_queries, "seed": seed, "test_frac": 0.4, "model": "smollm2-135m-instruct",
            **({"lora_member": "residual: true over the group's adapter"} if residual else {})}


__all__ = ["config", "run"]
