"""What the hook runner's per-plugin stage metrics (issue #21) cost a turn: ``pipeline_overhead.py``
run alternately on the code before them (a ``git archive`` of b821912 on PYTHONPATH), on this code
with metrics off (a process serving no /metrics: the Python API) and on this code with metrics on
(``--metrics``, as in a server), ROUNDS rounds in one run -> JSON with the ratios of the medians.

Run: nice -n 5 .venv/bin/python benchmarks/plugin_metrics_overhead.py [--turns 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "b821912"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plugin_metrics_overhead.json"))
    args = ap.parse_args()
    old = Path(tempfile.mkdtemp(prefix="pm-before-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "persona_mw", "plugins", "adapters"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    probe = subprocess.run([sys.executable, "-c", "import persona_mw.runner as r; print(r.__file__)"], cwd=str(old),
                           env=dict(os.environ, PYTHONPATH=str(old)), check=True, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(old)), f"the old code is not the one imported: {probe.stdout}"
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict[str, float]]] = {"before": [], "off": [], "on": []}
    for _ in range(args.rounds):
        for name in runs:
            env = dict(os.environ, HF_HUB_OFFLINE="1", PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD="1")
            if name == "before":
                env["PYTHONPATH"] = str(old)
            out = Path(tempfile.mkdtemp()) / "r.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_overhead.py"), "--turns", str(args.turns),
                   "--out", str(out), *(["--metrics"] if name == "on" else [])]
            subprocess.run(cmd, check=True, env=env, cwd=str(old if name == "before" else ROOT),
                           capture_output=True)
            r = json.loads(out.read_text())
            runs[name].append({"p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "mean_ms": r["mean_ms"]})
            print(name, runs[name][-1], flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("p50_ms", "p95_ms", "mean_ms")}
           for n, v in runs.items()}
    report = {
        "benchmark": "plugin_metrics_overhead",
        "command": f"nice -n 5 .venv/bin/python benchmarks/plugin_metrics_overhead.py --turns {args.turns} "
                   f"--rounds {args.rounds}",
        "before": BEFORE, "runs": runs, "median": med,
        "ratios": {f"{a}/before": {k: round(med[a][k] / med["before"][k], 3) for k in ("p50_ms", "mean_ms")}
                   for a in ("off", "on")},
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "2 shared cores under heavy load from other jobs: read the ratios, not the absolute numbers",
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ratios"]))


if __name__ == "__main__":
    main()
