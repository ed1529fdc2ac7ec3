"""Memory search p95 in Postgres (pgvector HNSW + full-text GIN), issue #15 -> JSON.

Two stores in one pgserver Postgres (one schema each):

- ``1000_users``: 200,000 memories, 200 for each of 1,000 users;
- ``1_user``: 100,000 memories of one user.

Texts are synthetic but varied: 8-14 words drawn Zipf-like from the ~3,000 distinct words of this
repository's docs, so full-text search has real posting lists. Stored vectors (384-d, MiniLM's size)
are made from the texts without a model (``WordVectors``: the mean of fixed random word vectors), so
they have the structure real embeddings have (embedding 300k texts with MiniLM would take longer than
the measurement; plain random vectors, used before, are the worst case of any approximate index).
Each query is distinct and embedded for real by MiniLM (its time is in the total, as in
``benchmarks/memory_speed.py``); the vector searched with is the query's ``WordVectors`` vector, in
the stored vectors' space. A user's search is what the memory manager asks the store for
with ``search_in: store``: the query embedding, ``vector_search(owner, q, 100, kinds)`` and
``text_search(owner, query, 100, kinds)`` (100 = the manager's candidate count; kinds = the plugin's
fact and episode); reported separately, in total (``p95_ms``: one after the other) and as the plugin
runs them (``overlapped_p95_ms``: the text search beside the query embedding and the vector search). The plans (EXPLAIN ANALYZE) of one query of each kind are kept in the JSON.

Run: nice -n 5 .venv/bin/python benchmarks/pg_memory_speed.py [--scale 1.0]
     -> benchmarks/results/pg_memory_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = 100  # MemoryManager.candidates: what one search asks each ranker for


def vocabulary() -> list[str]:
    words: set[str] = set()
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        words.update(w.lower() for w in re.findall(r"[A-Za-z]{4,14}", p.read_text(errors="ignore")))
    return sorted(words)


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 3)


class Texts:
    def __init__(self, vocab: list[str], seed: int) -> None:
        self.vocab = np.asarray(vocab)
        ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
        p = 1.0 / ranks
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)
        self.rng.shuffle(self.vocab)

    def sentence(self, lo: int = 8, hi: int = 14) -> str:
        n = int(self.rng.integers(lo, hi + 1))
        return " ".join(self.rng.choice(self.vocab, n, p=self.p))

    def many(self, count: int, lo: int = 8, hi: int = 14) -> list[str]:
        words = self.rng.choice(self.vocab, (count, hi), p=self.p)
        lens = self.rng.integers(lo, hi + 1, count)
        return [" ".join(row[:n]) for row, n in zip(words, lens)]


class WordVectors:
    """Stored vectors with structure, made without a model: a memory's vector is the normalised mean of
    fixed random vectors of its words (plus a little noise), so memories sharing words are near each
    other, as with real embeddings. (Plain random unit vectors in 384 dimensions are all about equally
    far apart, the worst case for any approximate index: HNSW recall@10 0.33 on them.)"""

    def __init__(self, vocab: list[str], dim: int = 384, seed: int = 11) -> None:
        rng = np.random.default_rng(seed)
        m = rng.standard_normal((len(vocab), dim)).astype(np.float32)
        self.m = m / np.linalg.norm(m, axis=1, keepdims=True)
        self.index = {w: i for i, w in enumerate(vocab)}
        self.rng = np.random.default_rng(seed + 1)
        self.dim = dim

    def embed(self, sentences: list[str]) -> np.ndarray:
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for r, text in enumerate(sentences):
            ids = [self.index[w] for w in re.findall(r"[a-z]+", text.lower()) if w in self.index]
            if ids:
                out[r] = self.m[ids].mean(axis=0)
        out += 0.02 * self.rng.standard_normal(out.shape).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def fill(store: Any, owners: list[str], per_owner: int, texts: Texts, words: WordVectors, dim: int = 384) -> float:
    """Nodes, then all memories in one COPY (the HNSW graph built once at the end, as ``db copy`` does)."""
    t = time.perf_counter()
    now = time.time()
    store.load_table("nodes", ({"id": o, "kind": "user", "created_at": now, "meta": "{}"} for o in owners))
    def rows() -> Any:
        for o in owners:
            sentences = texts.many(per_owner)
            vecs = words.embed(sentences)
            for j in range(per_owner):
                yield {"id": uuid.uuid4().hex, "owner": o, "kind": "episode", "text": sentences[j],
                       "polarity": None, "provenance": "[]", "created_at": now + j, "updated_at": now + j,
                       "superseded_by": None, "embedding": vecs[j], "meta": "{}", "idem": None}

    store.load_table("memories", rows())
    with store._tx() as cur:
        cur.execute("ANALYZE memories")
        cur.execute("ANALYZE nodes")
    return time.perf_counter() - t


def explain(store: Any, sql: str, params: Any, setup: str | None = None) -> list[str]:
    with store._tx() as cur:
        if setup:
            cur.execute(setup)
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return [r[0] for r in cur.fetchall()]


def plan_probe(store: Any, owner: str, qv: Any, query: str, k: int) -> dict[str, list[str]]:
    """EXPLAIN ANALYZE of the two queries one search runs, as ``vector_search``/``text_search`` run them."""
    from persona_mw.store.postgres import TEXT_SQL, text_params

    q = np.asarray(qv, dtype=np.float32)
    with store._tx() as cur:
        setup, sql = store._vector_plan(cur, owner, len(q), k)
        for statement in setup:
            cur.execute(statement)
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, {"q": q, "owner": owner, "k": k, "kinds": KINDS})
        vector = [*setup, *(r[0] for r in cur.fetchall())]
    params = text_params(owner, query, k, KINDS)
    assert params is not None
    params["n"], params["avgdl"] = store._text_stats(owner)
    return {"vector": vector, "text": explain(store, TEXT_SQL, params)}


KINDS = ["episode", "fact"]  # what the memory plugin retrieves on the request path


def bench(store: Any, emb: Any, owners: list[str], texts: Texts, queries: int, words: WordVectors) -> dict[str, Any]:
    """Each query twice: ``sequential`` (embed, then vector search, then text search) and ``overlapped``
    (what the memory plugin does with ``search_in: store``: the text search runs while the query is
    embedded on another thread, which then runs the vector search). The two orders alternate between
    queries so that load drifts hit both alike."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)  # the embedding thread

    def embed(query: str) -> np.ndarray:
        emb.embed([query])  # the real query embedding's cost (its vector is in another space than the stored ones)
        return words.embed([query])[0]

    emb_ms, vec_ms, txt_ms, total, overlapped = [], [], [], [], []
    got_vec, got_txt = [], []
    for q in range(queries):
        owner = owners[q % len(owners)]
        query = f"what did I say about {texts.sentence(3, 6)}? ({q})"
        for order in ((0, 1) if q % 2 else (1, 0)):
            if order == 0:
                t0 = time.perf_counter()
                qv = embed(query)
                t1 = time.perf_counter()
                v = store.vector_search(owner, qv.tolist(), CANDIDATES, kinds=KINDS)
                t2 = time.perf_counter()
                x = store.text_search(owner, query, CANDIDATES, kinds=KINDS)
                t3 = time.perf_counter()
                emb_ms.append((t1 - t0) * 1000)
                vec_ms.append((t2 - t1) * 1000)
                txt_ms.append((t3 - t2) * 1000)
                total.append((t3 - t0) * 1000)
                got_vec.append(len(v))
                got_txt.append(len(x))
            else:
                t0 = time.perf_counter()
                fut = pool.submit(lambda: store.vector_search(owner, embed(query).tolist(), CANDIDATES, kinds=KINDS))
                store.text_search(owner, query, CANDIDATES, kinds=KINDS)
                fut.result()
                overlapped.append((time.perf_counter() - t0) * 1000)
    pool.shutdown()
    qv = words.embed(["what did I say about the garden"])[0]
    plans = plan_probe(store, owners[0], qv.tolist(), "what did I say about the garden", CANDIDATES)
    return {"queries": queries, "k": CANDIDATES, "kinds": KINDS,
            "p50_ms": _pct(total, 50), "p95_ms": _pct(total, 95),
            "overlapped_p50_ms": _pct(overlapped, 50), "overlapped_p95_ms": _pct(overlapped, 95),
            "query_embedding_p50_ms": _pct(emb_ms, 50), "query_embedding_p95_ms": _pct(emb_ms, 95),
            "vector_search_p50_ms": _pct(vec_ms, 50), "vector_search_p95_ms": _pct(vec_ms, 95),
            "text_search_p50_ms": _pct(txt_ms, 50), "text_search_p95_ms": _pct(txt_ms, 95),
            "vector_hits_min": min(got_vec), "vector_hits_mean": round(float(np.mean(got_vec)), 1),
            "text_hits_mean": round(float(np.mean(got_txt)), 1),
            "goal_p95_ms": 20.0, "goal_met_sequential": _pct(total, 95) < 20.0,
            "goal_met": _pct(overlapped, 95) < 20.0, "plans": plans}


