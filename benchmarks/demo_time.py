"""``make demo``'s generation time, float32 as before the lean step against ``--dtype`` (int4, what
``persona-mw demo`` now runs), in ONE run.

Runs what ``persona-mw demo`` runs (the default config, two users state their preferences, the same
question for each) once per dtype, rounds interleaved, and times the two ``chat`` calls (the answers'
generation; model loading is done before, untimed). Writes ``benchmarks/results/demo_time.json`` with
the load average before/after; compare the ratio, not the seconds, on a shared machine.
Run: ``nice -n 5 .venv/bin/python benchmarks/demo_time.py [--rounds 1]``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo_time.json"


def demo_once(dtype: str | None, lean: bool = True) -> dict[str, Any]:
    """One demo; ``lean=False`` runs transformers' forward on every step (the float32 figure before it)."""
    from persona_mw.adapters.transformers import lean as lean_step
    from persona_mw.cli import DEMO_QUESTION, DEMO_USERS
    from persona_mw.config import default_config

    cfg = default_config()
    if dtype is not None:
        cfg.backend = cfg.backend.model_validate({**cfg.backend.model_dump(), "dtype": dtype})
    built = lean_step.decoder_for
    if not lean:
        lean_step.decoder_for = lambda model: None  # type: ignore[assignment]  # the benchmark's "before"
    try:
        return _demo(cfg, DEMO_QUESTION, DEMO_USERS)
    finally:
        lean_step.decoder_for = built


def _demo(cfg: Any, question: str, users: dict[str, str]) -> dict[str, Any]:
    from persona_mw.middleware import Middleware

    with tempfile.TemporaryDirectory(prefix="persona-mw-demo-time-") as tmp:
        cfg.store.path = str(Path(tmp) / "demo.db")
        with Middleware(cfg) as mw:
            for user, pref in users.items():
                mw.feedback(kind="stated", user=user, text=pref)
            mw.chat(user="warm-up", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)  # load, untimed
            seconds, answers = 0.0, []
            for user in users:
                t0 = time.perf_counter()
                r = mw.chat(user=user, messages=[{"role": "user", "content": question}])
                seconds += time.perf_counter() - t0
                answers.append({"user": user, "text": r.text})
    return {"seconds": round(seconds, 3), "answers": answers}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dtype", default="int4", help="the setting timed against float32 (key 'default')")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {"float32": [], "default": []}
    for _ in range(args.rounds):
        runs["float32"].append(demo_once("float32", lean=False))
        runs["default"].append(demo_once(args.dtype))
        print({k: v[-1]["seconds"] for k, v in runs.items()}, flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result = {
        "benchmark": "demo_time",
        "ratios": {"default_vs_float32_seconds": round(med["default"] / med["float32"], 3)},
        "target": "default under 1/3 of the float32 generation time (ratio <= 0.333)",
        "seconds_median": med,
        "runs": runs,
        "same_answers": [a["text"] for a in runs["float32"][0]["answers"]]
        == [a["text"] for a in runs["default"][0]["answers"]],
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "note": "a shared machine: compare the ratio, not the seconds",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["ratios"]), med)
    return 0


if __name__ == "__main__":
    sys.exit(main())
