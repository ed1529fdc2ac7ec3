"""Storage: the ``Store`` protocol every backend implements, and ``open_store``.

The embedded default is SQLite (``persona_mw.store.sqlite``). Feedback events are append-only:
profiles can always be rebuilt from them. ``forget_user`` removes everything derived from a user.
"""

from __future__ import annotations

import contextlib
import re
import contextvars
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from pydantic import BaseModel, Field

from persona_mw.nodes import KINDS
from persona_mw.types import Feedback, Memory, NodeId, Profile, Trace

NODE_KINDS = KINDS  # persona_mw.nodes owns the vocabulary


class Node(BaseModel):
    id: NodeId
    kind: str
    created_at: float
    meta: dict[str, Any] = Field(default_factory=dict)


class Edge(BaseModel):
    """``src`` belongs to ``dst`` (user -> group, user -> context, group -> global) with a weight."""

    src: NodeId
    dst: NodeId
    kind: str = "member"
    weight: float = 1.0


def node_kind(node_id: NodeId) -> str:
    """The kind of a node from its id: 'global', 'user:x', 'group:x', 'context:x', 'user:x@context:y'.

    Parsed exactly (``persona_mw.nodes.parse``); ``ValueError`` for anything else.
    """
    from persona_mw.nodes import parse

    return parse(node_id).kind


# The contract, split by concern. Every store implements all of them (``Store``); callers use the
# methods below and nothing else (no ``getattr`` probes, no private SQL). ``tests/store/contract``
# runs one suite unchanged against every implementation.


@runtime_checkable
class NodeStore(Protocol):
    def ensure_node(self, node_id: NodeId, meta: dict[str, Any] | None = None) -> Node: ...
    def get_node(self, node_id: NodeId) -> Node | None: ...
    def list_nodes(self, kind: str | None = None, limit: int = 1000, offset: int = 0) -> list[Node]: ...
    def add_edge(self, edge: Edge) -> None: ...
    def remove_edge(self, src: NodeId, dst: NodeId, kind: str = "member") -> None: ...
    def edges_from(self, node_id: NodeId) -> list[Edge]: ...
    def edges_to(self, node_id: NodeId, limit: int = 10000) -> list[Edge]: ...
    def prune_node(self, node_id: NodeId) -> bool: ...


@runtime_checkable
class ProfileStore(Protocol):
    """Profiles carry a row version: ``get_profile_versioned`` reads it, ``put_profile(expected_version=)``
    writes only if it is still the stored one (else ``StaleVersionError``); 0 means "no row yet"."""

    def get_profile(self, node_id: NodeId) -> Profile | None: ...
    def get_profiles(self, node_ids: Iterable[NodeId]) -> dict[NodeId, Profile]: ...
    def get_profile_versioned(self, node_id: NodeId) -> tuple[Profile | None, int]: ...
    def put_profile(self, profile: Profile, expected_version: int | None = None) -> int: ...



@runtime_checkable
class MemoryStore(Protocol):
    """Memories with their vectors; ``memory_rows`` is what an index loads, ``vector_search`` and
    ``text_search`` are served by the store itself (exact scan in SQLite; pgvector HNSW and
    full-text GIN in Postgres). Scores: cosine similarity, and a lexical score (higher is better).
    ``kinds`` keeps only memories of those kinds (the ranking statistics stay the owner's whole corpus)."""

    def add_memory(self, memory: Memory) -> bool: ...
    def update_memory(self, memory: Memory) -> None: ...
    def get_memory(self, memory_id: str) -> Memory | None: ...
    def list_memories(self, owner: NodeId, include_superseded: bool = False, *,
                      embeddings: bool = True) -> list[Memory]: ...
    def delete_memory(self, memory_id: str) -> bool: ...
    def count_memories(self) -> int: ...
    def memory_rows(self, owner: NodeId) -> tuple[list[Memory], dict[str, np.ndarray]]: ...
    def vector_search(self, owner: NodeId, query: Sequence[float], k: int,
                      kinds: Sequence[str] | None = None) -> list[tuple[str, float]]: ...
    def text_search(self, owner: NodeId, query: str, k: int,
                    kinds: Sequence[str] | None = None) -> list[tuple[str, float]]: ...


@runtime_checkable
class FeedbackStore(Protocol):
    """Append-only: an event is never changed; a duplicate id (per user) is refused.

    ``append_feedback(job=True)`` also records, in the same transaction, a job ``feedback-<seq>`` (kind
    ``feedback``, payload ``{"seq": seq}``) claimed by this process: the event's effects are owed until it
    is finished, and a crash leaves it to another process. ``feedback_log`` is the user's events with
    their sequence numbers, oldest first."""

    def append_feedback(self, event: Feedback, *, job: bool = False) -> int: ...
    def list_feedback(self, user: str | None = None, kinds: Iterable[str] | None = None,
                      since_seq: int = 0, limit: int | None = None) -> list[Feedback]: ...
    def feedback_log(self, user: str, since_seq: int = 0, limit: int | None = None) -> list[tuple[int, Feedback]]: ...
    def count_feedback(self, user: str, context: str | None = None) -> int: ...


@runtime_checkable
class TraceStore(Protocol):
    def save_trace(self, trace: Trace) -> None: ...
    def get_trace(self, trace_id: str) -> Trace | None: ...
    def list_traces(self, user: str, limit: int = 20) -> list[Trace]: ...


