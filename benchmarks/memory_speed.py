"""Long-term memory speed: ingestion throughput, retrieval p95 at 100k and 1M memories, turn latency added.

1. Ingestion: ``MemoryManager.ingest`` (MiniLM on) over distractor-like chat turns (requests, code,
   questions; 1 in 20 carries a preference or fact), 10 messages per call. Goal >= 2,000 messages/s.
2. Retrieval: default search (``fused``: query embedding + dense + BM25 over memories and turn
   windows + score fusion; results in the JSON up to 2026-11-27 were measured with ``hybrid``) p95,
   query embedding included, with 100,000 memories over 1,000 users, 100,000 memories in one user
   (dense through the HNSW graph: index ``ann``, the default) and 1,000,000 memories over 10,000 users.
   Goal < 20 ms. SYNTHETIC at that size (embedding 1M texts would take hours here): each stored vector
   is drawn around real MiniLM vectors (a pool of 3,000 embedded memory-like sentences; a vector is one
   pool sentence's plus a weighted second one's plus Gaussian noise, normalised), so neighbourhoods
   look like a real corpus's; the stored texts are the first pool sentence's words. Queries are real
   text embedded by MiniLM, each distinct (no cache hits). Until 2026-12-03 the stored vectors were
   uniform random unit vectors: against real query vectors every stored vector is about equally
   near, and the graph's recall@10 on them (0.12-0.21 for any setting) measured nothing a user meets.
   Two latencies: ``p95_ms`` is ``MemoryManager.search`` called alone (embedding, then the search);
   ``request_path_p95_ms`` is what the memory plugin does on a turn (the query embedded on the
   embedding thread while BM25 is scored, then the dense search and the fusion, kinds filtered as the
   plugin asks). The one-user case also reports the dense recall@10 of the graph against the exact
   scan (same queries), the first search's time (no longer a graph build: graphs are built on a
   thread while the owner is scanned exactly) and the build's time; the 1M case the peak RSS.
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
# One request is one thread: a multi-threaded BLAS matrix-vector product only fights the other
# processes for the cores (measured on the shared 2-core machine: 70x slower under load).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

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
            "memories_added": stats.get("added", 0), "merged": stats.get("merged", 0), "goal_messages_per_s": 2000}


class _Vectors:
    """Stored vectors with a real corpus's neighbourhoods at any size: a pool of embedded memory-like
    sentences, each stored vector one pool sentence's + w * another's + noise (normalised)."""

    def __init__(self, emb, rng: np.random.Generator, pool: int = 3000, noise: float = 0.03) -> None:
        self.texts = [f"I remember the {' '.join(rng.choice(_WORDS, 6))}" for _ in range(pool)]
        t = time.perf_counter()
        self.vecs = np.asarray(emb.embed(self.texts), dtype=np.float32)
        self.embed_s = time.perf_counter() - t
        self.noise, self.rng = noise, rng

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` vectors and the pool sentence each is drawn around."""
        rng = self.rng
        a, b = rng.integers(len(self.vecs), size=n), rng.integers(len(self.vecs), size=n)
        x = self.vecs[a] + rng.uniform(0.2, 0.8, size=(n, 1)).astype(np.float32) * self.vecs[b]
        x += self.noise * rng.standard_normal(x.shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True), a


