"""Best-of-n requests inside the continuous batch vs beside it, with other users streaming.

The embedded SmolLM2-135M-Instruct (``--dtype``, default int4), in-process. Workload per round:
4 streaming clients, each asking ``--requests`` greedy answers back to back, and 2 clients that each
ask for ``n=4`` seeded samples (what the ``rerank`` plugin asks for) at the same moment. Two modes,
interleaved round by round so machine noise hits both alike:

- ``beside``: ``n > 1`` takes the path it took before it joined the batch (``model.generate`` with
  ``num_return_sequences``, which encodes the prompt n times, run on the torch thread between two
  slices of the batch, so the streaming clients wait while it runs);
- ``batch``: ``n > 1`` holds n rows of the continuous batch (the prompt encoded once).

Reports per mode the median over rounds of: wall time, the streaming clients' time to first token
(p95) and aggregate tokens/s, the best-of-4 requests' latency; and checks that the seeded best-of-4
answers are the same in both modes. Writes ``benchmarks/results/best_of_n_batch.json``. Not a test.
Run: ``nice -n 5 .venv/bin/python benchmarks/best_of_n_batch.py [--rounds 3] [--tokens 32]``.
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
RESULTS = ROOT / "benchmarks" / "results" / "best_of_n_batch.json"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Explain how a refrigerator works to a ten-year-old.",
    "Describe a walk through a forest in autumn.",
    "Give me some advice for learning to play the guitar.",
    "Tell me about the history of the bicycle.",
]
BEST_OF = ["Write a poem about the sea at night.", "Explain why the sky is blue in simple words."]


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


async def _round(b: Any, tokens: int, requests: int) -> dict[str, Any]:
    from persona_mw.types import GenerationParams, Message

    greedy = GenerationParams(max_tokens=tokens)
    sampled = GenerationParams(max_tokens=tokens, temperature=0.7, seed=3)
    ttfts: list[float] = []
    counts: list[int] = []

    async def streamer(i: int) -> None:
        for k in range(requests):
            started = time.perf_counter()
            first = None
            text = ""
            async for piece in b.stream([Message(role="user", content=PROMPTS[(i + k) % len(PROMPTS)])],
                                        params=greedy):
                first = first if first is not None else time.perf_counter() - started
                text += piece
            ttfts.append(first if first is not None else time.perf_counter() - started)
            counts.append(b.count_tokens(text))

    async def best_of(prompt: str) -> tuple[float, list[str], int]:
        started = time.perf_counter()
        cands = await b.generate([Message(role="user", content=prompt)], n=4, params=sampled)
        return time.perf_counter() - started, [c.text for c in cands], sum(c.tokens or 0 for c in cands)

    started = time.perf_counter()
    results = await asyncio.gather(*(streamer(i) for i in range(4)), *(best_of(p) for p in BEST_OF))
    wall = time.perf_counter() - started
    best = [r for r in results if r is not None]
    return {
        "wall_s": wall,
        "stream_ttft_p95_s": _p95(ttfts),
        "stream_tokens_per_s": sum(counts) / wall,
        "all_tokens_per_s": (sum(counts) + sum(r[2] for r in best)) / wall,
        "best_of_4_latency_s": max(r[0] for r in best),
        "answers": [r[1] for r in best],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="answers per streaming client, back to back")
    ap.add_argument("--dtype", default="int4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.adapters.transformers import backend as backend_module
    from persona_mw.adapters.transformers.scheduler import schedulable

    b = TransformersBackend("smollm2-135m-instruct", max_new_tokens=args.tokens, dtype=args.dtype,
                            threads=args.threads)
    asyncio.run(b.load())
    load_before = os.getloadavg()

    def beside(backend: Any, decoding: Any, n: int) -> bool:
        return n == 1 and schedulable(backend, decoding, n)

    modes = {"beside": beside, "batch": schedulable}
    asyncio.run(_round(b, 4, 1))  # warm-up: first forwards, allocator
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, rule in modes.items():
            backend_module.schedulable = rule  # type: ignore[attr-defined]
            try:
                rounds[name].append(asyncio.run(_round(b, args.tokens, args.requests)))
            finally:
                backend_module.schedulable = schedulable  # type: ignore[attr-defined]
    keys = ("wall_s", "stream_ttft_p95_s", "stream_tokens_per_s", "all_tokens_per_s", "best_of_4_latency_s")
    summary = {m: {k: round(statistics.median(r[k] for r in rs), 3) for k in keys} for m, rs in rounds.items()}
    same = all(a["answers"] == c["answers"] for a, c in zip(rounds["beside"], rounds["batch"], strict=True))
    report = {
        "benchmark": "best_of_n_batch",
        "settings": {"dtype": args.dtype, "tokens": args.tokens, "rounds": args.rounds,
                     "streaming_clients": 4, "requests_per_client": args.requests, "best_of_4_clients": 2,
                     "threads": args.threads},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modes": summary,
        "ratios": {
            "wall_batch_over_beside": round(summary["batch"]["wall_s"] / summary["beside"]["wall_s"], 3),
            "stream_ttft_p95_batch_over_beside": round(
                summary["batch"]["stream_ttft_p95_s"] / summary["beside"]["stream_ttft_p95_s"], 3),
        },
        "same_seeded_answers_in_both_modes": same,
        "answers": {m: [r["answers"] for r in rs] for m, rs in rounds.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("modes", "ratios", "same_seeded_answers_in_both_modes")}, indent=2))


if __name__ == "__main__":
    main()