def recall(store: Any, owner: str, words: WordVectors, texts: Texts, n: int = 20) -> float:
    """Share of the exact top-10 (numpy over the owner's vectors) found in the store's top-100."""
    _, vecs = store.memory_rows(owner)
    ids = list(vecs)
    mat = np.stack([vecs[i] for i in ids])
    found = 0
    for _ in range(n):
        qv = words.embed([texts.sentence(3, 6)])[0]
        exact = {ids[i] for i in np.argsort(-(mat @ qv))[:10]}
        got = {i for i, _ in store.vector_search(owner, qv.tolist(), CANDIDATES)}
        found += len(exact & got)
    return round(found / (10 * n), 3)


def text_recall(store: Any, owner: str, texts: Texts, n: int = 20) -> dict[str, Any]:
    """Share of the exact BM25 top-10 (``TEXT_SQL`` over every memory holding any query lexeme) that
    ``text_search`` returns in its top 10: below 1 only where a large owner's search prunes candidates."""
    from persona_mw.store.postgres import TEXT_SQL, text_params

    found, exact_ms = 0, []
    for q in range(n):
        query = f"what did I say about {texts.sentence(3, 6)}? (recall {q})"
        params = text_params(owner, query, 10)
        assert params is not None
        params["n"], params["avgdl"] = store._text_stats(owner)
        t = time.perf_counter()
        exact = {r[0] for r in store._rows(TEXT_SQL, params)}
        exact_ms.append((time.perf_counter() - t) * 1000)
        found += len(exact & {i for i, _ in store.text_search(owner, query, 10)})
    return {"text_recall_at_10_vs_exact": round(found / (10 * n), 3),
            "text_exact_query_p50_ms": _pct(exact_ms, 50)}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the sizes (a quick try: 0.05)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cases", default="1000_users,1_user", help="which stores to build and measure")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pg_memory_speed.json"))
    args = ap.parse_args()
    import pgserver

    from persona_mw.embeddings import default_embedder
    from persona_mw.store.postgres import PostgresStore

    import torch

    # 2 cores shared by many jobs: one intra-op thread, or torch's threads spin against each other
    torch.set_num_threads(1)
    emb = default_embedder()
    emb.embed(["warm up"])
    vocab = vocabulary()
    result: dict[str, Any] = {
        "benchmark": "pg_memory_speed",
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + ".venv/bin/python benchmarks/pg_memory_speed.py "
                   f"--scale {args.scale} --queries {args.queries} --cases {args.cases}",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu(s), python {platform.python_version()}",
        "note": ("2 cores shared with other jobs (see the load averages); Postgres 16.2 + pgvector 0.6.2 "
                 "(pgserver) on a unix socket, client and server on the same cores"),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
        "embedder": emb.name, "vocabulary_words": len(vocab), "torch_threads": 1,
    }
    folder = tempfile.mkdtemp(prefix="pg-memspeed-")
    srv = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        for name, users, per_user in (("1000_users", 1000, 200), ("1_user", 1, 100_000)):
            if name not in args.cases.split(","):
                continue
            users_n = max(1, int(users * args.scale)) if users > 1 else 1
            per = per_user if users > 1 else max(1000, int(per_user * args.scale))
            store = PostgresStore(srv.get_uri(), schema=f"bench_{name}")
            owners = [f"user:b{i}" for i in range(users_n)]
            texts = Texts(vocab, seed=users_n)
            words = WordVectors(vocab)
            fill_s = fill(store, owners, per, texts, words)
            store.vector_search(owners[0], emb.embed(["warm"])[0].tolist(), CANDIDATES)  # warm the pool
            r = bench(store, emb, owners[: min(50, users_n)], texts, args.queries, words)
            r.update({"memories": users_n * per, "users": users_n, "per_user": per, "fill_s": round(fill_s, 1),
                      "vector_recall_at_10": recall(store, owners[0], words, texts),
                      **text_recall(store, owners[0], texts)})
            result[name] = r
            print(name, json.dumps({k: v for k, v in r.items() if k != "plans"}), flush=True)
            store.drop_schema()
            store.close()
    finally:
        srv.cleanup()
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    result["scale"] = args.scale
    if args.scale != 1.0:
        result["note"] += (f"; RUN AT SCALE {args.scale} of the issue's sizes (see memories/per_user), not the "
                           "full 200,000 / 100,000")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items()}, indent=1)[:4000])
    return result


if __name__ == "__main__":
    main()
