"""Decoding speed with per-row LoRA adapters on the local backend, in ONE run (ratios matter).

Methods, each decoding the same 4 prompts as ONE batch for exactly ``--tokens`` new tokens (eos is
banned so lengths match), greedy, through ``TransformersBackend.generate_batch``:

- ``base``: no adapter (the ordinary ``model.generate`` path);
- ``mixed4``: 4 different adapters, one per row (``persona_mw.plugins._lora.row_hooks``: one
  batched matmul per adapted module, ranks zero-padded), the lora plugin's default shape
  (r = 4 on q_proj / v_proj of the top 8 layers); the adapters are random (speed does not depend
  on their values);
- ``merged1``: one adapter on every row (what a single request gets from the plugin).

Rounds are interleaved so a shared machine's load hits every method alike; the median tokens/s per
method and the ratio to ``base`` are reported with the load average before and after. Writes
``benchmarks/results/lora_speed.json``. Run:
``nice -n 5 .venv/bin/python benchmarks/lora_speed.py [--tokens 32] [--rounds 3]``. Not a test.
Goal (issue #18): mixed4 >= 0.7x base.

``--train --data DSP_DIR``: the training time of ONE adapter on 20 choices instead (the 20 DSP choices
of ``eval lora`` / ``eval fermi``'s user d0-u0, seed 0: each chosen answer over its 4 rejected, 80
pairs), the plugin's default settings with the time budget lifted (``job_seconds: null``, so all
``steps`` run). Reported: wall and CPU seconds of the job (prepare = the one no-grad pass, and the
steps), and, as a figure that a shared machine's load cancels out of, the job's wall time over the
wall time of one plain no-grad forward of the whole model over the same sequences, measured before
and after the job in the same process. Writes ``benchmarks/results/lora_train.json``.
Goal (issue #18): under 60 s on the 2-core machine.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="time training one adapter on 20 choices instead")
    ap.add_argument("--data", help="the DSP folder (--train)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.train:
        if not args.data:
            ap.error("--train needs --data DSP_DIR")
        train_speed(args.data, args.threads)
        return
    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.plugins._lora import row_hooks
    from persona_mw.types import Decoding, GenerationParams, Message

    backend = TransformersBackend(model="smollm2-135m-instruct", threads=1)
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
    }

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
            cands = asyncio.run(backend.generate_batch(batch, params=params, decoding=d))
            dt = time.perf_counter() - t0
            rates[name].append(sum(c.tokens for c in cands) / dt)
            texts[name] = [c.text for c in sorted(cands, key=lambda c: c.index)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "benchmark": "lora_speed",
        "settings": {"tokens": args.tokens, "rounds": args.rounds, "batch": len(PROMPTS), "threads": 1,
                     "adapter": "r=4, q_proj/v_proj, top 8 of 30 layers (the lora plugin's defaults)"},
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "ratio_to_base": {k: round(v / med["base"], 3) for k, v in med.items()},
        "goal": {"mixed4": GOAL}, "met": med["mixed4"] / med["base"] >= GOAL,
        "rows_differ_from_base": [a != b for a, b in zip(texts["mixed4"], texts["base"])],
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


def train_speed(data: str, threads: int) -> None:
    """``--train``: one adapter on 20 choices with the plugin's defaults (no time budget), timed."""
    import torch

    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.eval.dsp import load
    from persona_mw.eval.lora import _choices, _splits
    from persona_mw.plugins import _lora
    from persona_mw.plugins.lora import LoraAdapters
    from persona_mw.types import Message

    load_before = os.getloadavg()
    items = load(data)
    doms = list(items[0]["responses"])
    _test, obs, r = _splits(items, 0, 20, 24)
    mine = _choices("d0-u0", items, r.choice(obs, size=20, replace=False), doms, doms[0], r)
    pairs = [(e["prompt"], e["chosen"], x) for e in mine for x in e["rejected"]]
    backend = TransformersBackend(model="smollm2-135m-instruct", threads=threads)
    model, tok = backend.model, backend.tokenizer

    def fmt(p: str) -> str:
        return backend.format_prompt([Message(role="user", content=p)])

    s = LoraAdapters().settings()
    s.seconds = None  # all steps, to see the whole job's time
    start = _lora.first_trained_layer(model, s.top_layers)

    def forward_ref() -> float:  # one plain no-grad pass of the whole model over the job's sequences
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        t0 = time.perf_counter()
        with torch.no_grad():
            for e in mine:
                ids, mask, _ = _lora._batch(_lora._sequences(model, tok, fmt, e["prompt"], [e["chosen"], *e["rejected"]],
                                                             s), pad)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - t0

    ref_before = forward_ref()
    c0, t0 = time.process_time(), time.perf_counter()
    _adapter, stats = _lora.train_lora(model, tok, fmt, pairs, s)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ref_after = forward_ref()
    ref = (ref_before + ref_after) / 2
    steps = max(1, int(stats["steps"]))
    result = {
        "benchmark": "lora_train",
        "settings": {"choices": len(mine), "pairs": len(pairs), "threads": threads, "r": s.r, "alpha": s.alpha,
                     "targets": list(s.targets), "top_layers": s.top_layers, "start_layer": start,
                     "steps": s.steps, "batch_choices": s.batch_choices, "lr": s.lr, "beta": s.beta,
                     "max_prompt_tokens": s.max_prompt_tokens, "max_response_tokens": s.max_response_tokens,
                     "job_seconds": None, "data": "DSP, eval lora's user d0-u0 (seed 0)"},
        "train": stats,
        "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "cpu_share": round(cpu / wall, 3),
        "step_seconds": round(float(stats["seconds"]) / steps, 3),
        # job_seconds bounds the optimisation loop only (prepare runs first, unbounded): a step starts
        # while less than 60 s of the loop have passed.
        "steps_within_job_seconds_60": min(steps, int(60.0 // max(1e-9, float(stats["seconds"]) / steps)) + 1),
        "forward_ref_seconds": [round(ref_before, 2), round(ref_after, 2)],
        "train_over_forward_ref": round(wall / ref, 2),
        "goal_seconds": 60, "met": wall < 60,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    out = RESULTS.parent / "lora_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
