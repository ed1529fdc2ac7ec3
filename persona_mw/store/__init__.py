"""Storage: the ``Store`` protocol every backend implements, and ``open_store``.

The embedded default is SQLite (``persona_mw.store.sqlite``). Feedback events are append-only:
profiles can always be rebuilt from them. ``forget_user`` removes everything derived from a user.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

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


@runtime_checkable
class Store(Protocol):
    """Persistent state. Implementations are thread-safe; every method is short and synchronous."""

    # nodes and edges -----------------------------------------------------------------------
    def ensure_node(self, node_id: NodeId, meta: dict[str, Any] | None = None) -> Node: ...
    def get_node(self, node_id: NodeId) -> Node | None: ...
    def list_nodes(self, kind: str | None = None, limit: int = 1000, offset: int = 0) -> list[Node]: ...
    def add_edge(self, edge: Edge) -> None: ...
    def remove_edge(self, src: NodeId, dst: NodeId, kind: str = "member") -> None: ...
    def edges_from(self, node_id: NodeId) -> list[Edge]: ...
    def edges_to(self, node_id: NodeId, limit: int = 10000) -> list[Edge]: ...

    # profiles ------------------------------------------------------------------------------
    def get_profile(self, node_id: NodeId) -> Profile | None: ...
    def get_profiles(self, node_ids: Iterable[NodeId]) -> dict[NodeId, Profile]: ...
    def put_profile(self, profile: Profile) -> None: ...

    # memories ------------------------------------------------------------------------------
    def add_memory(self, memory: Memory) -> bool | None: ...  # False: an idempotent re-add, stored already
    def update_memory(self, memory: Memory) -> None: ...
    def get_memory(self, memory_id: str) -> Memory | None: ...
    def list_memories(self, owner: NodeId, include_superseded: bool = False) -> list[Memory]: ...
    def delete_memory(self, memory_id: str) -> bool: ...

    # feedback events (append-only) ---------------------------------------------------------
    def append_feedback(self, event: Feedback) -> int: ...
    def list_feedback(self, user: str | None = None, kinds: Iterable[str] | None = None,
                      since_seq: int = 0, limit: int | None = None) -> list[Feedback]: ...
    def count_feedback(self, user: str, context: str | None = None) -> int: ...

    # traces --------------------------------------------------------------------------------
    def save_trace(self, trace: Trace) -> None: ...
    def get_trace(self, trace_id: str) -> Trace | None: ...

    # per-user export and delete ------------------------------------------------------------
    def export_user(self, user: str) -> dict[str, Any]: ...
    def forget_user(self, user: str) -> dict[str, int]: ...
    def has_user(self, user: str) -> bool: ...
    # Optional (the core falls back to a scan of user_context nodes without it):
    # def list_user_nodes(self, user: str) -> list[NodeId]: the user's own nodes, parsed exactly.

    def close(self) -> None: ...


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


def open_store(url: str) -> Store:
    """Open a store from a URL or path: ``sqlite:///path.db``, a plain path, or ``:memory:``."""
    from persona_mw.store.sqlite import SQLiteStore

    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])
    if "://" in url:
        from persona_mw.errors import ConfigError

        raise ConfigError(f"unsupported store URL {url!r}", hint="use a file path or sqlite:///path.db")
    return SQLiteStore(url)


__all__ = ["Edge", "Node", "Store", "current_guard", "node_kind", "open_store", "user_of_node", "write_guard"]
