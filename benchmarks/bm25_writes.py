"""Lexical search right after a write, for owners of 2,000 / 10,000 / 100,000 memories.

Each round writes two memories (one turn stored, as ``store_turns`` does), waits ``--gap`` seconds (the
time until the user's next turn), then runs the search a turn makes (``BM25Index.probe``, 100
candidates) and times it. Two ways, alternating per round in one process on the same texts:

- ``inline``: ``BM25Index(background=False)``, every search after a write rebuilds the owner's matrix
  (the behaviour before 2026-12-05);
- ``segments``: the default, searches read the last matrix plus the written documents as a second
  segment; a rebuild starts on a thread once the writes reach 1% of the last build (at least 64);
- ``eager``: the same with a rebuild on a thread after every write (``rebuild_share=0, rebuild_min=1``),
  so most searches run while a build holds the GIL: the worst case of the second way.

``max_rel_deviation``: after the rounds, the largest difference between a way's scores and exact BM25
(``inline``'s) over every document for 20 queries, relative to the largest exact score.

Texts are the distractor-like turns of ``memory_speed.py``. Run:
python benchmarks/bm25_writes.py [--rounds 30] [--gap 0.5]  ->  benchmarks/results/bm25_writes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_speed import _pct, _turns  # noqa: E402

from persona_mw.memory.index import BM25Index  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--sizes", default="2000,10000,100000")
    args = ap.parse_args()
    rng = np.random.default_rng(5)
    out: dict = {"benchmark": "bm25_writes", "rounds": args.rounds, "gap_s": args.gap,
                 "machine": f"{platform.machine()} {os.cpu_count()} cpu(s), python {platform.python_version()}",
                 "load_average": {"before": [round(x, 2) for x in os.getloadavg()]}, "sizes": {}}
    for n in map(int, args.sizes.split(",")):
        texts = _turns(n + 2 * args.rounds, rng)
        ids = [f"m{i}" for i in range(len(texts))]
        idx = {"inline": BM25Index(background=False), "segments": BM25Index(),
               "eager": BM25Index(rebuild_share=0, rebuild_min=1)}
        for ix in idx.values():
            ix.add("u", ids[:n], texts[:n])
            ix.probe("u", "warm up the garden", 100)
        lat: dict[str, list[float]] = {k: [] for k in idx}
        for r in range(args.rounds):
            w = slice(n + 2 * r, n + 2 * r + 2)
            query = " ".join(rng.choice(texts[:n], 1)[0].split()[:6])
            names = list(idx)
            for name in names[r % 3:] + names[:r % 3]:
                ix = idx[name]
                ix.add("u", ids[w], texts[w])
                time.sleep(args.gap)
                t0 = time.perf_counter()
                p = ix.probe("u", query, 100)
                lat[name].append((time.perf_counter() - t0) * 1e3)
                assert p is not None and p.n == n + 2 * (r + 1)
        idx["eager"].wait("u", 60)
        dev = {k: 0.0 for k in idx}
        for q in rng.choice(texts[:n], 20):
            exact = idx["inline"].probe("u", q, 100)
            assert exact is not None
            ref = exact.score_of(ids)
            top = float(np.nanmax(ref)) or 1.0
            for k, ix in idx.items():
                got = ix.probe("u", q, 100)
                assert got is not None
                dev[k] = max(dev[k], float(np.nanmax(np.abs(got.score_of(ids) - ref))) / top)
        out["sizes"][str(n)] = {
            **{f"{k}_p{q}_ms": _pct(v, q) for k, v in lat.items() for q in (50, 95)},
            "rebuilds": {k: ix.rebuilds for k, ix in idx.items()},
            "max_rel_deviation": {k: round(v, 6) for k, v in dev.items()}}
        print(n, out["sizes"][str(n)], flush=True)
    out["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(__file__).resolve().parent / "results" / "bm25_writes.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)
    return out


if __name__ == "__main__":
    main()
