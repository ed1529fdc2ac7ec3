"""How far can 8 clients at once outrun one client on this machine? What the model's own costs allow.

``server_throughput.py`` measures ``clients8_vs_1`` through the server (goal >= 4). This script measures
the three costs behind it, on the embedded SmolLM2-135M-Instruct with the lean decode step, in one
process and nothing else (no HTTP, no tokenizer round trips, no scheduler):

- ``prefill_s``: encoding one prompt of the server benchmark (chat template applied), batch 1, median
  over its 8 prompts; ``prefill8_s``: the 8 prompts left-padded in ONE forward (the best a scheduler
  that batched prefills could do);
- ``step1_s`` / ``step8_s``: one decode step (the lean step) at batch 1 and batch 8, median over the
  steps of a ``--tokens``-token answer.

For an answer of T tokens, one client alone costs ``prefill_s + (T-1) * step1_s`` per answer; 8 clients
in a full batch cost at best ``(min(8 * prefill_s, prefill8_s) + (T-1) * step8_s) / 8`` per answer. Their
quotient (``compute_ratio_clients8_vs_1_T_tokens``) is what ``clients8_vs_1`` would be with zero overhead
anywhere, reported for T = 16 and 64 and for each ``--dtypes``. It is not a strict bound: per-token
overheads a batch shares (HTTP, streaming, the scheduler) lower one client's rate more than eight's.
Writes ``benchmarks/results/batch_bound.json``.
Run: ``nice -n 5 .venv/bin/python benchmarks/batch_bound.py [--dtypes int4 float32]``. Not a test.
"""

from __future__ import annotations

import argparse
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
RESULTS = ROOT / "benchmarks" / "results" / "batch_bound.json"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _costs(dtype: str, steps: int) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    from benchmarks.server_throughput import PROMPTS
    from persona_mw import models
    from persona_mw.adapters.transformers.lean import decoder_for

    model, tok = models.load("smollm2-135m-instruct", dtype=dtype)
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]

    def prefill(batch: list[str]) -> tuple[float, Any, Any, Any]:
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        cache = DynamicCache(config=model.config)
        started = time.perf_counter()
        logits = model(**enc, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return time.perf_counter() - started, cache, enc["attention_mask"], logits.argmax(-1, keepdim=True)

    def decode(cache: Any, mask: Any, ids: Any) -> float:
        got = decoder_for(model)
        assert got is not None, "the lean step does not apply"
        lean = got[0]
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -1:]
            started = time.perf_counter()
            ids = lean.step(ids, mask, positions, cache).argmax(-1, keepdim=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    with torch.inference_mode():
        prefill([texts[0]])  # warm-up
        singles = [prefill([t])[0] for t in texts]
        p8, cache8, mask8, ids8 = prefill(texts)
        _, cache1, mask1, ids1 = prefill([texts[0]])
        step1 = decode(cache1, mask1, ids1)
        step8 = decode(cache8, mask8, ids8)
    prefill1 = statistics.median(singles)
    out: dict[str, Any] = {"prefill_s": round(prefill1, 4), "prefill8_s": round(p8, 4),
                           "step1_s": round(step1, 5), "step8_s": round(step8, 5),
                           "decode_only_ratio": round(8 * step1 / step8, 3)}
    for tokens in (16, 64):
        alone = prefill1 + (tokens - 1) * step1
        shared = (min(8 * prefill1, p8) + (tokens - 1) * step8) / 8
        out[f"compute_ratio_clients8_vs_1_{tokens}_tokens"] = round(alone / shared, 3)
        out[f"best_tokens_per_s_8_clients_{tokens}_tokens"] = round(tokens / shared, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["int4", "float32"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import torch

    report: dict[str, Any] = {
        "benchmark": "batch_bound",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "loadavg_before": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "goal_clients8_vs_1": 4,
        "dtypes": {},
    }
    for dtype in args.dtypes:
        report["dtypes"][dtype] = _costs(dtype, args.steps)
        print(dtype, json.dumps(report["dtypes"][dtype]), flush=True)
    report["machine"]["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
