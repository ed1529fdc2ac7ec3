"""Long-term memory speed: ingestion throughput, retrieval p95 at 100k memories, turn latency added.

1. Ingestion: ``MemoryManager.ingest`` (MiniLM on) over distractor-like chat turns (requests, code,
   questions; 1 in 20 carries a preference or fact), 10 messages per call. Goal >= 200 messages/s.
2. Retrieval: default search (``fused``: query embedding + dense + BM25 over memories and turn
   windows + score fusion; results in the JSON up to 2026-11-27 were measured with ``hybrid``) p95 with 100,000 memories in the
   store, spread over 1,000 users and all in one user. Goal < 20 ms. Stored vectors are random unit
   vectors (embedding 100k texts would take longer than the measurement; search cost is identical);
   the queries are embedded for real by MiniLM, each query distinct (no cache hits).
3. Turn latency added by the memory plugin on the request path (gather + rewrite, query embedded),
   ScriptedBackend, user with 200 memories: p95 of total turn time with memory minus without. Goal < 25 ms.

Run: python benchmarks/memory_speed.py  ->  benchmarks/results/memory_speed.json
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_WORDS = ("garden river laptop python kettle violin budget hiking museum recipe train ticket vacation "
          "painting novel camera coffee winter summer beach mountain office meeting doctor yoga soccer "
          "guitar bakery market festival concert library history physics chemistry").split()
_DISTRACTORS = [
    "write 10 tests for it", "convert this function to golang", "what is the fastest car in the world",
    "Please simplify this text: {a} and {b} were studied in detail.", "complete this series: 1 2 3 5 8",
    "Can you explain how a {a} works?", "is this sentence correct: the {a} are on the {b}.",
    "def f(x):\n    return {{x: 1}}\nprint(f(2))", "rewrite the paragraph about {a} in a formal tone",
    "Tell me more about {a} in the context of {b}.", "give me 5 ideas for a {a} themed party",
    "How do I fix the error 'KeyError: {a}' in pandas?", "translate 'good morning' into French",
    "what are the pros and cons of {a}?", "summarize the history of the {a} in three sentences",
]
_MEMORY_TURNS = ["I love {a} and I live near the {b}.", "I'm allergic to {a}.", "I went to the {a} last week.",
                 "I don't like {a} at all.", "My sister works at the {a}."]


def _turns(n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for i in range(n):
        a, b = rng.choice(_WORDS, 2, replace=False)
        pool = _MEMORY_TURNS if i % 20 == 0 else _DISTRACTORS
        out.append(pool[int(rng.integers(len(pool)))].format(a=a, b=b))
    return out


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 3)


def bench_ingest(emb, tmp: str, n: int = 2000) -> dict:
    from persona_mw.memory import MemoryManager
    from persona_mw.store.sqlite import SQLiteStore

    rng = np.random.default_rng(1)
    turns = _turns(n, rng)
    store = SQLiteStore(str(Path(tmp) / "ingest.db"))
    mm = MemoryManager(store, embedder=emb)
    t = time.perf_counter()
    for s in range(0, n, 10):
        msgs = [{"role": "user", "content": x, "id": f"m{s + j}"} for j, x in enumerate(turns[s:s + 10])]
        mm.ingest(f"u{s // 200}", msgs)
    secs = time.perf_counter() - t
    stats = dict(mm.stats)
    store.close()
    return {"messages": n, "seconds": round(secs, 3), "messages_per_s": round(n / secs, 1),
            "detected_messages": stats.get("detected", 0), "filtered_share": round(1 - stats.get("detected", 0) / n, 3),
            "memories_added": stats.get("added", 0), "merged": stats.get("merged", 0), "goal_messages_per_s": 200}


def _fill(store, owners: list[str], per_owner: int, dim: int, rng: np.random.Generator) -> None:
    from persona_mw.memory.extract import one_line
    from persona_mw.store.sqlite import _memory_row
    from persona_mw.types import Memory

    now = time.time()
    for owner in owners:
        store.ensure_node(owner)
    rows = []
    for oi, owner in enumerate(owners):
        vecs = rng.standard_normal((per_owner, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        for j in range(per_owner):
            words = " ".join(rng.choice(_WORDS, 6))
            m = Memory(owner=owner, text=one_line(f"I remember the {words} {j}"), kind="episode",
                       provenance=[f"{owner}-{j}"], embedding=vecs[j].tolist(), created_at=now + j,
                       meta={"raw": True})
            rows.append(_memory_row(m))
        if len(rows) >= 20000 or oi == len(owners) - 1:
            with store._tx() as cur:  # bulk set-up only; ingestion speed is measured above
                cur.executemany("INSERT INTO memories (id, owner, kind, text, polarity, provenance, created_at, "
                                "updated_at, superseded_by, embedding, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                rows)
            rows = []


def bench_retrieval(emb, tmp: str, users: int, per_user: int, queries: int = 200) -> dict:
    from persona_mw.memory import MemoryManager
    from persona_mw.store.sqlite import SQLiteStore

    rng = np.random.default_rng(2)
    store = SQLiteStore(str(Path(tmp) / f"r{users}.db"))
    owners = [f"user:r{i}" for i in range(users)]
    t = time.perf_counter()
    _fill(store, owners, per_user, emb.dim, rng)
    fill_s = time.perf_counter() - t
    mm = MemoryManager(store, embedder=emb)
    asked = owners[: min(users, 50)]
    t = time.perf_counter()
    for o in asked:
        mm._load(o)
    load_s = (time.perf_counter() - t) / len(asked)
    lat, emb_ms, rest = [], [], []
    for q in range(queries):
        a, b, c = rng.choice(_WORDS, 3, replace=False)
        query = f"When did I last talk about the {a} and the {b} near the {c}? ({q})"  # distinct: no cache hit
        user = asked[q % len(asked)].split(":", 1)[1]
        t = time.perf_counter()
        hits = mm.search(user, query, k=10)
        lat.append((time.perf_counter() - t) * 1000)
        assert hits and all(h.memory.owner == f"user:{user}" for h in hits)
        # the same search split in two: query embedding, then everything else
        t = time.perf_counter()
        qv = mm._embed([query + " again"])[0]
        t2 = time.perf_counter()
        mm.search(user, query + " again", k=10, query_vector=qv)
        emb_ms.append((t2 - t) * 1000)
        rest.append((time.perf_counter() - t2) * 1000)
    store.close()
    return {"memories": users * per_user, "users": users, "per_user": per_user, "queries": queries,
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "max_ms": _pct(lat, 100),
            "query_embedding_p50_ms": _pct(emb_ms, 50), "query_embedding_p95_ms": _pct(emb_ms, 95),
            "search_without_embedding_p50_ms": _pct(rest, 50), "search_without_embedding_p95_ms": _pct(rest, 95),
            "index_load_s_per_user": round(load_s, 3), "fill_s": round(fill_s, 1), "goal_p95_ms": 20.0}


def bench_turn(tmp: str, turns: int = 100) -> dict:
    from persona_mw.config import parse_config
    from persona_mw.middleware import Middleware
    from persona_mw.testing import ScriptedBackend

    rng = np.random.default_rng(3)
    out = {}
    for label, yaml in (("without", "{}"), ("with", '{"pipeline": [{"use": "memory"}]}')):
        cfg = parse_config(yaml)
        cfg.store.path = str(Path(tmp) / f"turn_{label}.db")
        mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
        if label == "with":
            mw.memory.ingest("ana", [{"role": "user", "content": x} for x in _turns(4000, rng)])
            mw.memory.add_raw("ana", [{"role": "user", "content": x} for x in _turns(150, rng)])
        for _ in range(3):  # warm-up: model load, first index load
            mw.chat(user="ana", messages=[{"role": "user", "content": "warm up please"}])
        lat = []
        for i in range(turns):
            a, b = rng.choice(_WORDS, 2, replace=False)
            r = mw.chat(user="ana", messages=[{"role": "user", "content": f"Any tips about {a} and {b}? #{i}"}])
            lat.append(r.trace.timings_ms["total"])
        n_mem = len(mw.memory.list("ana")) if label == "with" else 0
        mw.close()
        out[label] = {"p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "memories": n_mem}
    return {**out, "added_p50_ms": round(out["with"]["p50_ms"] - out["without"]["p50_ms"], 3),
            "added_p95_ms": round(out["with"]["p95_ms"] - out["without"]["p95_ms"], 3), "goal_p95_ms": 25.0}


def main() -> dict:
    from persona_mw.embeddings import default_embedder

    emb = default_embedder()
    t = time.perf_counter()
    emb.embed(["warm up"])
    warm = time.perf_counter() - t
    result: dict = {
        "benchmark": "memory_speed",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu(s), python {platform.python_version()}",
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
        "embedder": emb.name, "embedder_load_s": round(warm, 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("ingest", lambda: bench_ingest(emb, tmp)),
                         ("retrieval_1000_users", lambda: bench_retrieval(emb, tmp, 1000, 100)),
                         ("retrieval_1_user", lambda: bench_retrieval(emb, tmp, 1, 100_000)),
                         ("turn_latency", lambda: bench_turn(tmp))):
            result[name] = fn()
            print(name, json.dumps(result[name]), flush=True)
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    out = Path(__file__).parent / "results" / "memory_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