@runtime_checkable
class JobStore(Protocol):
    """Durable jobs: ``after_turn`` (a turn's after-turn work) and ``feedback`` (the effects a stored
    event still owes). A claim is exclusive across processes and connections; ``kinds`` limits it."""

    def add_job(self, job_id: str, user: str, kind: str, payload: dict[str, Any], claim: bool = True) -> None: ...
    def finish_job(self, job_id: str) -> None: ...
    def fail_job(self, job_id: str, error: str) -> int: ...
    def claim_jobs(self, stale_after_s: float, max_attempts: int, limit: int = 1000, *,
                   exclude: Iterable[str] = (), dead_only: bool = False,
                   lease_s: float = ..., kinds: Iterable[str] | None = None) -> list[dict[str, Any]]: ...
    def list_jobs(self, user: str | None = None) -> list[dict[str, Any]]: ...
    def heartbeat(self) -> None: ...


@runtime_checkable
class UserDataStore(Protocol):
    """Per-user export and forget. ``user_epoch`` is readable by any process (the forget guard)."""

    def export_user(self, user: str) -> dict[str, Any]: ...
    def forget_user(self, user: str) -> dict[str, int]: ...
    def has_user(self, user: str) -> bool: ...
    def list_users(self, query: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]: ...
    def list_user_nodes(self, user: str) -> list[NodeId]: ...
    def user_epoch(self, user: str) -> int: ...
    def pending_scrub(self) -> int: ...
    def scrub(self, attempts: int = 5) -> bool: ...


@runtime_checkable
class AdminStore(Protocol):
    """Schema, tenants and whole-store copy (``persona-mw db``)."""

    path: str
    max_memories_per_owner: int | None
    redactor: Any

    def schema_version(self) -> int: ...
    def for_tenant(self, tenant: str) -> Store: ...
    def dump_table(self, table: str) -> Iterator[dict[str, Any]]: ...
    def load_table(self, table: str, rows: Iterable[dict[str, Any]]) -> int: ...
    def close(self) -> None: ...


@runtime_checkable
class Store(NodeStore, ProfileStore, MemoryStore, FeedbackStore, TraceStore, JobStore, UserDataStore,
            AdminStore, Protocol):
    """Persistent state: every concern above. Implementations are thread-safe; every method is short
    and synchronous (one transaction)."""


# The tables ``dump_table``/``load_table`` move, parents first; columns are the same in every store.
COPY_TABLES = ("store_meta", "forgotten", "nodes", "edges", "profiles", "memories", "feedback", "traces",
               "workers", "jobs")


# The forget guard: work done on behalf of a user (a turn, a feedback event, an after-turn job)
# captures the user's forget epoch when it starts and runs under ``write_guard(user, epoch)``.
# A store that keeps epochs (SQLite) refuses, inside the write transaction, every write of that
# user's rows once the epoch has moved on (a forget happened since): ``ForgottenError``.
_GUARD: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("persona_mw_forget_guard",
                                                                               default=None)


def current_guard() -> tuple[str, int] | None:
    """The (user, epoch) the current work runs under, if any."""
    return _GUARD.get()


@contextlib.contextmanager
def write_guard(user: str, epoch: int | None) -> Iterator[None]:
    """Within the block (and threads/tasks started from it), writes of ``user``'s rows fail with
    ``ForgottenError`` if ``user`` is forgotten after ``epoch`` was read. ``epoch=None``: no guard."""
    if epoch is None:
        yield
        return
    token = _GUARD.set((user, epoch))
    try:
        yield
    finally:
        _GUARD.reset(token)


def user_of_node(node_id: str) -> str | None:
    """``ana`` for ``user:ana`` and ``user:ana@context:x``; None for other nodes (``persona_mw.nodes.user_of``)."""
    from persona_mw.nodes import user_of

    return user_of(node_id)


def is_postgres_url(url: str) -> bool:
    """``postgresql://...`` / ``postgres://...`` (also as a filesystem path turns it: ``postgresql:/...``)."""
    return re.match(r"^postgres(ql)?:/", url) is not None


def open_store(url: str) -> Store:
    """Open a store from a URL or path: ``sqlite:///path.db``, a plain path, ``:memory:``, or
    ``postgresql://user@host/db`` (options after ``#``: ``schema=NAME&pool_min=1&pool_max=10&pool_timeout=30``;
    see ``persona_mw.store.postgres.parse_url``)."""
    from persona_mw.store.sqlite import SQLiteStore

    if is_postgres_url(url):
        from persona_mw.store.postgres import PostgresStore

        return PostgresStore.from_url(url)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])
    if "://" in url:
        from persona_mw.errors import ConfigError

        raise ConfigError(f"unsupported store URL {url.split('://', 1)[0]!r}://...",
                          hint="use a file path, sqlite:///path.db or postgresql://user@host/db")
    return SQLiteStore(url)


__all__ = ["COPY_TABLES", "AdminStore", "Edge", "FeedbackStore", "JobStore", "MemoryStore", "Node", "NodeStore",
           "ProfileStore", "Store", "TraceStore", "UserDataStore", "is_postgres_url", "current_guard", "node_kind", "open_store", "user_of_node", "write_guard"]
