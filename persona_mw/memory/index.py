"""Memory indexes: dense (exact numpy scan, HNSW via ``usearch``), BM25 (``bm25s``), fusion, dates.

Everything is kept per owner node (``user:ana``, ``group:acme``...), so a search only ever looks at
the nodes of the request's scope. ``VectorIndex`` is the interface a dense backend implements;
``NumpyIndex`` is the exact reference, ``AnnIndex`` the default: exact below ``threshold`` live vectors
per owner, an HNSW graph (``usearch``, the ``memory`` extra) above it. Lexical search is ``bm25s``
fed our own tokens (``tokenize``). A search hands the fusion a ``Probe``: the top candidates, the
exact score of any other id, and the score moments over all of the owner's rows (z-normalisation).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from persona_mw.text import content_stem

log = logging.getLogger("persona_mw.memory")

# ----------------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """One index's answer for one owner and one query, the input of score fusion over candidate sets.

    ``ids``/``scores``: the best candidates, best first, with exact scores; ``score_of(ids)``: the exact
    score of any ids (NaN for ids the index does not hold); ``n``, ``total``, ``total_sq``: count, sum and
    sum of squares of the score over every live row of the owner (exact for an ANN owner too), which
    z-normalise a signal without scoring every row."""

    ids: list[str]
    scores: np.ndarray
    n: int
    total: float
    total_sq: float
    score_of: Callable[[Sequence[str]], np.ndarray]
    approximate: bool = False


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest finite scores, best first (ties: lower position first)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    top = top[np.argsort(-scores[top], kind="stable")]
    kept: np.ndarray = top[np.isfinite(scores[top])]
    return kept


def _lookup(rowmap: dict[str, int], scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    rows = np.fromiter((rowmap.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
    ok = (rows >= 0) & (rows < len(scores))
    return np.where(ok, scores[np.where(ok, rows, 0)], np.nan) if len(scores) else np.full(len(ids), np.nan)


# ----------------------------------------------------------------------------------- dense


@runtime_checkable
class VectorIndex(Protocol):
    """Per-owner vector search. Vectors are L2-normalized rows; scores are cosine similarities."""

    def add(self, owner: str, ids: Sequence[str], vectors: np.ndarray) -> None: ...
    def remove(self, owner: str, ids: Iterable[str]) -> None: ...
    def drop_owner(self, owner: str) -> None: ...
    def search(self, owner: str, query: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def size(self, owner: str) -> int: ...
    def owners(self) -> list[str]: ...


class _Block:
    """One owner's vectors: a growable float32 matrix, an id per row, and a live mask."""

    __slots__ = ("ids", "row", "mat", "alive", "n", "n_alive", "touched")

    def __init__(self, dim: int) -> None:
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.mat = np.zeros((8, dim), dtype=np.float32)
        self.alive = np.zeros(8, dtype=bool)
        self.n = 0
        self.n_alive = 0
        # rows written (added, replaced, removed) while a graph of this block is built in the background;
        # None when no build runs. The build applies them to the graph before it is used.
        self.touched: set[int] | None = None

    def add(self, ids: Sequence[str], vecs: np.ndarray) -> None:
        need = self.n + len(ids)
        if need > len(self.mat):
            cap = max(need, 2 * len(self.mat))
            mat = np.zeros((cap, self.mat.shape[1]), dtype=np.float32)
            mat[: self.n] = self.mat[: self.n]
            alive = np.zeros(cap, dtype=bool)
            alive[: self.n] = self.alive[: self.n]
            self.mat, self.alive = mat, alive
        for i, mid in enumerate(ids):
            old = self.row.get(mid)
            if old is not None:  # re-adding an id replaces its vector in place
                self.mat[old] = vecs[i]
                if self.touched is not None:
                    self.touched.add(old)
                continue
            self.mat[self.n] = vecs[i]
            self.alive[self.n] = True
            self.row[mid] = self.n
            if self.touched is not None:
                self.touched.add(self.n)
            self.ids.append(mid)
            self.n += 1
            self.n_alive += 1


