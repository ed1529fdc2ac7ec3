"""The maintained memory indexes: HNSW (usearch) behind ``VectorIndex`` against the exact scan, BM25 on
bm25s against the Okapi/Lucene formula, and fused search over candidate sets against the exact fusion."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

from persona_mw.memory import MemoryManager
from persona_mw.memory import index as index_mod
from persona_mw.memory.index import AnnIndex, BM25Index, NumpyIndex, tokenize
from persona_mw.store import open_store

needs_usearch = pytest.mark.skipif(importlib.util.find_spec("usearch") is None,
                                   reason="usearch (the memory extra) is not installed")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres: structured like text embeddings, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@needs_usearch
def test_ann_recall_at_10_vs_exact_and_small_owners_stay_exact() -> None:
    vecs = clustered(3000, 64, 1)
    ids = [f"m{i}" for i in range(3000)]
    ann, exact = AnnIndex(64, threshold=1000, background=False), NumpyIndex(64)
    for ix in (ann, exact):
        ix.add("user:big", ids, vecs)
        ix.add("user:small", ids[:50], vecs[:50])
    queries = clustered(100, 64, 2)
    recall = []
    for q in queries:
        truth = {i for i, _ in exact.search("user:big", q, 10)}
        got = ann.search("user:big", q, 10)
        recall.append(len(truth & {i for i, _ in got}) / 10)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        assert ann.search("user:small", q, 10) == exact.search("user:small", q, 10)
    assert np.mean(recall) >= 0.98, np.mean(recall)
    assert ann.graph_owners() == ["user:big"]  # 50 vectors: scanned, no graph


@needs_usearch
def test_ann_probe_moments_and_scores_are_exact_after_writes() -> None:
    vecs = clustered(1500, 32, 3)
    ids = [f"m{i}" for i in range(1500)]
    ann, exact = AnnIndex(32, threshold=500, background=False), NumpyIndex(32)
    for ix in (ann, exact):
        ix.add("user:ana", ids[:1000], vecs[:1000])
    q = clustered(1, 32, 4)[0]
    ann.probe("user:ana", q, 10)  # the graph is built now; what follows is maintained incrementally
    for ix in (ann, exact):
        ix.add("user:ana", ids[1000:], vecs[1000:])
        ix.add("user:ana", ids[:20], vecs[-20:])  # re-adding an id replaces its vector
        ix.remove("user:ana", ids[100:300])
    a, e = ann.probe("user:ana", q, 50), exact.probe("user:ana", q, 50)
    assert a is not None and e is not None and a.approximate and not e.approximate
    assert a.n == e.n == 1300
    assert a.total == pytest.approx(e.total, abs=1e-3) and a.total_sq == pytest.approx(e.total_sq, rel=1e-4)
    probe_ids = ids[:5] + ids[150:155] + ["nope"]
    np.testing.assert_allclose(a.score_of(probe_ids), e.score_of(probe_ids), atol=1e-5)
    assert np.isnan(a.score_of(ids[150:155] + ["nope"])).all()  # removed and unknown ids have no score
    assert len(set(a.ids[:10]) & set(e.ids[:10])) >= 9


@needs_usearch
def test_ann_removed_vectors_are_gone_and_owners_isolated() -> None:
    vecs = clustered(1200, 32, 5)
    ids = [f"m{i}" for i in range(1200)]
    ann = AnnIndex(32, threshold=100, background=False)
    ann.add("user:ana", ids, vecs)
    ann.add("user:bob", ids[:200], vecs[:200])
    gone = set(ids[:600])
    ann.remove("user:ana", gone)
    for q in vecs[:50]:  # each query is a removed vector itself: the nearest possible hit
        hits = ann.search("user:ana", q, 20)
        assert hits and not gone & {i for i, _ in hits}
        assert {i for i, _ in ann.search("user:bob", q, 5)} <= set(ids[:200])
    assert ann.vectors("user:ana", ids[:10]) == {} and ann.size("user:ana") == 600
    ann.drop_owner("user:ana")
    assert ann.search("user:ana", vecs[700], 5) == [] and ann.probe("user:ana", vecs[700], 5) is None
    assert ann.size("user:bob") == 200 and "user:ana" not in ann.graph_owners()


@needs_usearch
def test_ann_background_build_never_blocks_and_keeps_writes_made_meanwhile(monkeypatch: Any) -> None:
    """The search that finds an owner at the threshold answers at once by the exact scan while the
    graph is built on a thread; vectors added, replaced and removed during the build are in the graph
    (and its score moments) when it takes over; a forget during a build discards that graph."""
    vecs = clustered(2600, 32, 11)
    ids = [f"m{i}" for i in range(2600)]
    ann, exact = AnnIndex(32, threshold=500), NumpyIndex(32)
    gate, started = threading.Event(), threading.Event()
    learn = index_mod._Graph.learn

    def held_learn(self: Any, rows: Any, v: Any, threads: int = 1) -> None:
        if threading.current_thread().name.startswith("persona-mw-hnsw"):
            started.set()
            assert gate.wait(30)  # the build holds here until the test has written
        learn(self, rows, v, threads)

    monkeypatch.setattr(index_mod._Graph, "learn", held_learn)
    for ix in (ann, exact):
        ix.add("user:ana", ids[:2000], vecs[:2000])
    q = vecs[7]
    assert ann.search("user:ana", q, 10) == exact.search("user:ana", q, 10)  # exact while building
    assert started.wait(30) and ann.graph_owners() == []
    for ix in (ann, exact):  # written while the build runs
        ix.add("user:ana", ids[2000:], vecs[2000:])
        ix.add("user:ana", ids[:30], vecs[-30:])
        ix.remove("user:ana", ids[100:400])
    gate.set()
    assert ann.wait("user:ana", 60) and ann.graph_owners() == ["user:ana"] and ann.builds == 1
    a, e = ann.probe("user:ana", q, 50), exact.probe("user:ana", q, 50)
    assert a is not None and e is not None and a.approximate and a.n == e.n == 2300
    assert a.total == pytest.approx(e.total, abs=1e-3) and a.total_sq == pytest.approx(e.total_sq, rel=1e-4)
    graph_keys = set(np.asarray(ann._graphs["user:ana"].index.keys).tolist())
    assert graph_keys == set(np.flatnonzero(ann._blocks["user:ana"].alive).tolist())
    for v in vecs[2000:2010]:  # an id added during the build is found through the graph
        assert ann.search("user:ana", v, 1)[0][0] == exact.search("user:ana", v, 1)[0][0]
    assert not {i for i, _ in ann.search("user:ana", vecs[150], 20)} & set(ids[100:400])
    # a forget while a build runs: the graph is thrown away, the owner starts again empty
    gate.clear()
    started.clear()
    ann.add("user:bob", ids[:600], vecs[:600])
    ann.search("user:bob", q, 5)
    assert started.wait(30)
    ann.drop_owner("user:bob")
    gate.set()
    assert ann.wait("user:bob", 60) and "user:bob" not in ann.graph_owners() and ann.size("user:bob") == 0


@needs_usearch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch (the local extra) is not installed")
def test_usearch_loaded_by_the_index_leaves_torch_tracing_working() -> None:
    """Loaded before torch, usearch's compiled module made TorchScript tracing (the MiniLM embedder's
    first call) throw C++ exceptions in a loop and never finish; the index imports torch first."""
    code = (
        "from persona_mw.memory.index import _usearch\n"
        "assert _usearch() is not None\n"
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return (x[:, :2] * 2).sum(-1)\n"
        "torch.jit.trace(M(), torch.ones(3, 4))\n"
        "print('traced')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "traced" in out.stdout, out.stderr[-2000:]


@needs_usearch
def test_a_process_exiting_during_a_graph_build_exits_cleanly() -> None:
    """A one-shot process (``persona-mw memory search``) that exits while a graph is being built: the
    build stops at its next chunk. A build thread still inside usearch at finalization had aborted
    the process (exit 134, "terminate called without an active exception")."""
    code = (
        "import time\n"
        "import numpy as np\n"
        "from persona_mw.memory.index import AnnIndex\n"
        "ix = AnnIndex(64, threshold=1000)\n"
        "x = np.random.default_rng(0).standard_normal((40000, 64)).astype(np.float32)\n"
        "x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "ix.add('user:ana', [f'm{i}' for i in range(40000)], x)\n"
        "assert ix.search('user:ana', x[0], 5)[0][0] == 'm0'\n"
        "time.sleep(0.5)\n"
        "assert ix._building, 'the build should still be running'\n"
        "print('exiting')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "exiting" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_ann_without_usearch_searches_exactly_and_says_so(monkeypatch: Any, caplog: Any) -> None:
    monkeypatch.setitem(sys.modules, "usearch.index", None)  # import fails as if not installed
    monkeypatch.setattr(index_mod, "_WARNED", set())
    vecs = clustered(300, 16, 6)
    ids = [f"m{i}" for i in range(300)]
    ann, exact = AnnIndex(16, threshold=100), NumpyIndex(16)
    ann.add("user:ana", ids, vecs)
    exact.add("user:ana", ids, vecs)
    with caplog.at_level(logging.WARNING, logger="persona_mw.memory"):
        assert ann.search("user:ana", vecs[3], 10) == exact.search("user:ana", vecs[3], 10)
    assert "persona-mw[memory]" in caplog.text and ann.graph_owners() == []


def lucene_bm25(docs: list[list[str]], query: list[str], k1: float = 1.2, b: float = 0.75) -> np.ndarray:
    """The reference formula, written out: idf = ln(1 + (N - df + .5)/(df + .5)), tf saturation by length."""
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    out = np.zeros(n)
    for t in set(query):
        df = sum(t in d for d in docs)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = Counter(d)[t]
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg)) if tf else 0.0
    return out


def test_tokenize_with_a_batch_memo_is_tokenize() -> None:
    """A load tokenizes an owner's texts with one word memo per batch; the tokens are the same."""
    texts = ["I liked the named gardens and the garden.", "東京で寿司を食べた 東京", "The THE the", "",
             "Named names, liked likes: running runs; 2024 in Lisbon!", "garden gardens gardening"]
    memo: dict[str, tuple[str, ...]] = {}
    assert [tokenize(t, memo) for t in texts] == [tokenize(t) for t in texts]
    assert memo and tokenize(texts[0], memo) == tokenize(texts[0])


