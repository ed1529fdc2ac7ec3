"""The two speed/recall knobs of a large owner's Postgres search, one user x 100,000 memories -> JSON.

- The HNSW walk's candidate pool (``ef_search``; the store uses ``4k`` for ``k`` = 100): latency, and
  recall of the exact top 10 (numpy over the owner's vectors) within the 100 returned.
- ``TEXT_PRUNE_DOCS`` (how many memories holding the rarest query words BM25 scores): latency, and the
  top-10 overlap with the unpruned BM25 query.

Data as in ``pg_memory_speed.py`` (synthetic texts and structured vectors). An exploration that backs
the defaults' trade-off; it changes no setting.

Run: .venv/bin/python benchmarks/pg_search_knobs.py [--scale 1.0] -> benchmarks/results/pg_search_knobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_memory_speed as base  # noqa: E402  (the data generators)

KINDS = ["episode", "fact"]


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1000, out


def _summary(ms: list[float], **extra: Any) -> dict[str, Any]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            **extra}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", default=str(base.ROOT / "benchmarks" / "results" / "pg_search_knobs.json"))
    args = ap.parse_args()
    import pgserver

    from persona_mw.store import postgres
    from persona_mw.store.postgres import PostgresStore

    out: dict[str, Any] = {"benchmark": "pg_search_knobs", "scale": args.scale,
                           "load_average_at_start": [round(x, 1) for x in os.getloadavg()]}
    srv = pgserver.get_server(tempfile.mkdtemp(prefix="pg-knobs-"), cleanup_mode="delete")
    try:
        store = PostgresStore(srv.get_uri(), schema="knobs")
        vocab = base.vocabulary()
        texts, words = base.Texts(vocab, seed=1), base.WordVectors(vocab)
        out["memories"] = per = int(100_000 * args.scale)
        out["fill_s"] = round(base.fill(store, ["user:b0"], per, texts, words), 1)
        _, vecs = store.memory_rows("user:b0")
        ids = list(vecs)
        mat = np.stack([vecs[i] for i in ids])
        queries = [texts.sentence(3, 6) for _ in range(60)]
        qvs = [words.embed([q])[0] for q in queries]
        exact10 = [{ids[i] for i in np.argsort(-(mat @ qv))[:10]} for qv in qvs]
        plan = store._vector_plan
        for pool in (100, 150, 200, 400):
            def fixed(cur: Any, owner: str, dim: int, k: int, pool: int = pool) -> tuple[list[str], str]:
                return [f"SET LOCAL hnsw.ef_search = {pool}"], postgres.vector_sql(dim, exact=False, pool=pool)

            store._vector_plan = fixed  # type: ignore[method-assign]
            ms, found = [], 0
            for qv, ex in zip(qvs, exact10):
                t, got = _timed(lambda qv=qv: store.vector_search("user:b0", qv.tolist(), 100, kinds=KINDS))
                ms.append(t)
                found += len(ex & {i for i, _ in got})
            out[f"vector_pool_{pool}"] = _summary(ms, recall_at_10_in_100=round(found / (10 * len(qvs)), 3))
            print(pool, out[f"vector_pool_{pool}"], flush=True)
        store._vector_plan = plan  # type: ignore[method-assign]
        asks = [f"what did I say about {q}?" for q in queries]
        default = postgres.TEXT_PRUNE_DOCS
        postgres.TEXT_PRUNE_DOCS = 10**9
        exact = [{i for i, _ in store.text_search("user:b0", q, 10)} for q in asks[:30]]
        for prune in (500, 1000, 2000, 3000):
            postgres.TEXT_PRUNE_DOCS = prune
            ms, found = [], 0
            for j, q in enumerate(asks):
                t, got = _timed(lambda q=q: store.text_search("user:b0", q, 100, kinds=KINDS))
                ms.append(t)
                if j < len(exact):
                    found += len(exact[j] & {i for i, _ in got[:10]})
            out[f"text_prune_{prune}"] = _summary(ms, top10_overlap_with_unpruned=round(found / (10 * len(exact)), 3))
            print(prune, out[f"text_prune_{prune}"], flush=True)
        postgres.TEXT_PRUNE_DOCS = default
        store.drop_schema()
        store.close()
    finally:
        srv.cleanup()
    out["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
