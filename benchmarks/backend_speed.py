"""How fast is the local transformers backend on this machine?

Measures, for one registry model (default: the embedded SmolLM2-135M-Instruct):

- cold load from the safetensors cache, in a fresh subprocess (torch/transformers import and
  the model load timed separately);
- greedy decoding at batch 1: a fixed prompt, up to 64 new tokens, 3 repeats, median tokens/s;
- n=4 sampled candidates in ONE batch: total tokens/s over the 4 rows (3 repeats, median);
- 4 different prompts in one left-padded batch via ``generate_batch`` (3 repeats, median).

Prints a table and writes ``benchmarks/results/backend_speed.json`` with machine information.
Run: ``.venv/bin/python benchmarks/backend_speed.py [--model NAME] [--threads N]``. Not a test.
Timings on a shared machine are noisy: run it with nothing else busy on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "backend_speed.json"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BATCH_PROMPTS = [
    PROMPT,
    "Explain how a refrigerator works to a ten-year-old.",
    "Describe a walk through a forest in autumn.",
    "Give me some advice for learning to play the guitar.",
]
NEW_TOKENS = 64
REPEATS = 3

_LOAD_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
from persona_mw import models
models.resolve(sys.argv[1])  # already cached: not part of what we time below
t2 = time.perf_counter()
models.load(sys.argv[1])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t3 - t2}))
"""


def measure_cold_load(model: str) -> dict[str, float]:
    """Import and load times in a fresh interpreter (the cache is warmed first, untimed)."""
    from persona_mw import models

    models.resolve(model)  # make sure the one-time de-quantization is not what we time
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _LOAD_PROBE, model], capture_output=True, text=True, check=True, cwd=ROOT
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    # The first run also pays for cold OS file caches; report the better of the two.
    best = min(runs, key=lambda r: r["load_s"])
    return {"import_torch_transformers_s": round(best["import_s"], 3), "load_from_cache_s": round(best["load_s"], 3)}


async def timed(coro: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = await coro
    return time.perf_counter() - t0, result


async def measure_decoding(model: str, threads: int | None) -> dict[str, Any]:
    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.types import GenerationParams, Message

    backend = TransformersBackend(model, max_new_tokens=NEW_TOKENS, threads=threads)
    await backend.load()
    ask = [Message(role="user", content=PROMPT)]
    greedy = GenerationParams(max_tokens=NEW_TOKENS)
    await backend.generate(ask, params=GenerationParams(max_tokens=8))  # warm-up: first-call overheads

    def summary(samples: list[tuple[float, int]]) -> dict[str, Any]:
        rates = [tokens / seconds for seconds, tokens in samples]
        return {
            "tokens_per_s_median": round(statistics.median(rates), 2),
            "tokens_per_s_all": [round(r, 2) for r in rates],
            "tokens": [t for _, t in samples],
            "seconds": [round(s, 3) for s, _ in samples],
        }

    batch1 = []
    for _ in range(REPEATS):
        seconds, (cand,) = await timed(backend.generate(ask, params=greedy))
        batch1.append((seconds, cand.tokens or 0))

    batch4 = []
    for seed in range(REPEATS):
        params = GenerationParams(max_tokens=NEW_TOKENS, seed=seed)
        seconds, cands = await timed(backend.generate(ask, n=4, params=params))
        batch4.append((seconds, sum(c.tokens or 0 for c in cands)))

    prompts = [[Message(role="user", content=p)] for p in BATCH_PROMPTS]
    batch4_prompts = []
    for _ in range(REPEATS):
        seconds, cands = await timed(backend.generate_batch(prompts, params=greedy))
        batch4_prompts.append((seconds, sum(c.tokens or 0 for c in cands)))

    import torch

    return {
        "batch1_greedy": summary(batch1),
        "batch4_candidates_sampled": summary(batch4),
        "batch4_prompts_greedy": summary(batch4_prompts),
        "torch_threads": torch.get_num_threads(),
    }


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_after": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_before = _loadavg()
    if load_before and load_before[0] > 1.0:
        print(f"warning: load average {load_before[0]:.1f} before starting: other processes compete for the "
              "CPU and torch slows down badly when oversubscribed; the numbers will be low", file=sys.stderr)
    load = measure_cold_load(args.model)
    decoding = asyncio.run(measure_decoding(args.model, args.threads))
    result = {
        "benchmark": "backend_speed",
        "model": args.model,
        "new_tokens": NEW_TOKENS,
        "repeats": REPEATS,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine(), "load_average_before": load_before},
        "load": load,
        **decoding,
    }
    print(f"backend speed: {args.model} on {result['machine']['cpu_count']} CPUs, "
          f"torch {result['machine']['torch']} ({decoding['torch_threads']} threads)")
    print(f"  import torch+transformers   {load['import_torch_transformers_s']:7.2f} s")
    print(f"  load from safetensors cache {load['load_from_cache_s']:7.2f} s")
    for key, label in (
        ("batch1_greedy", "batch 1, greedy"),
        ("batch4_candidates_sampled", "batch 4, n=4 candidates"),
        ("batch4_prompts_greedy", "batch 4, 4 prompts greedy"),
    ):
        r = decoding[key]
        print(f"  {label:<27} {r['tokens_per_s_median']:7.2f} tokens/s (median of {r['tokens_per_s_all']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
