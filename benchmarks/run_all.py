"""Run every benchmark script in this folder (each writes its own JSON under results/).

Run: python benchmarks/run_all.py [--only NAME ...]
Scripts run one after another in fresh processes, so their timings do not disturb each other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="script names without .py")
    args = ap.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    failed = []
    for script in scripts:
        t = time.perf_counter()
        print(f"== {script.name}", flush=True)
        r = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        print(f"== {script.name}: exit {r.returncode} in {time.perf_counter() - t:.0f} s", flush=True)
        if r.returncode:
            failed.append(script.name)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
