"""``persona-mw eval fermi``: does FERMI's optimized prompt make the local model prefer the user's answers?

Recipe (fixed seeds; the DSP layout, as ``eval dsp``): the queries are split once into an
observation pool (60%) and a test pool (40%). Each of the first four response domains is one
simulated user (``--users`` per domain), who observes ``--history`` choices on queries of the
observation pool (their domain's response chosen over the other four), fed through
``Middleware.afeedback`` to a pipeline ``[persona, fermi]`` on the local transformers backend:
the ``persona`` plugin (PIPT-style, on the 20th choice) writes persona statements, which make the
*unoptimized persona prompt* (FERMI's initial candidate); the ``fermi`` plugin optimizes once the
history is complete (one job: deterministic proposals plus ``optimizer_calls`` proposals of the
135M model as optimizer) and keeps the best prompt by white-box margin on the observed choices.

Held out: ``--test`` queries of the test pool, never observed. For each user and query the five
responses are scored by the local model's mean per-token log-likelihood given the query with the
prompt placed as at request time. ``pairwise@H:<prompt>`` = share of the other four responses
scored below the user's own; ``top1@H`` = own response ranked first; ``margin@H`` = mean
log-likelihood difference. ``pairwise_pmi@H:<prompt>`` = the same comparison on how much the prompt
*raises* each response's log-likelihood over the same query without a prompt (the scorer the
issue names: "how much the prompt raises the likelihood of the chosen over the rejected"; Holtzman
et al. 2021's domain-conditional PMI); 0.5 for no prompt by definition. The raw pairwise is
dominated by how likely each domain's wording is to the model whatever the prompt (academy answers
are favoured, literature ones are not); the prompt-raise pairwise isolates what the prompt does.
Prompts compared: ``none`` (no prompt), ``persona`` (the unoptimized persona prompt), ``optimized``
(FERMI's retrieval of the memory prompt for each query, i.e. what ``persona_rewrite`` would use),
``best`` (the node's best prompt for every query, no retrieval). ``train_*`` give the same on the observed choices (in-sample).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from persona_mw.errors import PersonaError
from persona_mw.eval.dsp import load
from persona_mw.nodes import user_node

# Sized for about 20 minutes on 2 cores (the white-box scorer dominates): the job scores the first
# 16 tokens of every answer of a choice (the chosen one and all four rejected), one persona sentence
# per user; the fermi plugin's defaults otherwise, the built-in style library included. Held-out
# answers are scored on their first HELD_OUT_TOKENS tokens.
HELD_OUT_TOKENS = 32
SETTINGS: dict[str, Any] = {
    "fermi": {"background": False, "optimizer_calls": 1, "max_response_tokens": 16, "max_rejected": 4,
              "max_examples": 32, "job_seconds": None, "optimizer_timeout": 900.0, "optimizer_max_tokens": 48},
    "persona": {"background": False, "every": 20, "max_tokens": 40},
}


def _fermi_pipeline(history: int) -> list[dict[str, Any]]:
    return [{"use": "persona", **SETTINGS["persona"]},
            {"use": "fermi", **SETTINGS["fermi"], "every": history}]


def run(data: str | Path, *, history: int = 20, test: int = 24, users_per_domain: int = 1, seed: int = 0,
        test_frac: float = 0.4, log: Any = None) -> dict[str, float]:
    from persona_mw.config import parse_config
    from persona_mw.middleware import Middleware
    t_start, cpu_start = time.perf_counter(), time.process_time()
    say = log or (lambda m: None)
    items = load(data)
    domains = [d for d in items[0]["responses"] if all(d in it["responses"] for it in items)]
    if len(domains) < 2:
        raise PersonaError("DSP items need at least two response domains in common")
    if history < 1 or test < 1:
        raise PersonaError("--history and --test must be at least 1")
    udom = domains[:4]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(items))
    ntest = min(len(items) - 1, max(1, int(round(len(items) * test_frac))))
    test_q, obs = perm[:ntest][:test], perm[ntest:]
    r = np.random.default_rng(seed * 1000 + history)
    users = [(f"d{di}-u{i}", di) for di in range(len(udom)) for i in range(users_per_domain)]
    from persona_mw.adapters.transformers import TransformersBackend

    # One torch thread: on a shared 2-core box two OpenMP threads wait on each other.
    backend = TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=64, threads=1)
    sums: dict[str, list[float]] = {}
    accepted = 0
    with tempfile.TemporaryDirectory(prefix="persona-mw-eval-fermi-") as tmp:
        cfg = parse_config(json.dumps({"pipeline": _fermi_pipeline(history)}), "<eval fermi>")
        cfg.store.path = str(Path(tmp) / "eval.db")
        cfg.trace.store = False
        mw = Middleware(cfg, backend=backend, autoload=False)
        try:
            plugin = mw.plugin("fermi")
            placement = plugin.config.placement
            for u, di in users:
                t0 = time.perf_counter()
                _observe(mw, u, items, r.choice(obs, size=min(history, len(obs)), replace=False), domains,
                         udom[di], r)
                prof = mw.store.get_profile(user_node(u))
                st = plugin.state_of(prof)
                hist = st.get("history", [{}])[-1]
                accepted += bool(hist.get("accepted"))
                persona = plugin.seed_prompt(prof)
                best = next((p for p in st.get("prompts", []) if p["id"] == st.get("best")), None)
                say(f"{u} ({udom[di]}): persona prompt {persona!r}; best {best and best['source']} "
                    f"{best and best['text']!r} (train score {best and round(best['score'], 3)}; "
                    f"z {hist.get('z')}; {hist.get('note', '')})")
                tried = sorted(hist.get("tried", []), key=lambda c: -c["score"])[:5]
                say("  top candidates in-sample: " + ", ".join(f"{c['source']} {c['score']:+.3f}" for c in tried))
                _train_numbers(st, persona, best, history, sums)
                # Held-out: which prompt each query gets.
                prompts = {"none": ["" for _ in test_q], "persona": [persona for _ in test_q],
                           "optimized": [(plugin.pick(prof, items[q]["query"])[0] or {}).get("text", "") for q in test_q],
                           "best": [(best or {}).get("text", "") for _ in test_q]}
                _held_out(backend, items, test_q, domains, domains.index(udom[di]), prompts, placement, history, sums)
                say(f"  {u}: held-out pairwise (raw / prompt-raise) " + ", ".join(
                    f"{k}={sums[f'pairwise@H{history}:{k}'][-1]:.3f}/{sums[f'pairwise_pmi@H{history}:{k}'][-1]:.3f}"
                    for k in prompts)
                    + f" ({time.perf_counter() - t0:.0f} s)")
        finally:
            mw.close()
    metrics = {k: float(np.mean(v)) for k, v in sums.items()}
    metrics[f"accepted@H{history}"] = accepted / len(users)
    metrics["seconds"] = time.perf_counter() - t_start
    metrics["cpu_seconds"] = time.process_time() - cpu_start
    return metrics


def _observe(mw: Any, user: str, items: list[dict[str, Any]], seen: Any, domains: list[str], own: str,
             r: np.random.Generator) -> None:
    """Record ``user``'s choices on the ``seen`` items: its domain's answer over the others (shuffled by ``r``)."""
    for q in seen:
        others = [items[q]["responses"][d] for d in domains if d != own]
        mw.feedback({"kind": "choice", "user": user, "prompt": items[q]["query"],
                     "chosen": items[q]["responses"][own],
                     "rejected": [others[j] for j in r.permutation(len(others))]})


def _train_numbers(st: dict[str, Any], persona: str, best: dict[str, Any] | None, history: int,
                   sums: dict[str, list[float]]) -> None:
    """Training (in-sample) numbers of the persona and the best prompt: from the memory, or from the
    job's per-choice cache when the persona prompt fell out of the memory (else the means would cover
    different users)."""
    from persona_mw.plugins.fermi import cache_key

    for label, text in (("persona", persona), ("best", (best or {}).get("text"))):
        entry = next((p for p in st.get("prompts", []) if p.get("text") == text and "score" in p), None)
        per = st.get("cache", {}).get(cache_key(text or ""))
        acc_m = (entry["acc"], entry["score"]) if entry else (
            (float(np.mean([v[1] for v in per.values()])), float(np.mean([v[0] for v in per.values()])))
            if per else None)
        if acc_m is not None:
            sums.setdefault(f"train_pairwise@H{history}:{label}", []).append(acc_m[0])
            sums.setdefault(f"train_margin@H{history}:{label}", []).append(acc_m[1])


def _held_out(backend: Any, items: list[dict[str, Any]], test_q: Any, domains: list[str], truth: int,
              prompts: dict[str, list[str]], placement: Any, history: int, sums: dict[str, list[float]]) -> None:
    """Score the held-out queries under each labelled prompt list: pairwise, prompt-raise, top-1, margin."""
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.plugins.fermi import place

    base = None
    for label, texts in prompts.items():
        ctx = [backend.format_prompt(place([_user(items[q]["query"])], t, placement))
               for q, t in zip(test_q, texts)]
        resps = [[items[q]["responses"][d] for d in domains] for q in test_q]
        lps = np.asarray(asyncio.run(backend.call(lambda m, tk, c=ctx, rs=resps: response_logprobs(
            m, tk, c, rs, max_response_tokens=HELD_OUT_TOKENS))))
        own = lps[:, truth][:, None]
        others = np.delete(lps, truth, axis=1)
        sums.setdefault(f"pairwise@H{history}:{label}", []).append(float((others < own).mean()))
        # Prompt-raise (PMI) pairwise: did the prompt raise the user's answer more than each
        # other answer, against the same query with no prompt? 0.5 for no prompt, by definition.
        base = lps if base is None else base
        lift = lps - base
        d_own, d_oth = lift[:, truth][:, None], np.delete(lift, truth, axis=1)
        sums.setdefault(f"pairwise_pmi@H{history}:{label}", []).append(
            float(((d_oth < d_own) + 0.5 * (d_oth == d_own)).mean()))
        sums.setdefault(f"top1@H{history}:{label}", []).append(float((others < own).all(1).mean()))
        sums.setdefault(f"margin@H{history}:{label}", []).append(float((own - others).mean()))


def _user(text: str) -> Any:
    from persona_mw.types import Message

    return Message(role="user", content=text)


def config(history: int = 20, test: int = 24, seed: int = 0) -> dict[str, Any]:
    return {"pipeline": _fermi_pipeline(history), "history": history, "test_queries": test, "users_per_domain": 1,
            "held_out_tokens": HELD_OUT_TOKENS,
            "seed": seed, "test_frac": 0.4, "model": "smollm2-135m-instruct"}


__all__ = ["SETTINGS", "config", "run"]
