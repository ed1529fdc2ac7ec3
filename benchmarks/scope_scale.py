"""Scope resolution at scale: 1,000,000 users and 10,000 groups in one SQLite store.

Goal: p95 under 2 ms per resolution and RSS under 2 GB. The store is populated directly with
``executemany`` inside one transaction (the schema is the store's own); every user belongs to
1–2 groups, every group has a fitted-evidence profile, a tenth of the users have one too.
Writes benchmarks/results/scope_scale.json. ``--users``/``--groups`` scale it down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np


def populate(path: str, users: int, groups: int, seed: int = 0) -> float:
    from persona_mw.store.sqlite import SQLiteStore
    from persona_mw.types import Profile

    SQLiteStore(path).close()  # schema
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    now = time.time()
    conn.execute("INSERT OR IGNORE INTO nodes VALUES ('global', 'global', ?, '{}')", (now,))
    conn.executemany("INSERT INTO nodes VALUES (?, 'group', ?, '{}')", ((f"group:g{g}", now) for g in range(groups)))
    conn.executemany("INSERT INTO profiles VALUES (?, ?, ?)",
                     ((f"group:g{g}", Profile(node=f"group:g{g}", evidence=50).model_dump_json(), now)
                      for g in range(groups)))
    chunk = 100_000
    for start in range(0, users, chunk):
        ids = range(start, min(users, start + chunk))
        g1 = rng.integers(groups, size=len(ids))
        g2 = rng.integers(groups, size=len(ids))
        two = rng.random(len(ids)) < 0.5
        conn.executemany("INSERT INTO nodes VALUES (?, 'user', ?, '{}')", ((f"user:u{i}", now) for i in ids))
        edges = [(f"user:u{i}", f"group:g{a}", "member", 1.0) for i, a in zip(ids, g1)]
        edges += [(f"user:u{i}", f"group:g{b}", "member", 0.5) for i, b, t2, a in zip(ids, g2, two, g1) if t2 and b != a]
        conn.executemany("INSERT INTO edges VALUES (?, ?, ?, ?)", edges)
        conn.executemany("INSERT INTO profiles VALUES (?, ?, ?)",
                         ((f"user:u{i}", Profile(node=f"user:u{i}", evidence=int(i % 30)).model_dump_json(), now)
                          for i in ids if i % 10 == 0))
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - t


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=2000)
    args = ap.parse_args()
    from persona_mw.graph import PreferenceGraph
    from persona_mw.store.sqlite import SQLiteStore
    from persona_mw.types import ChatRequest, Message

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "scale.db")
        fill_s = populate(path, args.users, args.groups)
        size_mb = os.path.getsize(path) / 1e6
        store = SQLiteStore(path)
        graph = PreferenceGraph(store)
        rng = np.random.default_rng(1)
        msgs = [Message(role="user", content="hi")]
        times = []
        for i in range(args.queries):
            u = int(rng.integers(args.users))
            req = ChatRequest(user=f"u{u}", context="coding" if i % 4 == 0 else None, messages=msgs)
            t = time.perf_counter()
            scope, _ = graph.resolve(req)
            times.append((time.perf_counter() - t) * 1000)
        store.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "benchmark": "scope_scale",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu(s), python {platform.python_version()}",
        "users": args.users, "groups": args.groups, "queries": args.queries,
        "populate_s": round(fill_s, 1), "db_mb": round(size_mb, 1),
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "max_rss_mb": round(rss_mb, 1),
        "goal_p95_ms": 2.0, "goal_rss_mb": 2048,
    }
    out = Path(__file__).parent / "results" / "scope_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
