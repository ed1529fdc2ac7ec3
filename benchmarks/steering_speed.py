"""Throughput of white-box steering on the local backend, batch 1, in ONE run (ratios matter).

Methods, each decoding the same prompt (a user preference as a system message) for exactly
``--tokens`` new tokens (eos is banned so lengths match), greedy:

- ``plain``: the backend's ordinary path (the continuous batch with the lean decode step);
- ``contrast``: Linear Alignment, 2 streams (with / without the preference) in one batch;
- ``amulet``: the same 2 streams plus 60 Amulet iterations over the vocabulary per token;
- ``vectors``: a CAA steering vector added at one layer (a marked residual-add hook: the continuous
  batch adds it to the request's rows inside the lean step);
- ``args``: reward-guided decoding, top-k=10 candidates scored by a linear head on the policy's
  hidden state, one 10-row forward per token with the prefix KV cache.

Rounds are interleaved (plain, contrast, ..., plain, contrast, ...) so a shared machine's load
hits every method alike; the median tokens/s per method and the ratio to ``plain`` are reported.
Writes ``benchmarks/results/steering_speed.json``. Run:
``nice -n 5 .venv/bin/python benchmarks/steering_speed.py [--tokens 32] [--rounds 3]``. Not a test.
Goals (issue #6): contrast >= 0.6x plain, vectors >= 0.9x, args(k=10) >= 0.3x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "steering_speed.json"
PROMPT = "Explain how a refrigerator keeps food cold."
PREFERENCE = "The user's preferences:\n- Keep your answers short and concise."
GOALS = {"contrast": 0.6, "vectors": 0.9, "args": 0.3}


class BanTokens:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[:, self.ids] = float("-inf")
        return scores


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core box a 2-thread pool stalls on every busy core)")
    ap.add_argument("--dtype", default="int4", help="the backend's dtype for every method (int4: the fast setting)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import torch

    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.plugins.args import head_reward
    from persona_mw.plugins.contrast import amulet_combine, linear_combine
    from persona_mw.plugins.vectors import add_vector_hook, default_layer
    from persona_mw.types import Decoding, GenerationParams, Message

    backend = TransformersBackend(model=args.model, max_new_tokens=args.tokens, threads=args.threads,
                                 dtype=args.dtype)
    asyncio.run(backend.load())
    d = backend.model.config.hidden_size
    ban = BanTokens(sorted(backend._eos_ids()))
    with_pref = [Message(role="system", content=PREFERENCE), Message(role="user", content=PROMPT)]
    without = [Message(role="user", content=PROMPT)]
    g = torch.Generator().manual_seed(0)
    vec = (torch.randn(d, generator=g) * 0.05).tolist()
    theta = (torch.randn(d, generator=g) * 0.01).numpy()
    layer = default_layer(backend.model)
    methods: dict[str, tuple[list[Message], Decoding]] = {
        "plain": (with_pref, Decoding(source="plain", logits_processors=[ban])),
        "contrast": (with_pref, Decoding(source="contrast", streams=[without], combine=linear_combine(2.0, 0.8),
                                         logits_processors=[ban])),
        "amulet": (with_pref, Decoding(source="amulet", streams=[without], combine=amulet_combine(2.0),
                                       logits_processors=[ban])),
        "vectors": (with_pref, Decoding(source="vectors", activation_hooks=[add_vector_hook(layer, vec, 4.0)],
                                        logits_processors=[ban])),
        "args": (with_pref, Decoding(source="args", token_reward=head_reward(theta, 0.0), reward_top_k=10,
                                     reward_weight=1.0, logits_processors=[ban])),
    }
    params = GenerationParams(max_tokens=args.tokens, temperature=0.0)
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {m: [] for m in methods}
    # Warm-up (first-call allocations), untimed.
    for msgs, dec in methods.values():
        asyncio.run(backend.generate(msgs, params=params.model_copy(update={"max_tokens": 4}), decoding=[dec]))
    for r in range(args.rounds):
        for name, (msgs, dec) in methods.items():
            t = time.perf_counter()
            cand = asyncio.run(backend.generate(msgs, params=params, decoding=[dec]))[0]
            dt = time.perf_counter() - t
            rates[name].append(cand.tokens / dt)
            print(f"round {r} {name:<9} {cand.tokens} tokens {dt:6.2f} s  {cand.tokens / dt:6.2f} tok/s", flush=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    ratio = {m: med[m] / med["plain"] for m in med}
    result = {
        "benchmark": "steering_speed",
        "ratios": {"contrast": ratio["contrast"], "vectors": ratio["vectors"], "args_k10": ratio["args"]},
        "model": args.model,
        "dtype": backend.dtype,
        "new_tokens": args.tokens,
        "rounds": args.rounds,
        "tokens_per_second_median": med,
        "tokens_per_second_all": rates,
        "ratio_to_plain": ratio,
        "goals_ratio": GOALS,
        "goals_met": {m: ratio[m] >= g for m, g in GOALS.items()},
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_at_end": os.getloadavg()},
        "note": "a shared machine: compare ratios, not absolute tokens/s",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for m in methods:
        print(f"{m:<9} {med[m]:6.2f} tok/s  {ratio[m]:.2f}x plain"
              + (f"  (goal {GOALS[m]}x: {'met' if ratio[m] >= GOALS[m] else 'NOT met'})" if m in GOALS else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
