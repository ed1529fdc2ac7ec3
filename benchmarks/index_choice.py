"""Which maintained library replaces the hand-written indexes (issue #20, "maintained indexes").

Lexical: ``bm25s`` (per-owner sparse matrix, rebuilt lazily after writes) against ``tantivy`` (one
incremental index, the owner as a filter term), both fed the same tokens (``persona_mw.memory.index.
tokenize``; tokenizing is not timed). Dense: ``usearch`` HNSW (i8 and f16 storage) and ``faiss-cpu``
HNSW against the exact numpy scan, on synthetic unit vectors (random 384-d: the hardest case for
HNSW, no cluster structure) and on the real MiniLM vectors of the LoCoMo turns (if the data is there).

One user with 100,000 memories and 1,000 users x 100. Speeds are wall-clock on a shared machine:
compare the numbers of one run with each other (the load average is in the JSON).

Run: nice -n 5 python benchmarks/index_choice.py  ->  benchmarks/results/index_choice.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from persona_mw.memory.index import tokenize

_WORDS = ("garden river laptop python kettle violin budget hiking museum recipe train ticket vacation "
          "painting novel camera coffee winter summer beach mountain office meeting doctor yoga soccer "
          "guitar bakery market festival concert library history physics chemistry sister allergic "
          "dinner weekend project deadline birthday").split()
K_CAND = 300


def _texts(n: int, rng: np.random.Generator) -> list[list[str]]:
    return [tokenize("I remember the " + " ".join(rng.choice(_WORDS, 6)) + f" {j}") for j in range(n)]


def _queries(n: int, rng: np.random.Generator) -> list[list[str]]:
    return [tokenize(" ".join(rng.choice(_WORDS, 3, replace=False))) for _ in range(n)]


def _p(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 3)


def bm25s_case(owners: int, per: int, rng: np.random.Generator) -> dict:
    import bm25s

    docs = {f"u{i}": _texts(per, rng) for i in range(owners)}
    t = time.perf_counter()
    idx = {}
    for o, toks in docs.items():
        r = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
        r.index(toks, show_progress=False)
        idx[o] = r
    build = time.perf_counter() - t
    lat = []
    for i, q in enumerate(_queries(200, rng)):
        o = f"u{i % min(owners, 50)}"
        t = time.perf_counter()
        s = idx[o].get_scores(q)
        c = min(K_CAND, len(s))
        np.argpartition(-s, c - 1)[:c]
        lat.append((time.perf_counter() - t) * 1000)
    # one write then one search: the owner's matrix is rebuilt (lazily, on that search)
    o = "u0"
    t = time.perf_counter()
    r = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    r.index(docs[o] + [tokenize("one more memory about the garden")], show_progress=False)
    r.get_scores(["garden"])
    rebuild = time.perf_counter() - t
    return {"owners": owners, "per_owner": per, "ingest_docs_per_s": round(owners * per / build),
            "query_p50_ms": _p(lat, 50), "query_p95_ms": _p(lat, 95),
            "write_then_search_ms": round(rebuild * 1000, 1), "full_scores": True, "per_owner_idf": True}


def tantivy_case(owners: int, per: int, rng: np.random.Generator, tmp: str) -> dict:
    import tantivy

    docs = {f"u{i}": _texts(per, rng) for i in range(owners)}
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("owner", stored=False, tokenizer_name="raw")
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    sb.add_text_field("body", stored=False, tokenizer_name="whitespace")
    schema = sb.build()
    path = Path(tmp) / f"tv{owners}"
    path.mkdir()
    index = tantivy.Index(schema, path=str(path))
    t = time.perf_counter()
    w = index.writer(heap_size=100_000_000, num_threads=1)
    for o, toks in docs.items():
        for j, tk in enumerate(toks):
            w.add_document(tantivy.Document(owner=o, id=f"{o}-{j}", body=" ".join(tk)))
    w.commit()
    w.wait_merging_threads()
    index.reload()
    build = time.perf_counter() - t
    searcher = index.searcher()
    lat = []
    for i, q in enumerate(_queries(200, rng)):
        o = f"u{i % min(owners, 50)}"
        t = time.perf_counter()
        body = index.parse_query(" ".join(q), ["body"])
        own = tantivy.Query.term_query(schema, "owner", o)
        query = tantivy.Query.boolean_query([(tantivy.Occur.Must, own), (tantivy.Occur.Must, body)])
        hits = searcher.search(query, K_CAND).hits
        [searcher.doc(a)["id"][0] for _, a in hits]
        lat.append((time.perf_counter() - t) * 1000)
    w = index.writer(heap_size=50_000_000, num_threads=1)
    t = time.perf_counter()
    w.add_document(tantivy.Document(owner="u0", id="u0-new", body="garden"))
    w.commit()
    index.reload()
    searcher = index.searcher()
    searcher.search(index.parse_query("garden", ["body"]), 10)
    write = time.perf_counter() - t
    w.wait_merging_threads()
    return {"owners": owners, "per_owner": per, "ingest_docs_per_s": round(owners * per / build),
            "query_p50_ms": _p(lat, 50), "query_p95_ms": _p(lat, 95),
            "write_then_search_ms": round(write * 1000, 1), "full_scores": False,
            "per_owner_idf": False, "note": "top-K' only; idf and average length are over all owners"}


def _exact_top(mat: np.ndarray, qs: np.ndarray, k: int) -> np.ndarray:
    s = qs @ mat.T
    return np.argsort(-s, axis=1)[:, :k]


def dense_case(mat: np.ndarray, label: str, rng: np.random.Generator) -> dict:
    from usearch.index import Index

    n, d = mat.shape
    qi = rng.choice(n, 200, replace=False)
    qs = mat[qi] + 0.3 * rng.standard_normal((200, d)).astype(np.float32) / np.sqrt(d)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    truth = _exact_top(mat, qs, 10)
    out: dict = {"vectors": n, "dim": d, "data": label}
    lat = []
    for q in qs:
        t = time.perf_counter()
        s = mat @ q
        np.argpartition(-s, 299)[:300]
        lat.append((time.perf_counter() - t) * 1000)
    out["exact_numpy"] = {"query_p50_ms": _p(lat, 50), "query_p95_ms": _p(lat, 95), "recall@10": 1.0}
    for dtype in ("f16", "i8"):
        ix = Index(ndim=d, metric="ip", dtype=dtype, connectivity=16, expansion_add=128, expansion_search=64)
        t = time.perf_counter()
        ix.add(np.arange(n, dtype=np.uint64), mat, threads=1)
        build = time.perf_counter() - t
        for ef in ((64, 128, 256) if dtype == "f16" else (128,)):
            ix.expansion_search = ef
            lat, rec = [], []
            for j, q in enumerate(qs):
                t = time.perf_counter()
                m = ix.search(q, K_CAND)
                lat.append((time.perf_counter() - t) * 1000)
                rec.append(len(set(m.keys[:10].tolist()) & set(truth[j].tolist())) / 10)
            out[f"usearch_{dtype}_ef{ef}"] = {"build_vectors_per_s": round(n / build), "query_p50_ms": _p(lat, 50),
                                              "query_p95_ms": _p(lat, 95), "recall@10": round(float(np.mean(rec)), 4),
                                              "memory_mb": round(ix.memory_usage / 2**20, 1)}
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        fx = faiss.IndexHNSWFlat(d, 16, faiss.METRIC_INNER_PRODUCT)
        fx.hnsw.efConstruction = 128
        t = time.perf_counter()
        fx.add(mat)
        build = time.perf_counter() - t
        for ef in (64, 128, 256):
            fx.hnsw.efSearch = ef
            lat, rec = [], []
            for j, q in enumerate(qs):
                t = time.perf_counter()
                _, ids = fx.search(q[None, :], K_CAND)
                lat.append((time.perf_counter() - t) * 1000)
                rec.append(len(set(ids[0, :10].tolist()) & set(truth[j].tolist())) / 10)
            out[f"faiss_hnsw_flat_ef{ef}"] = {"build_vectors_per_s": round(n / build), "query_p50_ms": _p(lat, 50),
                                             "query_p95_ms": _p(lat, 95), "recall@10": round(float(np.mean(rec)), 4)}
    except ImportError:
        out["faiss"] = "not installed"
    return out


def random_recall(n: int = 10_000, seed: int = 0) -> list[dict]:
    """HNSW recall@10 on uniform random 384-d unit vectors with random queries (the worst case: every
    point is about equally far), 100 candidates rescored exactly, by connectivity M and ef_search."""
    from usearch.index import Index

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((100, 384)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    out = []
    for m in (16, 32):
        ix = Index(ndim=384, metric="ip", dtype="f16", connectivity=m, expansion_add=128)
        t = time.perf_counter()
        ix.add(np.arange(n, dtype=np.uint64), x, threads=2)
        build = time.perf_counter() - t
        for ef in (128, 256, 512):
            ix.expansion_search = ef
            rec, lat = [], []
            for j in range(100):
                t = time.perf_counter()
                got = ix.search(q[j], 100)
                lat.append((time.perf_counter() - t) * 1000)
                keys = np.asarray(got.keys, dtype=np.int64)
                top = keys[np.argsort(-(x[keys] @ q[j]))][:10]
                rec.append(len(set(top.tolist()) & set(truth[j].tolist())) / 10)
            out.append({"M": m, "ef_search": ef, "build_s": round(build, 1), "recall@10": round(float(np.mean(rec)), 3),
                        "query_p95_ms": _p(lat, 95)})
    return out


def _locomo_vectors() -> np.ndarray | None:
    from persona_mw.eval.locomo import load, sessions

    data = Path(os.environ.get("LOCOMO", "/work/shared/data/locomo"))
    if not data.exists():
        return None
    from persona_mw.embeddings import default_embedder

    emb = default_embedder()
    texts = []
    for conv in load(str(data)):
        for _, _, msgs in sessions(conv):
            texts += [m["content"] for m in msgs]
    vecs = np.asarray(emb.embed(texts), dtype=np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def main() -> dict:
    rng = np.random.default_rng(7)
    out = Path(__file__).parent / "results" / "index_choice.json"
    parts = set(os.environ.get("INDEX_CHOICE_PARTS", "lexical,dense").split(","))
    if parts == {"random_recall"}:
        res0: dict = json.loads(out.read_text()) if out.exists() else {}
        load0 = [round(x, 2) for x in os.getloadavg()]
        res0["dense_random_10k"] = {"rows": random_recall(), "load_average": {
            "before": load0, "after": [round(x, 2) for x in os.getloadavg()]}}
        out.write_text(json.dumps(res0, indent=2) + "\n")
        return res0
    res: dict = json.loads(out.read_text()) if out.exists() and parts != {"lexical", "dense"} else {}
    res.update({"benchmark": "index_choice", "candidates": K_CAND})
    res["load_average_" + "_".join(sorted(parts))] = {"before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        if "lexical" not in parts:
            return dense_part(res, rng, parts, out)
        res["lexical"] = {"bm25s_1x100k": bm25s_case(1, 100_000, rng), "bm25s_1000x100": bm25s_case(1000, 100, rng),
                          "tantivy_1x100k": tantivy_case(1, 100_000, rng, tmp),
                          "tantivy_1000x100": tantivy_case(1000, 100, rng, tmp)}
        print(json.dumps(res["lexical"], indent=1), flush=True)
    return dense_part(res, rng, parts, out)


def dense_part(res: dict, rng: np.random.Generator, parts: set[str], out: Path) -> dict:
    n = int(os.environ.get("INDEX_CHOICE_DENSE_N", "100000"))
    mat = rng.standard_normal((n, 384)).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    res["dense"] = {f"synthetic_{n}": dense_case(mat, "random unit vectors (synthetic)", rng)}
    print(json.dumps(res["dense"], indent=1), flush=True)
    try:
        real = _locomo_vectors()
    except Exception as exc:  # noqa: BLE001 - the real-vector check is optional
        real, res["dense"]["locomo"] = None, f"skipped: {exc}"
    if real is not None:
        res["dense"]["locomo_turns"] = dense_case(real, "MiniLM vectors of every LoCoMo turn", rng)
    res["load_average_" + "_".join(sorted(parts))]["after"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["dense"], indent=1))
    return res


if __name__ == "__main__":
    main()
