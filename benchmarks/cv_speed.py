"""One inner trial of ``eval dsp --folds 5``: serving's per-party feature cache vs the eval's shared one -> JSON.

The trial is the first inner split of the first outer fold (5 outer folds, 2 inner, seed 0, 10 users per
domain), the first grid setting (the plugin's defaults), the middleware variant only, as the nested CV runs
it 6 x 2 times per outer fold and H. Timed in one process, in this order:

- ``shared_cold``: the eval's ``SharedFeaturizer``, first use (featurizes the texts the trial needs, once);
- ``shared_warm``: the same trial again (what every later trial of a CV run costs);
- ``per_party``: inside ``per_party_features()``, the way every trial ran before: the feature rows of each
  simulated user's feedback are cached per user and per middleware, so every trial re-embeds them. It runs
  last, so the rows refit and scoring read (the shared scope) are already in the embedder's cache: the
  ratio below is a lower bound of the old cost.

The three must give the same metrics (checked). The load average is written before and after: on a shared
machine only the ratios within one run mean anything.

Run: nice -n 10 python benchmarks/cv_speed.py [--data DIR] [--hs 5] [--out benchmarks/results/cv_speed.json]
(DIR: the dev slice's dsp/ folder; default $DSP_DATA. Without it the script says so and exits 0.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("DSP_DATA", "/work/shared/data/dsp"))
    ap.add_argument("--hs", default="5", help="comma-separated H values of the trial")
    ap.add_argument("--out", default="benchmarks/results/cv_speed.json")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"cv_speed: no DSP data at {args.data!r} (set DSP_DATA or --data); skipped")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from persona_mw.embeddings import default_embedder
    from persona_mw.eval import dsp
    from persona_mw.eval.common import per_party_features
    from persona_mw.eval.cv import PROFILE_GRID

    hs = tuple(int(h) for h in args.hs.split(","))
    b = dsp._bench(args.data, hs, 4)
    outer = dsp.cv_splits(len(b.items), dsp._users(b, 10), 5, seed=0)
    split = dsp.inner_splits(outer[0], 2)[0]
    default_embedder().embed(["warm up the model"])  # its loading is not the trial's
    res: dict[str, Any] = {"benchmark": "cv_speed", "trial": {
        "outer_fold": 0, "inner_split": 0, "hs": list(hs), "setting": PROFILE_GRID[0], "users": len(split.users),
        "scored": len(split.scored), "observed_queries": len(split.obs), "test_queries": len(split.test)},
        "load_before": _load(), "python": platform.python_version(), "cpus": os.cpu_count()}
    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, float]] = {}
    for name in ("shared_cold", "shared_warm", "per_party"):
        t = time.perf_counter()
        if name == "per_party":
            with per_party_features():
                metrics[name] = dsp.trial(b, split, PROFILE_GRID[0], False)
        else:
            metrics[name] = dsp.trial(b, split, PROFILE_GRID[0], False)
        seconds[name] = round(time.perf_counter() - t, 2)
        print(f"{name}: {seconds[name]} s {metrics[name]}", flush=True)
    res.update({"seconds": seconds, "metrics": metrics["shared_warm"],
                "same_metrics": metrics["shared_cold"] == metrics["shared_warm"] == metrics["per_party"],
                "ratio_per_party_over_shared_warm": round(seconds["per_party"] / seconds["shared_warm"], 1),
                "ratio_per_party_over_shared_cold": round(seconds["per_party"] / seconds["shared_cold"], 2),
                "load_after": _load()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")
    print(json.dumps({k: res[k] for k in ("seconds", "same_metrics", "load_before", "load_after")}))
    return 0 if res["same_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
