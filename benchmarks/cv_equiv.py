"""Small nested-CV runs of ``eval dsp`` and ``eval traits`` (2 outer x 2 inner folds, 2 grid settings, seed 0):
the per-fold figures to JSON. Run it on two commits and compare the files: a speed-up of the CV must leave
every inner score, every chosen setting and every per-fold metric unchanged.

Run: nice -n 10 python benchmarks/cv_equiv.py [OUT.json]  (the dev slices' dsp/ and anthropic_persona/ folders
under $DEV_DATA; without them it says so and exits 0)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    root = Path(os.environ.get("DEV_DATA", "/work/shared/data"))
    out_path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cv_equiv.json"
    if not (root / "dsp").exists() or not (root / "anthropic_persona").exists():
        print(f"cv_equiv: no dev data under {str(root)!r} (set DEV_DATA); skipped")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from persona_mw.eval import dsp, traits
    from persona_mw.eval.cv import PROFILE_GRID

    out: dict[str, Any] = {"load_before": os.getloadavg()}
    t = time.perf_counter()
    r = dsp.run_cv(root / "dsp", folds=2, inner_folds=2, users_per_domain=4, hs=(2,), grid=PROFILE_GRID[:2],
                   log=lambda m: print(m, flush=True))
    out["dsp"] = {"folds": r["folds"], "metrics": r["metrics"], "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    r = traits.run_cv(root / "anthropic_persona", folds=2, inner_folds=2, per_trait=20,
                      sizes=traits.Sizes(groups=4, users_per_group=4, test_users=1, novel_groups=2, test_choices=5),
                      grid=PROFILE_GRID[:2], log=lambda m: print(m, flush=True))
    out["traits"] = {"folds": r["folds"], "metrics": r["metrics"], "seconds": time.perf_counter() - t}
    out["load_after"] = os.getloadavg()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
