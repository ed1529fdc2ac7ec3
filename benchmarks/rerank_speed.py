"""What does best-of-4 reranking cost on the local backend, against best-of-1?

Full middleware turns on the embedded SmolLM2-135M-Instruct (CPU), a user who stated a style
preference, a few prompts. Modes, interleaved per prompt so that machine noise hits all alike:

- ``best_of_1``: ``stated`` only, one greedy answer (what a pipeline without rerank serves);
- ``best_of_1_sampled``: the same at the temperature best-of-4 samples at (like-for-like lengths);
- ``best_of_4``: ``stated`` + ``rerank`` (n=4 in one batch, rewards style + stated);
- ``best_of_4_judge`` (``--judge``): best-of-4 with the LLM judge added (4 more prompts, one batch).

Reports the median wall time per mode and ``ratio = median(best_of_4) / median(best_of_1)``
(goal < 2), and writes ``benchmarks/results/rerank_speed.json``. Not a test. Timings on a shared
machine are noisy: run it with nothing else busy (the JSON records the load average).
Run: ``.venv/bin/python benchmarks/rerank_speed.py [--repeats 3] [--max-new-tokens 48] [--threads N] [--judge]``.
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rerank_speed.json"
PROMPTS = [
    "How does a refrigerator keep food cold?",
    "Why is the sky blue?",
    "What should I pack for a weekend hike?",
    "How do I make a cup of tea?",
]
STATED = "Answer in one short sentence."
PIPELINES = {
    "best_of_1": "pipeline:\n  - use: stated\n",
    "best_of_1_sampled": "pipeline:\n  - use: stated\n",
    "best_of_4": "pipeline:\n  - use: stated\n  - use: rerank\n    n: 4\n    rewards: {style: 1.0, stated: 0.5}\n",
    "best_of_4_judge": ("pipeline:\n  - use: stated\n  - use: rerank\n    n: 4\n"
                        "    rewards: {style: 1.0, stated: 0.5, judge: 0.5}\n"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--judge", action="store_true", help="also time best-of-4 with the LLM judge")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 avoids OpenMP oversubscription on a busy shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from persona_mw import Middleware, parse_config
    from persona_mw.adapters.transformers import DIVERSE_TEMPERATURE, create

    backend = create(max_new_tokens=args.max_new_tokens, threads=args.threads)
    modes = [m for m in PIPELINES if m != "best_of_4_judge" or args.judge]
    tmp = tempfile.mkdtemp(prefix="rerank-bench-")
    mws: dict[str, Any] = {}
    for mode in modes:
        cfg = parse_config(PIPELINES[mode])
        cfg.store.path = str(Path(tmp) / f"{mode}.db")
        cfg.trace.store = False
        mw = Middleware(cfg, backend=backend, autoload=False)
        mw.feedback(kind="stated", user="ana", text=STATED)
        mws[mode] = mw

    def turn(mode: str, prompt: str, seed: int) -> tuple[float, int, str]:
        """Wall seconds, decoding steps (the longest candidate's tokens) and the served text."""
        params: dict[str, Any] = {"seed": seed}
        if mode == "best_of_1_sampled":
            params["temperature"] = DIVERSE_TEMPERATURE
        n = 4 if mode.startswith("best_of_4") else 1  # n=4 returns every candidate: same work, all lengths
        t0 = time.perf_counter()
        r = mws[mode].chat(user="ana", messages=prompt, params=params, n=n)
        return time.perf_counter() - t0, max(c.tokens or 0 for c in r.choices), r.text

    # Warm-up: model load, MiniLM load (the stated reward), first-call allocations.
    for mode in modes:
        turn(mode, "Hello!", 0)

    times: dict[str, list[float]] = {m: [] for m in modes}
    steps: dict[str, list[int]] = {m: [] for m in modes}
    per_prompt: dict[str, dict[str, float]] = {}
    answers: dict[str, dict[str, str]] = {}
    for prompt in PROMPTS:
        local: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for mode in modes:  # interleaved: noise hits every mode alike
                dt, n_steps, text = turn(mode, prompt, 1000 + rep)
                steps[mode].append(n_steps)
                local[mode].append(dt)
                times[mode].append(dt)
                answers.setdefault(prompt, {})[mode] = text
        per_prompt[prompt] = {m: round(statistics.median(v), 3) for m, v in local.items()}
        print(prompt, per_prompt[prompt], flush=True)

    med = {m: round(statistics.median(v), 3) for m, v in times.items()}
    ratios = [p["best_of_4"] / p["best_of_1"] for p in per_prompt.values()]
    # Seconds per decoding step: separates the cost of a 4-row batch from the length effect (a
    # batch runs until its longest candidate ends; one greedy answer is often shorter).
    per_step = {m: round(sum(times[m]) / max(1, sum(steps[m])), 4) for m in modes}
    result: dict[str, Any] = {
        "benchmark": "rerank_speed",
        "model": backend.model_name,
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": args.threads,
        "repeats": args.repeats,
        "prompts": PROMPTS,
        "stated": STATED,
        "median_s": med,
        "per_prompt_median_s": per_prompt,
        "ratio_best_of_4_vs_best_of_1": round(med["best_of_4"] / med["best_of_1"], 3),
        "ratio_best_of_4_vs_best_of_1_sampled": round(med["best_of_4"] / med["best_of_1_sampled"], 3),
        "median_per_prompt_ratio": round(statistics.median(ratios), 3),
        "mean_decoding_steps": {m: round(statistics.fmean(v), 1) for m, v in steps.items()},
        "seconds_per_step": per_step,
        "step_cost_ratio_best_of_4_vs_best_of_1_sampled": round(per_step["best_of_4"] / per_step["best_of_1_sampled"], 3),
        "goal_ratio": 2.0,
        "answers_last_repeat": answers,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    if "best_of_4_judge" in med:
        result["ratio_best_of_4_judge_vs_best_of_1"] = round(med["best_of_4_judge"] / med["best_of_1"], 3)
    for mw in mws.values():
        mw.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_best_of_4_vs_best_of_1",
                                              "ratio_best_of_4_vs_best_of_1_sampled", "median_per_prompt_ratio",
                                              "mean_decoding_steps", "seconds_per_step",
                                              "step_cost_ratio_best_of_4_vs_best_of_1_sampled")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
