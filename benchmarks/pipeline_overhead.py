"""Pipeline overhead per turn, excluding the model call: p50/p95 over N turns -> JSON.

The backend answers instantly (a scripted backend), so what is measured is the middleware:
scope resolution on the real SQLite store, gathering stated preferences, prompt assembly,
trace storage. Goal (issue 2): p95 under 5 ms with the stated-preferences plugin.

Run: python benchmarks/pipeline_overhead.py [--turns 1000] [--out benchmarks/results/pipeline_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from persona_mw import Middleware, parse_config
from persona_mw.testing import ScriptedBackend

CONFIG = """
pipeline:
  - use: stated
graph:
  groups:
    team: {stated: ["Use British spelling.", {text: "jargon", polarity: avoid}]}
"""


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/pipeline_overhead.json")
    ap.add_argument("--metrics", action="store_true",
                    help="record per-plugin stage metrics, as a process serving /metrics does")
    args = ap.parse_args()
    if args.metrics:
        from persona_mw import observe

        if not observe.enable_metrics():
            raise SystemExit("--metrics needs prometheus-client (the [metrics] extra)")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(CONFIG)
        cfg.store.path = str(Path(tmp) / "bench.db")
        mw = Middleware(cfg, backend=ScriptedBackend(script=lambda m: "ok"), autoload=False)
        for u in range(args.users):
            mw.feedback(kind="stated", user=f"u{u}", text=f"Keep answers under {20 + u} words.")
            mw.feedback(kind="stated", user=f"u{u}", text="No emojis.", polarity="avoid")
        overhead, total = [], []
        for i in range(args.turns + 50):
            t0 = time.perf_counter()
            r = mw.chat(user=f"u{i % args.users}", groups=["team"], messages="How do I boil an egg?")
            dt = (time.perf_counter() - t0) * 1000
            if i < 50:  # warm-up
                continue
            gen = r.trace.timings_ms.get("generate", 0.0)
            total.append(dt)
            overhead.append(dt - gen)
        mw.close()

    result = {
        "benchmark": "pipeline_overhead",
        "turns": args.turns,
        "plugins": ["stated"],
        "metrics": args.metrics,
        "store": "sqlite (file, WAL)",
        "p50_ms": round(statistics.median(overhead), 3),
        "p95_ms": round(pct(overhead, 0.95), 3),
        "p99_ms": round(pct(overhead, 0.99), 3),
        "mean_ms": round(statistics.mean(overhead), 3),
        "p95_total_ms_incl_sync_api": round(pct(total, 0.95), 3),
        "goal_p95_ms": 5.0,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