def test_bm25_over_documents_without_tokens_scores_zero_without_a_warning() -> None:
    """An owner whose memories are all stopwords or punctuation: every score 0, and no numpy
    RuntimeWarning from bm25s dividing by an average length of 0 in the user's log."""
    import warnings

    ix = BM25Index()
    ix.add("user:ana", ["a", "b"], ["the and", "!!!"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ix.probe("user:ana", "the garden", 5)
    assert got is not None and got.n == 2 and got.total == 0.0 and ix.search("user:ana", "garden", 5) == []


def test_bm25_scores_are_okapi_over_live_documents_and_rebuild_lazily() -> None:
    rng = np.random.default_rng(7)
    words = "garden river violin sister nurse lisbon cat dinner hiking museum coffee winter".split()
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 9)))) for _ in range(80)]
    ids = [f"m{i}" for i in range(80)]
    ix = BM25Index()
    for i in range(0, 80, 8):  # a burst of writes: no rebuild until the next search
        ix.add("user:ana", ids[i:i + 8], texts[i:i + 8])
    ix.remove("user:ana", ids[:10])
    assert ix.rebuilds == 0
    query = "garden sister gardens"
    p = ix.probe("user:ana", query, 80)
    assert p is not None and ix.rebuilds == 1 and p.n == 70
    ref = lucene_bm25([tokenize(t) for t in texts[10:]], tokenize(query))
    np.testing.assert_allclose(p.score_of(ids[10:]), ref, rtol=1e-4, atol=1e-6)
    assert np.isnan(p.score_of(ids[:10])).all()
    assert p.total == pytest.approx(ref.sum(), rel=1e-4) and p.total_sq == pytest.approx((ref ** 2).sum(), rel=1e-4)
    hits = ix.search("user:ana", query, 5)
    assert [h for h, _ in hits] == [ids[10 + i] for i in np.argsort(-ref, kind="stable")[:5]]
    ix.search("user:ana", "river", 5)
    assert ix.rebuilds == 1  # nothing written since: the same matrix
    assert ix.search("user:bob", query, 5) == [] and ix.search("user:ana", "zzz unknown", 5) == []


