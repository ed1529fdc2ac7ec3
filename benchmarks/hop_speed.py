"""Latency the second hop (``persona_mw.memory.hops``) adds to ``MemoryManager.search(mode="fused")``.

Same store, same queries, in one run: each query is searched with the hops off and on (the order
alternates), the query vector given (embedded once, outside the timing: the hop embeds nothing), so the
difference is the hop's own work: the seeds' centroid, two more matrix-vector products over the dense
indexes, the pool's names and the session spread. 100,000 memories for one user and over 1,000 users
(stored vectors random unit vectors, as in ``memory_speed.py``). On a shared machine only the ratio and
the difference within this run mean something; the JSON holds the load average before and after.

Run: python benchmarks/hop_speed.py  ->  benchmarks/results/hop_speed.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from memory_speed import _WORDS, _fill, _pct  # noqa: E402

# every part of the hop on (its most expensive form); the shipped default is the CV choice
HOPS = {"prf_k": 5, "prf_weight": 1.0, "link_weight": 0.5, "session_penalty": 0.5}
OFF: dict = {}  # every setting 0: one hop


def bench(emb, tmp: str, users: int, per_user: int, queries: int = 100) -> dict:
    from persona_mw.memory import MemoryManager
    from persona_mw.store.sqlite import SQLiteStore

    rng = np.random.default_rng(3)
    store = SQLiteStore(str(Path(tmp) / f"h{users}.db"))
    owners = [f"user:h{i}" for i in range(users)]
    _fill(store, owners, per_user, emb.dim, rng)
    mm = MemoryManager(store, embedder=emb)
    asked = owners[: min(users, 50)]
    for o in asked:
        mm._load(o)
    off: list[float] = []
    on: list[float] = []
    hop2 = 0
    for q in range(queries):
        a, b, c = rng.choice(_WORDS, 3, replace=False)
        query = f"What did I say about the {a} and the {b} near the {c}? ({q})"
        user = asked[q % len(asked)].split(":", 1)[1]
        qv = mm._embed([query])[0]
        for hops in ((OFF, HOPS) if q % 2 else (HOPS, OFF)):
            t = time.perf_counter()
            hits = mm.search(user, query, k=10, query_vector=qv, hops=hops)
            (on if hops else off).append((time.perf_counter() - t) * 1000)
            assert hits and all(h.memory.owner == f"user:{user}" for h in hits)
            hop2 += sum(1 for h in hits if h.why.get("hop") == 2)
    store.close()
    return {"memories": users * per_user, "users": users, "queries": queries,
            "off_p50_ms": _pct(off, 50), "off_p95_ms": _pct(off, 95),
            "on_p50_ms": _pct(on, 50), "on_p95_ms": _pct(on, 95),
            "added_p50_ms": round(_pct(on, 50) - _pct(off, 50), 3),
            "added_p95_ms": round(_pct(on, 95) - _pct(off, 95), 3),
            "ratio_p95": round(_pct(on, 95) / _pct(off, 95), 3), "hits_from_hop2": hop2}


def main() -> dict:
    from persona_mw.embeddings import default_embedder

    emb = default_embedder()
    emb.embed(["warm up"])
    result: dict = {"benchmark": "hop_speed", "hops": HOPS, "machine": f"{os.cpu_count()} cpu(s)",
                    "load_average_at_start": [round(x, 1) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, users, per in (("1000_users", 1000, 100), ("1_user", 1, 100_000)):
            result[name] = bench(emb, tmp, users, per)
            print(name, json.dumps(result[name]), flush=True)
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    out = Path(__file__).parent / "results" / "hop_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
