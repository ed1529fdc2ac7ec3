"""Memory indexes: exact dense search in numpy, BM25, reciprocal rank fusion, dates in questions.

Everything is kept per owner node (``user:ana``, ``group:acme``...), so a search only ever looks at
the nodes of the request's scope. ``VectorIndex`` is the interface a larger backend (FAISS, a vector
database) can implement; ``NumpyIndex`` is the embedded exact default. Pure numpy, no torch.
"""

from __future__ import annotations

import math
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from persona_mw.text import content_stem

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

    __slots__ = ("ids", "row", "mat", "alive", "n")

    def __init__(self, dim: int) -> None:
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.mat = np.zeros((8, dim), dtype=np.float32)
        self.alive = np.zeros(8, dtype=bool)
        self.n = 0

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
                self.alive[old] = True
                continue
            self.mat[self.n] = vecs[i]
            self.alive[self.n] = True
            self.row[mid] = self.n
            self.ids.append(mid)
            self.n += 1


class NumpyIndex:
    """Exact cosine search over each owner's matrix (one matrix-vector product per owner)."""

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
                    b.alive[r] = False
                    b.mat[r] = 0.0  # the vector itself is gone, not just hidden

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            self._blocks.pop(owner, None)

    def search(self, owner: str, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        with self._lock:
            b = self._blocks.get(owner)
            if b is None or b.n == 0 or k <= 0:
                return []
            scores = b.mat[: b.n] @ np.asarray(query, dtype=np.float32).reshape(-1)
            scores = np.where(b.alive[: b.n], scores, -np.inf)
            k = min(k, b.n)
            top = np.argpartition(-scores, k - 1)[:k] if k < b.n else np.arange(b.n)
            top = top[np.argsort(-scores[top], kind="stable")]
            return [(b.ids[i], float(scores[i])) for i in top if np.isfinite(scores[i])]

    def scores(self, owner: str, query: np.ndarray) -> tuple[np.ndarray, dict[str, int], list[str]] | None:
        """Cosine of ``query`` with every row of the owner (NaN for removed rows), the id -> row map, the ids."""
        with self._lock:
            b = self._blocks.get(owner)
            if b is None or b.n == 0:
                return None
            s = (b.mat[: b.n] @ np.asarray(query, dtype=np.float32).reshape(-1)).astype(np.float64)
            return np.where(b.alive[: b.n], s, np.nan), b.row, b.ids

    def size(self, owner: str) -> int:
        with self._lock:
            b = self._blocks.get(owner)
            return 0 if b is None else int(b.alive[: b.n].sum())

    def owners(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def has(self, owner: str, memory_id: str) -> bool:
        with self._lock:
            b = self._blocks.get(owner)
            return b is not None and memory_id in b.row


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


def tokenize(text: str) -> list[str]:
    """Lowercased, stemmed word tokens without stopwords; CJK runs become character bigrams."""
    out: list[str] = []
    for w in _TOKEN.findall(text.lower()):
        if _CJK.search(w):
            out.extend(w[i:i + 2] for i in range(max(1, len(w) - 1)))
        elif w not in STOPWORDS:
            out.append(_stem(w))
    return out


class _Bm25Block:
    __slots__ = ("ids", "row", "lens", "alive", "post", "cache", "n_alive", "total_len", "arrays")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.lens: list[int] = []
        self.alive: list[bool] = []
        self.post: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.n_alive = 0
        self.total_len = 0
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None  # (lens, alive) as numpy, rebuilt after writes


class BM25Index:
    """Okapi BM25 over each owner's memories, with an inverted index (scores by scatter-add)."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._blocks: dict[str, _Bm25Block] = {}
        self._lock = threading.RLock()

    def add(self, owner: str, ids: Sequence[str], texts: Sequence[str]) -> None:
        with self._lock:
            blk = self._blocks.setdefault(owner, _Bm25Block())
            for mid, text in zip(ids, texts):
                if mid in blk.row:
                    self._remove_one(blk, mid)
                toks = tokenize(text)
                r = len(blk.ids)
                blk.ids.append(mid)
                blk.row[mid] = r
                blk.lens.append(len(toks))
                blk.alive.append(True)
                blk.n_alive += 1
                blk.total_len += len(toks)
                tf: dict[str, int] = defaultdict(int)
                for t in toks:
                    tf[t] += 1
                for t, c in tf.items():
                    blk.post[t].append((r, c))
                    blk.cache.pop(t, None)
            blk.arrays = None

    def _remove_one(self, blk: _Bm25Block, mid: str) -> None:
        r = blk.row.pop(mid)
        blk.arrays = None
        if blk.alive[r]:
            blk.alive[r] = False
            blk.n_alive -= 1
            blk.total_len -= blk.lens[r]

    def remove(self, owner: str, ids: Iterable[str]) -> None:
        with self._lock:
            blk = self._blocks.get(owner)
            if blk is None:
                return
            for mid in ids:
                if mid in blk.row:
                    self._remove_one(blk, mid)

    def drop_owner(self, owner: str) -> None:
        with self._lock:
            self._blocks.pop(owner, None)

    def _postings(self, blk: _Bm25Block, term: str) -> tuple[np.ndarray, np.ndarray] | None:
        got = blk.cache.get(term)
        if got is None:
            plist = blk.post.get(term)
            if not plist:
                return None
            arr = np.asarray(plist, dtype=np.int64)
            got = (arr[:, 0], arr[:, 1].astype(np.float32))
            blk.cache[term] = got
        return got

    def search(self, owner: str, query: str | Sequence[str], k: int) -> list[tuple[str, float]]:
        terms = tokenize(query) if isinstance(query, str) else list(query)
        with self._lock:
            blk = self._blocks.get(owner)
            if blk is None or blk.n_alive == 0 or not terms or k <= 0:
                return []
            n = len(blk.ids)
            if blk.arrays is None:
                blk.arrays = (np.asarray(blk.lens, dtype=np.float32), np.asarray(blk.alive, dtype=bool))
            lens, alive = blk.arrays
            avg = max(blk.total_len / max(blk.n_alive, 1), 1e-6)
            scores = np.zeros(n, dtype=np.float64)
            hit = False
            for t in set(terms):
                p = self._postings(blk, t)
                if p is None:
                    continue
                rows, tf = p
                df = len(rows)  # counts removed docs too: a slight, harmless over-estimate
                idf = math.log(1.0 + (blk.n_alive - df + 0.5) / (df + 0.5))
                denom = tf + self.k1 * (1 - self.b + self.b * lens[rows] / avg)
                # a term occurs once per row in its postings, so plain fancy-index addition is exact
                scores[rows] += idf * tf * (self.k1 + 1) / denom
                hit = True
            if not hit:
                return []
            scores = np.where(alive & (scores > 0), scores, -np.inf)
            k = min(k, n)
            top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
            top = top[np.argsort(-scores[top], kind="stable")]
            return [(blk.ids[i], float(scores[i])) for i in top if np.isfinite(scores[i])]

    def scores(self, owner: str, query: str | Sequence[str]) -> tuple[np.ndarray, dict[str, int], list[str]] | None:
        """BM25 of ``query`` for every row of the owner (0 where no term matches, NaN for removed rows)
        the id -> row map and the row ids."""
        terms = tokenize(query) if isinstance(query, str) else list(query)
        with self._lock:
            blk = self._blocks.get(owner)
            if blk is None or blk.n_alive == 0:
                return None
            n = len(blk.ids)
            if blk.arrays is None:
                blk.arrays = (np.asarray(blk.lens, dtype=np.float32), np.asarray(blk.alive, dtype=bool))
            lens, alive = blk.arrays
            avg = max(blk.total_len / max(blk.n_alive, 1), 1e-6)
            scores = np.zeros(n, dtype=np.float64)
            for t in set(terms):
                p = self._postings(blk, t)
                if p is None:
                    continue
                rows, tf = p
                df = len(rows)
                idf = math.log(1.0 + (blk.n_alive - df + 0.5) / (df + 0.5))
                scores[rows] += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * lens[rows] / avg))
            return np.where(alive, scores, np.nan), blk.row, blk.ids

    def size(self, owner: str) -> int:
        with self._lock:
            blk = self._blocks.get(owner)
            return 0 if blk is None else blk.n_alive

    def has(self, owner: str, memory_id: str) -> bool:
        with self._lock:
            blk = self._blocks.get(owner)
            return blk is not None and memory_id in blk.row


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


__all__ = ["BM25Index", "Fused", "NumpyIndex", "TimeHint", "VectorIndex", "parse_date", "rrf", "time_hint",
           "tokenize"]