def _bm25_with_stats(stats_docs: list[list[str]], docs: list[list[str]], query: list[str], k1: float = 1.2,
                     b: float = 0.75) -> np.ndarray:
    """``docs`` scored with the document count, frequencies and average length of ``stats_docs``."""
    n, avg = len(stats_docs), sum(map(len, stats_docs)) / len(stats_docs)
    out = np.zeros(len(docs))
    for t in set(query):
        df = sum(t in d for d in stats_docs)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = Counter(d)[t]
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg)) if tf else 0.0
    return out


def _corpus(n: int, seed: int = 3) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    words = "garden river violin sister nurse lisbon cat dinner hiking museum coffee winter".split()
    return [f"m{i}" for i in range(n)], [" ".join(rng.choice(words, int(rng.integers(1, 9)))) for _ in range(n)]


def test_bm25_a_large_owner_rebuilds_once_its_writes_reach_the_share() -> None:
    """Below ``rebuild_share`` of the last build (and ``rebuild_min``) written documents, no rebuild
    starts; the written ones are searchable all the same."""
    ids, texts = _corpus(300)
    ix = BM25Index(background_min=50, rebuild_share=0.05, rebuild_min=3)
    ix.add("u", ids[:200], texts[:200])
    ix.search("u", "garden", 3)
    for i in range(200, 209):  # 9 < 5% of 200
        ix.add("u", [ids[i]], [texts[i]])
        hits = {h for h, _ in ix.search("u", texts[i], 300)}
        assert ids[i] in hits and ix.rebuilds == 1 and ix.wait("u", 0)
    ix.add("u", [ids[209]], [texts[209]])  # the 10th: a rebuild on a thread
    ix.search("u", "garden", 3)
    assert ix.wait("u", 10) and ix.rebuilds == 2
    p = ix.probe("u", "garden winter", 300)
    assert p is not None and p.n == 210
    np.testing.assert_allclose(p.score_of(ids[:210]), lucene_bm25([tokenize(t) for t in texts[:210]],
                                                                  tokenize("garden winter")), rtol=1e-4, atol=1e-6)