def _fill(store, owners: list[str], per_owner: int, vectors: _Vectors) -> None:
    from persona_mw.memory.extract import one_line
    from persona_mw.store.sqlite import _memory_row
    from persona_mw.types import Memory

    now = time.time()
    for owner in owners:
        store.ensure_node(owner)
    rows = []
    for oi, owner in enumerate(owners):
        vecs, src = vectors.draw(per_owner)
        for j in range(per_owner):
            m = Memory(owner=owner, text=one_line(f"{vectors.texts[src[j]]} {j}"), kind="episode",
                       provenance=[f"{owner}-{j}"], embedding=vecs[j].tolist(), created_at=now + j,
                       meta={"raw": True})
            rows.append(_memory_row(m))
        if len(rows) >= 20000 or oi == len(owners) - 1:
            with store._tx() as cur:  # bulk set-up only; ingestion speed is measured above
                cur.executemany("INSERT INTO memories (id, owner, kind, text, polarity, provenance, created_at, "
                                "updated_at, superseded_by, embedding, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                rows)
            rows = []


def _rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _ann_recall(mm, owner: str, qvs: list[np.ndarray]) -> dict:
    """Dense recall@10 of the owner's HNSW graph against the exact scan of the same rows."""
    from persona_mw.memory.index import AnnIndex, NumpyIndex

    ix = mm.index
    if not isinstance(ix, AnnIndex) or owner not in ix.graph_owners():
        return {"graph": False}
    rec, lat_a, lat_e = [], [], []
    for qv in qvs:
        t = time.perf_counter()
        got = {i for i, _ in ix.search(owner, qv, 10)}
        t2 = time.perf_counter()
        truth = {i for i, _ in NumpyIndex.search(ix, owner, qv, 10)}
        lat_a.append((t2 - t) * 1000)
        lat_e.append((time.perf_counter() - t2) * 1000)
        rec.append(len(got & truth) / 10)
    return {"graph": True, "queries": len(qvs), "recall@10": round(float(np.mean(rec)), 4),
            "min_recall@10": round(float(np.min(rec)), 2), "ann_p95_ms": _pct(lat_a, 95),
            "exact_scan_p95_ms": _pct(lat_e, 95), "ef_search": ix.ef_search, "dtype": ix.dtype,
            "threshold": ix.threshold}


def _vs_exact(emb, store, asked: list[str], asked_q: list[tuple[str, str, np.ndarray]], ann_lat: list[float],
              ann_top: list[list[str]]) -> dict:
    """The same searches (same query vectors, embedding excluded on both sides) through a manager with
    ``index: exact`` on the same store, in the same run: p95 ratio, and how much of the ANN manager's
    fused top 10 the exact one shares."""
    from persona_mw.memory import MemoryManager

    mm = MemoryManager(store, embedder=emb, dense_index="exact")
    for o in asked:
        mm._load(o)
        mm.search(o.split(":", 1)[1], "warm up the indexes", k=10)
    lat, overlap = [], []
    for (user, query, qv), top in zip(asked_q, ann_top):
        t = time.perf_counter()
        found = mm.search(user, query, k=10, query_vector=qv)
        lat.append((time.perf_counter() - t) * 1000)
        overlap.append(len({h.memory.id for h in found} & set(top)) / 10)
    return {"search_only_exact_p95_ms": _pct(lat, 95), "search_only_exact_p50_ms": _pct(lat, 50),
            "search_only_ann_p95_ms": _pct(ann_lat, 95), "search_only_ann_p50_ms": _pct(ann_lat, 50),
            "p95_ratio_ann_over_exact": round(_pct(ann_lat, 95) / max(_pct(lat, 95), 1e-9), 3),
            "fused_top10_overlap_ann_vs_exact": round(float(np.mean(overlap)), 4)}


def _wait_graphs(mm, owner: str) -> float:
    """Seconds until the owner's background graph builds (turns and windows) are done."""
    t = time.perf_counter()
    for ix in (mm.index, mm._win_index):
        if hasattr(ix, "wait"):
            ix.wait(owner)
    return time.perf_counter() - t


def _request_path(mm, user: str, query: str, kinds: tuple[str, ...] = ("fact", "episode")) -> list:
    """The memory plugin's retrieval on a turn: the query embedded on the embedding thread while BM25
    is scored (``prescore``), then the search with both (plugins/memory.py)."""
    fut = mm.start_embed([query])
    pre = mm.prescore(user, query, k=10, kinds=kinds)
    qv = np.asarray(fut.result(), dtype=np.float32)[0]
    return mm.search(user, query, 10, kinds=kinds, query_vector=qv, prescored=pre)


def bench_retrieval(emb, tmp: str, users: int, per_user: int, vectors: _Vectors, queries: int = 200,
                    asked_n: int = 50, compare_exact: bool = False) -> dict:
    from persona_mw.memory import MemoryManager
    from persona_mw.store.sqlite import SQLiteStore

    rng = np.random.default_rng(2)
    store = SQLiteStore(str(Path(tmp) / f"r{users}.db"))
    owners = [f"user:r{i}" for i in range(users)]
    t = time.perf_counter()
    _fill(store, owners, per_user, vectors)
    fill_s = time.perf_counter() - t
    mm = MemoryManager(store, embedder=emb)
    asked = owners[:: max(1, users // asked_n)][:asked_n]
    t = time.perf_counter()
    for o in asked:
        mm._load(o)
    load_s = (time.perf_counter() - t) / len(asked)
    t = time.perf_counter()
    for o in asked:  # the first search of an owner over the threshold starts its graphs' builds
        mm.search(o.split(":", 1)[1], "warm up the indexes", k=10)
    first_s = (time.perf_counter() - t) / len(asked)
    build_s = sum(_wait_graphs(mm, o) for o in asked)
    lat, emb_ms, rest, req, qvs, asked_q, tops, only = [], [], [], [], [], [], [], []
    for q in range(queries):
        a, b, c = rng.choice(_WORDS, 3, replace=False)
        # distinct, also across sections (one embedder, one cache): every embedding here is computed
        query = f"When did I last talk about the {a} and the {b} near the {c}? ({users}x{per_user}:{q})"
        user = asked[q % len(asked)].split(":", 1)[1]
        t = time.perf_counter()
        hits = mm.search(user, query, k=10)
        lat.append((time.perf_counter() - t) * 1000)
        qv0 = mm._embed([query])[0]  # cached now: the same search again, embedding excluded
        t = time.perf_counter()
        mm.search(user, query, k=10, query_vector=qv0)
        only.append((time.perf_counter() - t) * 1000)
        asked_q.append((user, query, qv0))
        tops.append([h.memory.id for h in hits])
        assert hits and all(h.memory.owner == f"user:{user}" for h in hits)
        # the same search split in two: query embedding, then everything else
        t = time.perf_counter()
        qv = mm._embed([query + " again"])[0]
        t2 = time.perf_counter()
        mm.search(user, query + " again", k=10, query_vector=qv)
        emb_ms.append((t2 - t) * 1000)
        rest.append((time.perf_counter() - t2) * 1000)
        t = time.perf_counter()
        got = _request_path(mm, user, query + " once more")
        req.append((time.perf_counter() - t) * 1000)
        assert got and all(h.memory.owner == f"user:{user}" for h in got)
        if len(qvs) < 100:
            qvs.append(qv)
    recall = _ann_recall(mm, asked[0], qvs)
    if compare_exact:
        del mm
        recall["same_run_vs_exact"] = _vs_exact(emb, store, asked, asked_q, only, tops)
    store.close()
    return {"memories": users * per_user, "users": users, "per_user": per_user, "queries": queries,
            "users_searched": len(asked), "ann": recall, "first_search_s_per_user": round(first_s, 3),
            "graph_build_wait_s": round(build_s, 1), "peak_rss_mb": _rss_mb(),
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "max_ms": _pct(lat, 100),
            "request_path_p50_ms": _pct(req, 50), "request_path_p95_ms": _pct(req, 95),
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


def _targets(r: dict) -> dict:
    """Issue #20's goals, each with the measured figure and met true/false (None: not measured)."""
    def goal(section: str, key: str, limit: float, below: bool) -> dict:
        sec = r.get(section) or {}
        v = sec.get("ann", {}).get(key) if key == "recall@10" else sec.get(key)
        met = None if v is None else (v < limit if below else v >= limit)
        return {"value": v, "goal": f"{'<' if below else '>='} {limit}", "met": met}

    t = {"search_p95_ms_1_user_100k": goal("retrieval_1_user", "p95_ms", 20.0, True),
         "search_p95_ms_10000_users_1M": goal("retrieval_10000_users", "p95_ms", 20.0, True),
         "search_p95_ms_1000_users_100k": goal("retrieval_1000_users", "p95_ms", 20.0, True),
         "request_path_p95_ms_1_user_100k": goal("retrieval_1_user", "request_path_p95_ms", 20.0, True),
         "request_path_p95_ms_10000_users_1M": goal("retrieval_10000_users", "request_path_p95_ms", 20.0, True),
         "ingest_messages_per_s": goal("ingest", "messages_per_s", 2000.0, False),
         "ann_recall@10_vs_exact": goal("retrieval_1_user", "recall@10", 0.98, False)}
    t["all_met"] = all(v["met"] for v in t.values() if isinstance(v, dict))
    return t


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
    vectors = _Vectors(emb, np.random.default_rng(4))
    result["vector_pool"] = {"sentences": len(vectors.texts), "noise": vectors.noise,
                             "embed_s": round(vectors.embed_s, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        only = set(filter(None, os.environ.get("MEMORY_SPEED_ONLY", "").split(",")))
        for name, fn in (("ingest", lambda: bench_ingest(emb, tmp)),
                         ("retrieval_1000_users", lambda: bench_retrieval(emb, tmp, 1000, 100, vectors)),
                         ("retrieval_1_user", lambda: bench_retrieval(emb, tmp, 1, 100_000, vectors, queries=100,
                                                                      compare_exact=True)),
                         ("retrieval_10000_users", lambda: bench_retrieval(emb, tmp, 10_000, 100, vectors,
                                                                           asked_n=500)),
                         ("turn_latency", lambda: bench_turn(tmp))):
            if only and name not in only:
                continue
            load0 = [round(x, 1) for x in os.getloadavg()]
            result[name] = fn()
            result[name]["load_average"] = {"before": load0, "after": [round(x, 1) for x in os.getloadavg()]}
            print(name, json.dumps(result[name]), flush=True)
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    result["targets"] = _targets(result)
    out = Path(__file__).parent / "results" / "memory_speed.json"
    if only and out.exists():  # a partial run (MEMORY_SPEED_ONLY): keep the other sections' last figures
        old = json.loads(out.read_text())
        result = {**old, **{k: v for k, v in result.items() if k in only or k not in old or k.startswith("load")}}
        result["targets"] = _targets(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