class NumpyIndex:
    """Exact cosine search over each owner's matrix (one matrix-vector product per owner): the reference."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._blocks: dict[str, _Block] = {}
        self._lock = threading.RLock()

    def add(self, owner: str, ids: Sequence[str], vectors: np.ndarray) -> None:
        if not len(ids):
            return
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        with self._lock:
            self._blocks.setdefault(owner, _Block(self.dim)).add(ids, vecs)

    def remove(self, owner: str, ids: Iterable[str]) -> None:
        with self._lock:
            b = self._blocks.get(owner)
            if b is None:
                return
            for mid in ids:
                r = b.row.pop(mid, None)
                if r is not None:
                    if b.touched is not None:
                        b.touched.add(r)
                    b.alive[r] = False
                    b.mat[r] = 0.0  # the vector itself is gone, not just hidden
                    b.n_alive -= 1

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            self._blocks.pop(owner, None)

    def _exact(self, b: _Block, query: np.ndarray) -> np.ndarray:
        """Cosine of ``query`` with every row (-inf for removed rows)."""
        s = b.mat[: b.n] @ np.asarray(query, dtype=np.float32).reshape(-1)
        return np.where(b.alive[: b.n], s, -np.inf)

    def search(self, owner: str, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        with self._lock:
            b = self._blocks.get(owner)
            if b is None or b.n_alive == 0 or k <= 0:
                return []
            s = self._exact(b, query)
            return [(b.ids[i], float(s[i])) for i in _top(s, k)]

    def probe(self, owner: str, query: np.ndarray, k: int) -> Probe | None:
        """The ``k`` nearest rows, exact scores for any id, and the moments of every row's score."""
        with self._lock:
            b = self._blocks.get(owner)
            if b is None or b.n_alive == 0:
                return None
            s = self._exact(b, query)
            live = s[b.alive[: b.n]].astype(np.float64)
            top = _top(s, k)
            full = np.where(np.isfinite(s), s, np.nan).astype(np.float64)
            # not copied (100k entries would cost ms per query): a row added later is past the end of
            # ``full``, a row removed later is no longer in the map; both read as NaN
            rowmap = b.row
        return Probe([b.ids[i] for i in top], full[top], len(live), float(live.sum()), float((live * live).sum()),
                     lambda ids: _lookup(rowmap, full, ids))

    def dot(self, owner: str, ids: Sequence[str], vector: np.ndarray) -> np.ndarray:
        """Each of ``ids``' stored vector dotted with ``vector`` (NaN for ids the owner lacks), without
        copying the vectors out."""
        with self._lock:
            b = self._blocks.get(owner)
            if b is None:
                return np.full(len(ids), np.nan)
            rows = np.fromiter((b.row.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
            out = np.full(len(ids), np.nan)
            ok = rows >= 0
            out[ok] = b.mat[rows[ok]] @ np.asarray(vector, dtype=np.float32).reshape(-1)
            return out

    def vectors(self, owner: str, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors of ``ids`` (those the owner has)."""
        with self._lock:
            b = self._blocks.get(owner)
            if b is None:
                return {}
            return {mid: b.mat[r].copy() for mid in ids if (r := b.row.get(mid)) is not None}

    def size(self, owner: str) -> int:
        with self._lock:
            b = self._blocks.get(owner)
            return 0 if b is None else b.n_alive

    def owners(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def has(self, owner: str, memory_id: str) -> bool:
        with self._lock:
            b = self._blocks.get(owner)
            return b is not None and memory_id in b.row


_WARNED: set[str] = set()


def _usearch() -> Any:
    """The ``usearch.index`` module, or None (warned once: search stays exact).

    torch, when installed, is imported first: loaded before torch, usearch's compiled module makes
    torch's TorchScript tracing (the MiniLM embedder's first call) throw C++ exceptions in a loop
    and never finish (usearch 2.26, torch 2.13; tests/memory/test_index.py)."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401
    try:
        import usearch.index as ui
    except ImportError:
        if "usearch" not in _WARNED:
            _WARNED.add("usearch")
            log.warning("memory index 'ann' needs usearch (pip install 'persona-mw[memory]'); searching exactly")
        return None
    return ui


# Set when the interpreter starts to exit: a background graph build stops at its next chunk. A build
# thread still inside usearch when the interpreter finalizes aborts the process ("terminate called
# without an active exception", exit 134: measured with a CLI search of a 60,000-vector owner), so the
# builds are non-daemon threads that notice this between chunks, and exit waits for at most one chunk.
_EXITING = threading.Event()
_register_atexit = getattr(threading, "_register_atexit", None)  # runs before non-daemon threads are joined
if _register_atexit is not None:
    _register_atexit(_EXITING.set)
_BUILD_CHUNK = 2048


class _BuildCancelled(Exception):
    pass


class _Graph:
    """An owner's HNSW graph (keys = matrix rows) and the score moments of its live vectors:
    ``sum`` (mean score = q . sum / n) and ``gram`` = sum of x x^T (mean square = q^T gram q / n)."""

    __slots__ = ("index", "sum", "gram")

    def __init__(self, index: Any, dim: int) -> None:
        self.index = index
        self.sum = np.zeros(dim, dtype=np.float64)
        self.gram = np.zeros((dim, dim), dtype=np.float64)

    def learn(self, rows: np.ndarray, vecs: np.ndarray, threads: int = 1) -> None:
        if len(rows):
            self.index.add(rows.astype(np.uint64), vecs, threads=threads)
            x = vecs.astype(np.float64)
            self.sum += x.sum(axis=0)
            self.gram += x.T @ x

    def forget(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        if len(rows):
            self.index.remove(rows.astype(np.uint64))
            x = vecs.astype(np.float64)
            self.sum -= x.sum(axis=0)
            self.gram -= x.T @ x


class _ThreadBuilds:
    """Per-owner builds on threads (an HNSW graph, a BM25 matrix): ``_building`` holds each running
    build's event, set when it ends; ``wait(owner)`` waits for one."""

    _lock: Any
    _building: dict[str, threading.Event]

    def wait(self, owner: str, timeout: float | None = None) -> bool:
        """Wait for a build of ``owner``'s index on a thread; True when none is running any more."""
        with self._lock:
            ev = self._building.get(owner)
        return True if ev is None else ev.wait(timeout)


class AnnIndex(_ThreadBuilds, NumpyIndex):
    """``NumpyIndex`` plus an HNSW graph (``usearch``) for each owner with at least ``threshold`` live
    vectors: candidates come from the graph, their scores are exact (the float32 rows stay the truth);
    smaller owners are scanned exactly (a graph over 50 vectors buys nothing). Removing a vector takes
    it out of the graph and the matrix; ``drop_owner`` drops both. Without usearch: exact, warned once.

    ``background`` (default): an owner that reaches the threshold is searched exactly while its graph
    is built on a thread (tens of seconds at 100,000 vectors: no search waits for it); writes made
    during the build are applied to the graph before it is used. ``False``: built inline, by the
    search that finds the owner at the threshold (tests, benchmarks). ``wait(owner)`` waits for a build.
    """

    def __init__(self, dim: int, threshold: int = 10_000, ef_search: int = 128, connectivity: int = 16,
                 ef_add: int = 128, dtype: str = "f16", background: bool = True, build_threads: int = 1) -> None:
        super().__init__(dim)
        self.threshold = max(1, int(threshold))
        self.ef_search, self.connectivity, self.ef_add, self.dtype = ef_search, connectivity, ef_add, dtype
        self.background, self.build_threads = background, max(1, int(build_threads))
        self._graphs: dict[str, _Graph] = {}
        self._building: dict[str, threading.Event] = {}
        self._failed: set[str] = set()  # owners whose build raised: exact until dropped, not retried per search
        self.builds = 0  # graphs built (a test counts them)

    def _new_graph(self, ui: Any) -> _Graph:
        return _Graph(ui.Index(ndim=self.dim, metric="ip", dtype=self.dtype, connectivity=self.connectivity,
                               expansion_add=self.ef_add, expansion_search=self.ef_search), self.dim)

    def _graph(self, owner: str, b: _Block) -> _Graph | None:
        """The owner's graph when it is ready (under the lock); an owner grown to the threshold gets
        one built: inline, or started on a thread (None until then: the caller scans exactly)."""
        g = self._graphs.get(owner)
        if g is not None or b.n_alive < self.threshold or owner in self._building or owner in self._failed:
            return g
        ui = _usearch()
        if ui is None:
            return None
        rows = np.flatnonzero(b.alive[: b.n])
        if not self.background:
            g = self._new_graph(ui)
            g.learn(rows, b.mat[rows], self.build_threads)
            self._graphs[owner] = g
            self.builds += 1
            return g
        if _EXITING.is_set():
            return None
        done = self._building[owner] = threading.Event()
        b.touched = set()
        snap = b.mat[rows].copy()  # the build reads this copy, never the live matrix
        threading.Thread(target=self._build, args=(owner, b, rows, snap, ui, done), daemon=False,
                         name=f"persona-mw-hnsw-{len(self._building)}").start()
        return None

    def _build(self, owner: str, b: _Block, rows: np.ndarray, snap: np.ndarray, ui: Any,
               done: threading.Event) -> None:
        """A background build: the graph of the snapshot ``rows``/``snap`` outside the lock, then,
        under it, the rows written meanwhile (``b.touched``) taken out and put back as they are now."""
        try:
            g = self._new_graph(ui)
            for i in range(0, len(rows), _BUILD_CHUNK):  # in chunks: an exiting process waits for one
                if _EXITING.is_set():
                    raise _BuildCancelled
                g.learn(rows[i:i + _BUILD_CHUNK], snap[i:i + _BUILD_CHUNK], self.build_threads)
            with self._lock:
                if self._blocks.get(owner) is not b:  # dropped (forget) while building: discard
                    return
                pos = {int(r): i for i, r in enumerate(rows)}
                touched = sorted(b.touched or ())
                old = [r for r in touched if r in pos]
                g.forget(np.asarray(old, dtype=np.int64), snap[[pos[r] for r in old]])
                new = np.asarray([r for r in touched if b.alive[r]], dtype=np.int64)
                g.learn(new, b.mat[new], self.build_threads)
                self._graphs[owner] = g
                self.builds += 1
        except _BuildCancelled:
            pass
        except Exception:  # noqa: BLE001 - a failed build leaves the owner on the exact scan, said once
            log.exception("HNSW graph build for one owner failed; its searches stay exact")
            with self._lock:
                if self._blocks.get(owner) is b:
                    self._failed.add(owner)
        finally:
            with self._lock:
                b.touched = None
                self._building.pop(owner, None)
            done.set()

    def add(self, owner: str, ids: Sequence[str], vectors: np.ndarray) -> None:
        if not len(ids):
            return
        with self._lock:
            g = self._graphs.get(owner)
            b = self._blocks.get(owner)
            if g is not None and b is not None:
                old = np.asarray(sorted({r for mid in ids if (r := b.row.get(mid)) is not None}), dtype=np.int64)
                g.forget(old, b.mat[old])
            super().add(owner, ids, vectors)
            if g is not None:
                b = self._blocks[owner]
                rows = np.asarray(sorted({b.row[mid] for mid in ids}), dtype=np.int64)
                g.learn(rows, b.mat[rows])

    def remove(self, owner: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        with self._lock:
            g = self._graphs.get(owner)
            b = self._blocks.get(owner)
            if g is not None and b is not None:
                rows = np.asarray(sorted({r for mid in ids if (r := b.row.get(mid)) is not None}), dtype=np.int64)
                g.forget(rows, b.mat[rows])
            super().remove(owner, ids)

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            self._graphs.pop(owner, None)
            self._failed.discard(owner)
            super().drop_owner(owner)

    def _ann(self, b: _Block, g: _Graph, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the graph's ``k`` best candidates and their exact scores, best first."""
        k = min(k, b.n_alive)
        got = g.index.search(q, k)
        rows = np.asarray(got.keys, dtype=np.int64)
        rows = rows[(rows >= 0) & (rows < b.n)]
        rows = rows[b.alive[rows]]
        s = (b.mat[rows] @ q).astype(np.float64)
        order = np.argsort(-s, kind="stable")
        return rows[order], s[order]

    def search(self, owner: str, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        with self._lock:
            b = self._blocks.get(owner)
            g = None if b is None else self._graph(owner, b)
            if b is None or g is None or k <= 0:
                return super().search(owner, query, k)
            rows, s = self._ann(b, g, np.asarray(query, dtype=np.float32).reshape(-1), k)
            return [(b.ids[r], float(v)) for r, v in zip(rows, s)]

    def probe(self, owner: str, query: np.ndarray, k: int) -> Probe | None:
        with self._lock:
            b = self._blocks.get(owner)
            g = None if b is None else self._graph(owner, b)
            if b is None or g is None:
                return super().probe(owner, query, k)
            q = np.asarray(query, dtype=np.float32).reshape(-1)
            rows, s = self._ann(b, g, q, k)
            q64 = q.astype(np.float64)
            total, total_sq = float(q64 @ g.sum), float(q64 @ g.gram @ q64)
            ids = [b.ids[r] for r in rows]
            n = b.n_alive

        def score_of(want: Sequence[str]) -> np.ndarray:
            return self.dot(owner, want, q)

        return Probe(ids, s, n, total, total_sq, score_of, approximate=True)

    def graph_owners(self) -> list[str]:
        """Owners searched through a graph now."""
        with self._lock:
            return list(self._graphs)


def make_vector_index(kind: str, dim: int, threshold: int = 10_000, background: bool = True) -> NumpyIndex:
    """``exact``: ``NumpyIndex``; ``ann``: ``AnnIndex`` (exact below ``threshold`` vectors per owner;
    ``background``: graphs built on a thread while the owner is scanned exactly)."""
    if kind == "exact":
        return NumpyIndex(dim)
    if kind == "ann":
        return AnnIndex(dim, threshold=threshold, background=background)
    raise ValueError(f"unknown memory index {kind!r} (exact, ann)")


def probe(ix: Any, owner: str, query: Any, k: int) -> Probe | None:
    """``ix.probe`` where the index has one; for another ``VectorIndex``: its top ``k``, moments over those."""
    fn = getattr(ix, "probe", None)
    if fn is not None:
        got: Probe | None = fn(owner, query, k)
        return got
    hits = ix.search(owner, query, k)
    if not hits:
        return None
    s = np.asarray([v for _, v in hits], dtype=np.float64)
    rowmap = {mid: i for i, (mid, _) in enumerate(hits)}
    return Probe([mid for mid, _ in hits], s, len(s), float(s.sum()), float((s * s).sum()),
                 lambda ids: _lookup(rowmap, s, ids), approximate=True)


# ----------------------------------------------------------------------------------- BM25

_TOKEN = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being am do does did "
    "i me my mine we our you your he him his she her it its they them their this that these those what which "
    "who whom whose when where why how there here so too very just can could would should will shall may "
    "might must have has had not no nor than then also about into over under up down out off again once "
    "all any both each few more most other some such only own same s t d ll m re ve y don didn doesn "
    "hey hi oh yeah yes wow really thanks thank".split())


def _stem(w: str) -> str:
    """``persona_mw.text.content_stem`` with a final e dropped: "name"/"named"/"names" and
    "like"/"liked" meet at one form in the index."""
    w = content_stem(w)
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def _word_tokens(w: str) -> tuple[str, ...]:
    if _CJK.search(w):
        return tuple(w[i:i + 2] for i in range(max(1, len(w) - 1)))
    return () if w in STOPWORDS else (_stem(w),)


def tokenize(text: str, memo: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Lowercased, stemmed word tokens without stopwords; CJK runs become character bigrams.

    ``memo``: word -> its tokens, shared by the texts of one batch (one owner's load reads each word
    thousands of times). Never shared across calls: a process-wide cache would let one user's words
    make another's requests faster."""
    out: list[str] = []
    for w in _TOKEN.findall(text.lower()):
        if memo is None:
            out.extend(_word_tokens(w))
            continue
        got = memo.get(w)
        if got is None:
            got = memo[w] = _word_tokens(w)
        out.extend(got)
    return out


class _LexBlock:
    """One owner's documents as token ids (``vocab``: token -> id, only grows), and the last bm25s
    index built over them (``model``, ``ids``: position -> id, ``pos``: id -> position, and the
    statistics it was built with: ``n_docs``, ``avgdl``, ``df``). ``changed``: the ids written
    (added, replaced or removed) since that build's snapshot; their rows in ``model`` are stale and the
    live ones are scored as a small second segment (``BM25Index``). ``pending``: the same for a build
    running on a thread (``None`` when none runs)."""

    __slots__ = ("toks", "vocab", "model", "pos", "ids", "n_docs", "avgdl", "df", "changed", "pending",
                 "view", "built", "gen", "installed")

    def __init__(self) -> None:
        self.toks: dict[str, list[int]] = {}
        self.vocab: dict[str, int] = {"": 0}  # bm25s scores documents without tokens through ""
        self.model: Any = None
        self.pos: dict[str, int] = {}
        self.ids: list[str] = []
        self.n_docs, self.avgdl = 0, 0.0
        self.df = np.zeros(0, dtype=np.int64)
        self.changed: set[str] = set()
        self.pending: set[str] | None = None
        self.view: _LexView | None = None  # the segments' layout since the last write (cached)
        self.built = False
        self.gen = 0  # snapshots taken
        self.installed = 0  # the snapshot ``model`` was built from


@dataclass
class _LexView:
    """How the two segments read until the next write: the delta's ids (scored after the main matrix's
    rows, so at positions ``len(main) + j``), the main rows that are stale (their position: NaN), and
    an id -> position lookup over both."""

    delta: list[str]
    stale: np.ndarray
    rows: _Rows
    ids: list[str]  # position -> id over both segments


class _Rows:
    """id -> position over the main segment (less its stale ids) and the delta after it."""

    __slots__ = ("main", "stale", "delta")

    def __init__(self, main: dict[str, int], stale: set[str], delta: dict[str, int]) -> None:
        self.main, self.stale, self.delta = main, stale, delta

    def get(self, mid: str, default: int = -1) -> int:
        got = self.delta.get(mid)
        if got is not None:
            return got
        return default if mid in self.stale else self.main.get(mid, default)


class BM25Index(_ThreadBuilds):
    """Okapi BM25 (Lucene's idf, k1=1.2, b=0.75) over each owner's memories, on ``bm25s`` sparse
    matrices fed our own tokens (``tokenize``).

    Writes only change the token lists. An owner's matrix is rebuilt from them (``rebuilds`` counts the
    builds):

    - inline, by the next search after a write (a burst of writes costs one rebuild), for an owner
      below ``background_min`` documents (milliseconds there: 12 ms at 2,000), for one with more than
      ``max_delta`` documents written since its last build (a bulk load), and when ``background`` is
      False. Scores are then exact BM25 over the owner's live documents.
    - otherwise the last matrix keeps serving: a search reads it less its stale rows (documents removed
      or replaced since), plus the documents written since as a second segment, scored with the last
      build's statistics (document count, document frequencies, average length). A memory is
      searchable by its words as soon as it is written, and no search waits for a rebuild: a
      100,000-document matrix takes 0.6 s to build, which a user who writes every turn (``store_turns``)
      used to pay on every search. Once the writes reach ``rebuild_share`` of the last build (at least
      ``rebuild_min``), a rebuild starts on a thread; searches meanwhile read the segments, and the new
      matrix is installed with the writes made during its build as its second segment. Until then the
      scores differ from exact BM25 only through the statistics of at most that share of documents
      (Lucene scores segments with index-wide statistics; this keeps the last build's).
    ``wait(owner)`` waits for a build on a thread."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, background: bool = True, background_min: int = 2000,
                 max_delta: int = 2000, rebuild_share: float = 0.01, rebuild_min: int = 64) -> None:
        self.k1, self.b = k1, b
        self.background, self.background_min, self.max_delta = background, max(1, background_min), max(0, max_delta)
        self.rebuild_share, self.rebuild_min = max(0.0, rebuild_share), max(1, rebuild_min)
        self._blocks: dict[str, _LexBlock] = {}
        self._lock = threading.RLock()
        self._building: dict[str, threading.Event] = {}
        self._failed: set[str] = set()
        self.rebuilds = 0

    def _touch(self, blk: _LexBlock, mid: str) -> None:
        blk.changed.add(mid)
        if blk.pending is not None:
            blk.pending.add(mid)
        blk.view = None

    def add(self, owner: str, ids: Sequence[str], texts: Sequence[str]) -> None:
        with self._lock:
            blk = self._blocks.setdefault(owner, _LexBlock())
            voc = blk.vocab
            memo: dict[str, tuple[str, ...]] = {}
            for mid, text in zip(ids, texts):
                blk.toks[mid] = [voc.setdefault(t, len(voc)) for t in tokenize(text, memo)]
                self._touch(blk, mid)

    def remove(self, owner: str, ids: Iterable[str]) -> None:
        with self._lock:
            blk = self._blocks.get(owner)
            if blk is None:
                return
            for mid in ids:
                if blk.toks.pop(mid, None) is not None or mid in blk.pos:
                    self._touch(blk, mid)

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            self._blocks.pop(owner, None)
            self._failed.discard(owner)

    def _build(self, ids: list[str], docs: list[list[int]], vocab: dict[str, int]) -> tuple[Any, float, np.ndarray]:
        """A bm25s index over ``docs`` (token ids of ``vocab``), its average length and document frequencies."""
        if not ids:
            return None, 0.0, np.zeros(0, dtype=np.int64)
        import bm25s

        model = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        # token ids and the owner's vocabulary: bm25s skips building its own from strings. Documents
        # that all lack tokens make bm25s divide 0 by an average length of 0 for no term at all (every
        # score stays 0): not a warning worth a user's log.
        with np.errstate(invalid="ignore", divide="ignore"):
            model.index((docs, vocab), show_progress=False)
        avgdl = float(np.mean([len(d) for d in docs]))
        df = np.diff(np.asarray(model.scores["indptr"], dtype=np.int64))  # the matrix's columns are terms
        return model, avgdl, df

    def _install(self, blk: _LexBlock, gen: int, ids: list[str], built: tuple[Any, float, np.ndarray],
                 changed: set[str], pos: dict[str, int] | None = None) -> None:
        blk.model, blk.avgdl, blk.df = built
        blk.ids, blk.pos, blk.n_docs = ids, {mid: i for i, mid in enumerate(ids)} if pos is None else pos, len(ids)
        blk.changed, blk.view, blk.built, blk.installed = changed, None, True, gen
        self.rebuilds += 1

    def _refresh(self, owner: str, blk: _LexBlock) -> None:
        """Under the lock: bring the owner's matrix up to date, inline or on a thread (see the class)."""
        if blk.built and not blk.changed:
            return
        written = len(blk.changed)
        if (not blk.built or not self.background or blk.n_docs < self.background_min or written > self.max_delta
                or owner in self._failed or _EXITING.is_set()):
            # a thread still running then builds an older snapshot: it is not installed
            ids, docs, vocab, gen = self._snapshot(blk)
            self._install(blk, gen, ids, self._build(ids, docs, vocab), set())
            self._failed.discard(owner)
            return
        if owner in self._building or written < max(self.rebuild_min, self.rebuild_share * blk.n_docs):
            return  # the segments serve
        done = self._building[owner] = threading.Event()
        threading.Thread(target=self._build_thread, args=(owner, blk, done), daemon=False,
                         name=f"persona-mw-bm25-{len(self._building)}").start()

    @staticmethod
    def _snapshot(blk: _LexBlock) -> tuple[list[str], list[list[int]], dict[str, int], int]:
        """Under the lock: the documents a build reads (writes replace a token list, never change one)."""
        snap = dict(blk.toks)  # a C-level copy: the lists are split outside the lock by the thread
        blk.gen += 1
        return list(snap), list(snap.values()), dict(blk.vocab), blk.gen

    def _build_thread(self, owner: str, blk: _LexBlock, done: threading.Event) -> None:
        """A build on a thread: the snapshot taken here (not by the search that started it, which would
        wait for the copy), built outside the lock, installed with the writes made meanwhile as its delta."""
        try:
            with self._lock:
                if self._blocks.get(owner) is not blk:
                    return
                ids, docs, vocab, gen = self._snapshot(blk)
                blk.pending = set()
            built = self._build(ids, docs, vocab)
            pos = {mid: i for i, mid in enumerate(ids)}  # outside the lock too
            with self._lock:
                if self._blocks.get(owner) is blk and gen > blk.installed:  # not dropped (forget), not superseded
                    self._install(blk, gen, ids, built, blk.pending or set(), pos)
        except Exception:  # noqa: BLE001 - the owner's next search rebuilds inline
            log.exception("BM25 rebuild of one owner failed on its thread; its next search rebuilds inline")
            with self._lock:
                self._failed.add(owner)
        finally:
            with self._lock:
                blk.pending = None
                self._building.pop(owner, None)
            done.set()

    def _view(self, blk: _LexBlock) -> _LexView:
        if blk.view is None:
            delta = [mid for mid in blk.changed if mid in blk.toks]
            stale_ids = {mid for mid in blk.changed if mid in blk.pos}
            stale = np.fromiter((blk.pos[mid] for mid in stale_ids), dtype=np.int64, count=len(stale_ids))
            blk.view = _LexView(delta, stale, _Rows(blk.pos, stale_ids,
                                                    {mid: blk.n_docs + j for j, mid in enumerate(delta)}),
                                blk.ids + delta)
        return blk.view

    def _delta_scores(self, blk: _LexBlock, delta: list[str], terms: list[int]) -> np.ndarray:
        """BM25 of the documents written since the last build, with that build's statistics."""
        out = np.zeros(len(delta), dtype=np.float64)
        if not terms or not delta or blk.n_docs == 0:
            return out
        n, k1, b = blk.n_docs, self.k1, self.b
        df = [int(blk.df[t]) if t < len(blk.df) else 0 for t in terms]
        idf = {t: float(np.float32(np.log(1 + (n - d + 0.5) / (d + 0.5)))) for t, d in zip(terms, df)}
        avgdl = blk.avgdl or 1.0
        for j, mid in enumerate(delta):
            toks = blk.toks[mid]
            tf: dict[int, int] = {}
            for t in toks:
                if t in idf:
                    tf[t] = tf.get(t, 0) + 1
            if tf:
                norm = k1 * ((1 - b) + b * len(toks) / avgdl)
                out[j] = sum(idf[t] * c / (norm + c) for t, c in tf.items())
        return out

    def _scores(self, owner: str, query: str | Sequence[str]) -> tuple[np.ndarray, Any, list[str], int] | None:
        """BM25 of ``query`` by position over the owner's segments (NaN at a stale row), id -> position,
        position -> id, and the count of live documents."""
        terms = list(dict.fromkeys(tokenize(query) if isinstance(query, str) else query))
        with self._lock:
            blk = self._blocks.get(owner)
            if blk is None or not blk.toks:
                return None
            self._refresh(owner, blk)
            model = blk.model
            if model is not None:
                known = [t for t in terms if t in model.vocab_dict and t != ""]
                main = (np.asarray(model.get_scores(known), dtype=np.float64) if known
                        else np.zeros(blk.n_docs, dtype=np.float64))
            else:
                main = np.zeros(0, dtype=np.float64)
            view = self._view(blk) if blk.changed else None
            if view is None or (not view.delta and not len(view.stale)):
                return main, blk.pos, blk.ids, blk.n_docs
            qids = [blk.vocab[t] for t in terms if t in blk.vocab and t != ""]
            s = np.concatenate([main, self._delta_scores(blk, view.delta, qids)])
            s[view.stale] = np.nan
            return s, view.rows, view.ids, len(blk.toks)

    def search(self, owner: str, query: str | Sequence[str], k: int) -> list[tuple[str, float]]:
        got = self._scores(owner, query)
        if got is None or k <= 0:
            return []
        s, _, ids, _ = got
        hit = np.flatnonzero(s > 0)
        return [(ids[i], float(s[i])) for i in hit[_top(s[hit], k)]]

    def probe(self, owner: str, query: str | Sequence[str], k: int) -> Probe | None:
        """The ``k`` best documents (zero scores included when fewer match), any id's score, the moments."""
        got = self._scores(owner, query)
        if got is None:
            return None
        s, pos, ids, n = got
        hit = np.flatnonzero(s > 0)  # the ranking among matching documents only: a fraction of them all
        top = hit[_top(s[hit], k)] if len(hit) >= k else _top(s, k)
        return Probe([ids[i] for i in top], s[top], n, float(np.nansum(s)), float(np.nansum(s * s)),
                     lambda want: _lookup(pos, s, want))

    def size(self, owner: str) -> int:
        with self._lock:
            blk = self._blocks.get(owner)
            return 0 if blk is None else len(blk.toks)

    def has(self, owner: str, memory_id: str) -> bool:
        with self._lock:
            blk = self._blocks.get(owner)
            return blk is not None and memory_id in blk.toks


# ----------------------------------------------------------------------------------- fusion


@dataclass
class Fused:
    id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)


def rrf(rankings: dict[str, list[str]], k: int = 60, weights: dict[str, float] | None = None) -> list[Fused]:
    """Reciprocal rank fusion: ``sum_r w_r / (k + rank_r)`` over the rankers that list an id."""
    acc: dict[str, Fused] = {}
    for name, ids in rankings.items():
        w = 1.0 if weights is None else weights.get(name, 1.0)
        for rank, mid in enumerate(ids, start=1):
            f = acc.get(mid)
            if f is None:
                f = acc[mid] = Fused(mid, 0.0)
            f.score += w / (k + rank)
            f.ranks[name] = rank
    return sorted(acc.values(), key=lambda f: -f.score)


# ----------------------------------------------------------------------------------- time

_MONTHS = {m: i for i, m in enumerate(
    "january february march april may june july august september october november december".split(), 1)}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y/%m/%d", "%d %B %Y", "%d %B, %Y",
                 "%B %d, %Y", "%B %d %Y", "%d %b %Y", "%b %d, %Y")


def parse_date(value: object) -> datetime | None:
    """A date from an epoch number, a datetime/date, ISO text, or prose like '1:56 pm on 8 May, 2023'."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    text = str(value).strip()
    if not text or len(text) > 80:
        return None
    try:
        d = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    except ValueError:
        pass
    core = text.split(" on ", 1)[1] if " on " in text else text
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(core.strip(), fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    m = re.search(r"(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})", text) or None
    if m and m.group(2).lower() in _MONTHS:
        try:
            return datetime(int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1)), tzinfo=timezone.utc)
        except ValueError:
            return None
    return None


_TEMPORAL_Q = re.compile(
    r"\b(when|what (?:year|month|date|day|time)|how long|how many (?:years|months|weeks|days)|before|after|"
    r"recently|latest|last|first|ago|since|during)\b", re.IGNORECASE)


@dataclass
class TimeHint:
    """What a question says about time: temporal at all, an explicit year/month, a wish for recency."""

    temporal: bool = False
    year: int | None = None
    month: int | None = None
    recent: bool = False


def time_hint(query: str) -> TimeHint:
    q = query.lower()
    hint = TimeHint(temporal=bool(_TEMPORAL_Q.search(q)))
    m = re.search(r"\b(19\d\d|20\d\d)\b", q)
    if m:
        hint.year, hint.temporal = int(m.group(1)), True
    for word in re.findall(r"[a-z]+", q):
        if word in _MONTHS and (len(word) > 3 or word in ("sept",)) and word != "may" or (
                word == "may" and re.search(r"\bmay\s+(?:\d|of\b|19|20)|\bin may\b", q)):
            hint.month, hint.temporal = _MONTHS[word], True
            break
    hint.recent = bool(re.search(r"\b(latest|most recent(?:ly)?|recently|lately|currently|now)\b", q))
    return hint


__all__ = ["AnnIndex", "BM25Index", "Fused", "NumpyIndex", "Probe", "TimeHint", "VectorIndex", "make_vector_index",
           "parse_date", "probe", "rrf", "time_hint", "tokenize"]