def test_bm25_writes_to_a_large_owner_are_searchable_at_once_and_exact_after_the_thread_rebuild(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ``background_min`` a write does not make the next search rebuild the owner's matrix: the
    search reads the last matrix less its stale rows plus the written documents, scored with the last
    build's statistics, while the rebuild runs on a thread; once it is installed every score is exact."""
    ids, texts = _corpus(120)
    ix = BM25Index(background_min=50, rebuild_share=0, rebuild_min=1)
    ix.add("user:ana", ids[:100], texts[:100])
    query = "garden sister violin"
    ix.probe("user:ana", query, 10)
    assert ix.rebuilds == 1
    gate, entered = threading.Event(), threading.Event()
    build = ix._build

    def slow_build(*a: Any) -> Any:
        entered.set()
        assert gate.wait(10)
        return build(*a)

    monkeypatch.setattr(ix, "_build", slow_build)
    ix.add("user:ana", ids[100:110], texts[100:110])  # new documents
    ix.add("user:ana", ["m3"], ["violin violin sister"])  # a document replaced
    ix.remove("user:ana", ["m4", "m105"])  # one of the built matrix, one just written
    p = ix.probe("user:ana", query, 200)
    assert p is not None and ix.rebuilds == 1 and entered.wait(10)  # the search did not wait for the build
    live = [i for i in ids[:110] if i not in ("m4", "m105")]
    text = dict(zip(ids, texts)) | {"m3": "violin violin sister"}
    old = [tokenize(t) for t in texts[:100]]  # what the last build counted
    ref = _bm25_with_stats(old, [tokenize(text[i]) for i in live], tokenize(query))
    np.testing.assert_allclose(p.score_of(live), ref, rtol=1e-4, atol=1e-6)
    assert np.isnan(p.score_of(["m4", "m105", "nope"])).all()
    assert p.n == len(live) and p.total == pytest.approx(ref.sum(), rel=1e-4)
    assert p.total_sq == pytest.approx((ref ** 2).sum(), rel=1e-4)
    assert sorted(p.ids) == sorted(live)  # k above the count: every live document, no stale row
    assert ix.search("user:ana", "violin violin", 1)[0][0] == "m3"
    ix.add("user:ana", ids[110:], texts[110:])  # written while the thread builds
    gate.set()
    assert ix.wait("user:ana", 10) and ix.rebuilds == 2
    live += ids[110:]
    p = ix.probe("user:ana", query, 200)
    assert p is not None and p.n == len(live)
    built = [tokenize(text[i]) for i in live[:-10]]  # the thread's snapshot; the last 10 are its delta
    np.testing.assert_allclose(p.score_of(live), _bm25_with_stats(built, [tokenize(text[i]) for i in live],
                                                                  tokenize(query)), rtol=1e-4, atol=1e-6)
    assert ix.wait("user:ana", 10) and ix.rebuilds == 3  # that search started the next build
    p = ix.probe("user:ana", query, 200)
    assert p is not None and ix.rebuilds == 3
    exact = lucene_bm25([tokenize(text[i]) for i in live], tokenize(query))
    np.testing.assert_allclose(p.score_of(live), exact, rtol=1e-4, atol=1e-6)


def test_bm25_rebuilds_inline_for_small_owners_large_deltas_a_failed_thread_and_a_dropped_owner(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ids, texts = _corpus(400)
    small = BM25Index(background_min=1000)
    small.add("u", ids, texts)
    small.search("u", "garden", 3)
    small.add("u", ["x"], ["garden garden"])
    assert small.search("u", "garden", 1)[0][0] == "x" and small.rebuilds == 2  # below the bar: inline

    ix = BM25Index(background_min=50, max_delta=20, rebuild_share=0, rebuild_min=1)
    ix.add("u", ids[:300], texts[:300])
    ix.search("u", "garden", 3)
    ix.add("u", ids[300:], texts[300:])  # 100 written: more than max_delta
    ix.search("u", "garden", 3)
    assert ix.rebuilds == 2 and ix.wait("u", 0)  # inline, no thread
    exact = lucene_bm25([tokenize(t) for t in texts], tokenize("garden"))
    p = ix.probe("u", "garden", 5)
    assert p is not None
    np.testing.assert_allclose(p.score_of(ids), exact, rtol=1e-4, atol=1e-6)

    def broken(*a: Any) -> Any:
        raise MemoryError("no room")

    monkeypatch.setattr(ix, "_build", broken)
    ix.add("u", ["y"], ["river"])
    with caplog.at_level(logging.ERROR, logger="persona_mw.memory"):
        assert ix.search("u", "river", 400)  # the thread fails; this search reads the segments
        assert ix.wait("u", 10)
    assert "BM25 rebuild of one owner failed" in caplog.text
    monkeypatch.undo()
    ix.add("u", ["z"], ["river"])
    assert {"y", "z"} <= {h for h, _ in ix.search("u", "river", 400)} and ix.rebuilds == 3  # inline, once

    gate = threading.Event()
    build = ix._build
    monkeypatch.setattr(ix, "_build", lambda *a: (gate.wait(10), build(*a))[1])
    ix.add("u", ["w"], ["museum"])
    ix.search("u", "museum", 3)
    ix.drop_owner("u")  # forget while the thread builds
    gate.set()
    assert ix.wait("u", 10) and ix.rebuilds == 3 and ix.search("u", "museum", 3) == [] and ix.size("u") == 0


class HashEmbedder:
    """Bag-of-words vectors (hashed tokens, normalised): deterministic, related texts are near."""

    name, dim, loaded = "hash-bow", 48, True

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for r, text in enumerate(texts):
            for tok in tokenize(text) or ["_"]:
                h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
                out[r, h % self.dim] += 1.0 + (h >> 32) % 7 / 7
            out[r] += 0.05
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _turns(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    words = ("garden river violin sister nurse lisbon cat dinner hiking museum coffee winter budget "
             "camera novel train ticket festival doctor yoga soccer guitar bakery market").split()
    return [{"role": "user", "content": "I talked about the " + " ".join(rng.choice(words, 5)), "id": f"t{i}",
             "session": i // 40} for i in range(n)]


@needs_usearch
def test_fused_over_candidates_matches_exact_fusion(store_url: Any) -> None:
    """Mode fused with the HNSW graph (threshold below the user's size) ranks like the exact reference;
    below the threshold the two are the same search."""
    store = open_store(store_url())
    emb = HashEmbedder()
    writer = MemoryManager(store, embedder=emb, dense_index="exact")
    writer.add_raw("ana", _turns(1500, 8))
    writer.add_raw("bob", _turns(60, 9))
    exact = MemoryManager(store, embedder=emb, dense_index="exact")
    ann = MemoryManager(store, embedder=emb, dense_index="ann", ann_threshold=500)
    assert ann.search("ana", "garden", k=10)  # starts the graphs' builds (turns and windows)
    assert isinstance(ann.index, AnnIndex) and ann.index.wait("user:ana", 60)
    assert ann._win_index is not None and ann._win_index.wait("user:ana", 60)  # type: ignore[attr-defined]
    overlap = []
    for q in ("when did I talk about the garden and my sister", "violin lessons in lisbon", "coffee budget",
              "train ticket to the festival", "doctor and yoga in winter"):
        e, a = exact.search("ana", q, k=10), ann.search("ana", q, k=10)
        assert all(h.memory.owner == "user:ana" for h in a)
        overlap.append(len({h.memory.id for h in e} & {h.memory.id for h in a}) / 10)
        assert [h.memory.id for h in exact.search("bob", q, k=10)] == [h.memory.id for h in ann.search("bob", q, k=10)]
    assert np.mean(overlap) >= 0.9, overlap
    assert isinstance(ann.index, AnnIndex) and "user:ana" in ann.index.graph_owners()
    assert "user:bob" not in ann.index.graph_owners()
    store.close()


@needs_usearch
def test_forget_in_another_process_clears_a_graph_owner(store_url: Any) -> None:
    """The forget epoch still invalidates a cached user whose vectors sit in an HNSW graph; a fresh
    manager (another process) sees what was written before it loaded."""
    path = store_url()
    s1, s2 = open_store(path), open_store(path)
    emb = HashEmbedder()
    a = MemoryManager(s1, embedder=emb, dense_index="ann", ann_threshold=200, ann_background=False)
    a.add_raw("ana", _turns(400, 10))
    assert a.search("ana", "garden sister", k=5)
    assert "user:ana" in a.index.graph_owners()
    b = MemoryManager(s2, embedder=emb, dense_index="ann", ann_threshold=200, ann_background=False)
    assert len(b.search("ana", "garden sister", k=5)) == 5  # loaded from the store: sees a's writes
    s2.forget_user("ana")  # what `persona-mw profile forget` runs in its own process
    assert a.search("ana", "garden sister", k=5) == []
    assert "user:ana" not in a.index.graph_owners() and a.index.size("user:ana") == 0
    s1.close()
    s2.close()


def test_a_large_users_new_turn_is_found_at_once_and_a_forget_during_the_rebuild_keeps_nothing(
        store_url: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the manager on the real store: a user above ``background_min`` stores a turn; the next
    search finds it by its words while the matrix rebuilds on a thread; forgetting the user during that
    build leaves nothing of them in the lexical index or in the answers."""
    store = open_store(store_url())
    mm = MemoryManager(store, embedder=HashEmbedder(), dense_index="exact")
    mm.bm25 = BM25Index(background_min=100, rebuild_share=0, rebuild_min=1)
    mm.bm25_window = BM25Index(background_min=100, rebuild_share=0, rebuild_min=1)
    mm.add_raw("ana", _turns(300, 12))
    assert mm.search("ana", "garden violin", k=5, mode="bm25") and mm.bm25.rebuilds == 1
    gate = threading.Event()
    build = mm.bm25._build
    monkeypatch.setattr(mm.bm25, "_build", lambda *a: (gate.wait(10), build(*a))[1])
    mm.add_raw("ana", [{"role": "user", "content": "We flew over the fjords in a zeppelin", "id": "z1"}])
    for mode in ("bm25", "fused"):
        hits = mm.search("ana", "the zeppelin over the fjords", k=3, mode=mode)
        assert hits and hits[0].memory.provenance == ["z1"], mode
    assert not mm.bm25.wait("user:ana", 0)  # the rebuild is still running: the search did not wait
    assert mm.forget("ana") == 301
    gate.set()
    assert mm.bm25.wait("user:ana", 10) and mm.bm25.size("user:ana") == 0
    assert mm.search("ana", "the zeppelin over the fjords", k=3, mode="bm25") == []
    store.close()
