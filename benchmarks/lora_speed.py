"""Decoding speed with per-row LoRA adapters on the local backend, in ONE run (ratios matter).

Methods, each decoding the same 4 prompts as ONE batch for exactly ``--tokens`` new tokens (eos is
banned so lengths match), greedy, through ``TransformersBackend.generate_batch``:

- ``base``: no adapter (the ordinary ``model.generate`` path);
- ``mixed4``: 4 different adapters, one per row (``persona_mw.plugins._lora.row_hooks``: one
  batched matmul per adapted module, ranks zero-padded), the lora plugin's default shape
  (r = 4 on q_proj / v_proj of the top layers, 4 of 30); the adapters are random (speed does not depend
  on their values);
- ``merged1``: one adapter on every row (what a single request gets from the plugin);
- ``sched4``: the same 4 adapters as 4 concurrent requests, each carrying the ``lora`` plugin's marked
  hook (``adapter_hook``): they share the continuous batch, each adapter's deltas on its own rows,
  inside the lean decode step (against ``base``, which now also runs in the continuous batch).

``--dtype`` (default float32) is the backend's weights for every method.

Rounds are interleaved so a shared machine's load hits every method alike; the median tokens/s per
method and the ratio to ``base`` are reported with the load average before and after. Writes
``benchmarks/results/lora_speed.json``. Run:
``nice -n 5 .venv/bin/python benchmarks/lora_speed.py [--tokens 32] [--rounds 3]``. Not a test.
Goal (issue #18): mixed4 >= 0.7x base.

The training time of one adapter is ``benchmarks/lora_train.py``'s (``lora_train.json``).
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
RESULTS = ROOT / "benchmarks" / "results" / "lora_speed.json"
PROMPTS = ["Explain how a refrigerator keeps food cold.", "Why is the sky blue?",
           "What is a good way to learn a language?", "How do vaccines work?"]
GOAL = 0.7


def random_adapter(model: Any, seed: int) -> Any:
    import torch

    from persona_mw.plugins import _lora
    from persona_mw.plugins.lora import LoraAdapters

    cfg = LoraAdapters.Config()
    start = _lora.first_trained_layer(model, cfg.top_layers)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, lin in _lora.target_modules(model, cfg.targets).items():
        if _lora._layer_index(name) >= start:
            weights[name] = (torch.randn(cfg.r, lin.in_features, generator=g) * 0.01,
                             torch.randn(lin.out_features, cfg.r, generator=g) * 0.01)
    return _lora.Adapter(weights, r=cfg.r, alpha=cfg.alpha, targets=tuple(cfg.targets))


async def _concurrent(backend: Any, batch: list[Any], params: Any, decodings: list[Any]) -> list[Any]:
    """One request per prompt, all at once (they meet in the continuous batch); candidates indexed."""
    got = await asyncio.gather(*(backend.generate(m, params=params, decoding=d) for m, d in zip(batch, decodings)))
    out = []
    for i, cands in enumerate(got):
        for c in cands:
            c.index = i
            out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.plugins._lora import adapter_hook, row_hooks
    from persona_mw.plugins.lora import LoraAdapters
    from persona_mw.types import Decoding, GenerationParams, Message

    cfg = LoraAdapters.Config()
    backend = TransformersBackend(model="smollm2-135m-instruct", threads=args.threads, dtype=args.dtype)
    model = backend.model
    model.generation_config.suppress_tokens = None
    adapters = [random_adapter(model, i) for i in range(4)]
    batch = [[Message(role="user", content=p)] for p in PROMPTS]
    eos = sorted(backend._eos_ids())
    params = GenerationParams(max_tokens=args.tokens, temperature=0.0)
    methods = {
        "base": [],
        "mixed4": [Decoding(source="lora", activation_hooks=[lambda m: row_hooks(m, adapters)])],
        "merged1": [Decoding(source="lora", activation_hooks=[lambda m: row_hooks(m, [adapters[0]] * 4)])],
        "sched4": [],  # per request below
    }
    per_request = [[Decoding(source="lora", activation_hooks=[adapter_hook(ad)])] for ad in adapters]

    def ban_eos(_ids: Any, scores: Any) -> Any:
        scores[:, eos] = -float("inf")
        return scores

    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {k: [] for k in methods}
    texts: dict[str, list[str]] = {}
    asyncio.run(backend.generate_batch(batch, params=GenerationParams(max_tokens=2)))  # warm up
    for _ in range(args.rounds):
        for name, dec in methods.items():
            d = [x.model_copy(update={"logits_processors": [ban_eos]}) for x in dec] or [
                Decoding(source="ban-eos", logits_processors=[ban_eos])]
            t0 = time.perf_counter()
            if name == "sched4":
                cands = asyncio.run(_concurrent(backend, batch, params, [
                    [x.model_copy(update={"logits_processors": [ban_eos]}) for x in dd] for dd in per_request]))
            else:
                cands = asyncio.run(backend.generate_batch(batch, params=params, decoding=d))
            dt = time.perf_counter() - t0
            rates[name].append(sum(c.tokens for c in cands) / dt)
            texts[name] = [c.text for c in sorted(cands, key=lambda c: c.index)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "benchmark": "lora_speed",
        "settings": {"tokens": args.tokens, "rounds": args.rounds, "batch": len(PROMPTS), "threads": args.threads,
                     "dtype": args.dtype, "peak_batch": backend.scheduler.peak_batch,
                     "adapter": f"r={cfg.r}, {'/'.join(cfg.targets)}, top {cfg.top_layers} of 30 layers "
                                "(the lora plugin's defaults)"},
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "ratio_to_base": {k: round(v / med["base"], 3) for k, v in med.items()},
        "goal": {"mixed4": GOAL, "sched4": GOAL}, "met": med["mixed4"] / med["base"] >= GOAL,
        "met_sched4": med["sched4"] / med["base"] >= GOAL,
        "rows_differ_from_base": [a != b for a, b in zip(texts["mixed4"], texts["base"])],
        "sched4_equals_mixed4": texts["sched4"] == texts["mixed4"],
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
