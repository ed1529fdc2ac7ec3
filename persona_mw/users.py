"""``UserService``: the verbs about one user's stored data: profile, export, rebuild, forget,
group memberships, and preferences stated for a whole group.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from persona_mw.errors import RequestError, UnknownUserError
from persona_mw.nodes import context_node, group_node, kind_of, parse, user_node
from persona_mw.types import EVENT_ID_PATTERN, ID_PATTERN, ChatRequest, Message

if TYPE_CHECKING:
    from persona_mw.config import Config
    from persona_mw.graph import PreferenceGraph
    from persona_mw.pipeline import Pipeline
    from persona_mw.profiles import ProfileService
    from persona_mw.runtime import Runtime
    from persona_mw.store import Store

log = logging.getLogger("persona_mw")
# Trace ids are ``trace-<hex>``; a feedback event may name one (``trace_id``, the same pattern).
_TRACE_ID_RE = re.compile(EVENT_ID_PATTERN)


class UserService:
    """Profile, export, rebuild, forget and memberships of the users in one store."""

    def __init__(self, *, config: Config, store: Store, graph: PreferenceGraph, profiles: ProfileService,
                 pipeline: Pipeline, runtime: Runtime, memory: Callable[[], Any]) -> None:
        self.config, self.store, self.graph, self.profiles = config, store, graph, profiles
        self.pipeline, self.runtime, self._memory = pipeline, runtime, memory

    def require(self, user: str) -> None:
        if not self.store.has_user(user):
            raise UnknownUserError(f"unknown user {user!r}", field="user",
                                   hint="the user appears after their first chat or feedback")

    def profile(self, user: str, context: str | None = None) -> dict[str, Any]:
        """The user's profile, the groups they inherit from and the resolved scope."""
        self.require(user)
        req = ChatRequest(user=user, context=context, messages=[Message(role="user", content="-")])
        scope, profiles = self.graph.resolve(req)
        return {
            "user": user,
            "scope": scope.model_dump(),
            "profiles": {n: p.model_dump() for n, p in profiles.items()},
        }

    def export_user(self, user: str) -> dict[str, Any]:
        self.require(user)
        return self.store.export_user(user)

    async def arebuild(self, user: str) -> dict[str, Any]:
        """Rebuild a user's profiles from their append-only events."""
        self.require(user)
        nodes = [n for n in self.profiles.user_nodes(user) if n != user_node(user)]
        self.profiles.reset([user_node(user), *nodes])
        events = self.store.feedback_log(user)
        with self.pipeline.cache_scope(user):
            for seq, ev in events:  # marked as the first time (a pending replay of one is then a no-op)
                await self.pipeline.apply_feedback(ev, seq)
        return {"user": user, "events": len(events)}

    def forget(self, user: str) -> dict[str, Any]:
        """Delete everything stored about and derived from ``user``.

        Rows go in one store transaction (events, memories, profiles, nodes, edges, traces, jobs),
        which also moves the user's forget epoch on: work for the user that started before (a turn
        generating, an after-turn job, a feedback event) can no longer write anything of them.
        Then ``persona_forget`` lets plugins recompute what they pooled from the user (the groups
        they belonged to) and drop anything they keep elsewhere (run by the hook runner: ``async
        def`` works, the plugin's ``on_error`` applies). Returns the rows deleted per table,
        ``scrubbed`` (the deleted text is gone from the database and WAL files: False while another
        connection holds an older snapshot; retried in the background) and ``pending_scrub``.
        """
        self.require(user)
        own = self.profiles.user_nodes(user)
        if user_node(user) not in own:
            own.insert(0, user_node(user))
        linked = sorted({e.dst for n in own for e in self.store.edges_from(n)} - set(own))
        # The contexts the user's nodes name: their context nodes may exist only because of this user.
        contexts = {context_node(parse(n).name or "") for n in own if kind_of(n) == "user_context"}
        counts = self.store.forget_user(user)
        self.graph.forget_cached(user)
        memory = self._memory()
        if memory is not None:  # the in-memory index holds vectors of the rows just deleted
            memory.drop_user(user)
        self.pipeline.run_blocking("persona_forget", self.runtime.run, user=user, nodes=linked, store=self.store,
                                   graph=self.graph)
        counts["orphan_nodes"] = self.prune_orphans(sorted(set(linked) | contexts))
        scrubbed = bool(self.store.scrub())
        pending = int(self.store.pending_scrub())
        if not scrubbed:
            log.warning("forget of %r: rows deleted, but the checkpoint was busy (another connection holds an "
                        "older snapshot, or writes right now), so the text stays in the database/WAL files "
                        "until it succeeds; retrying in the background", user)
            self.runtime.scrub_wanted.set()
        return {**counts, "scrubbed": scrubbed, "pending_scrub": pending}

    async def aforget(self, user: str) -> dict[str, Any]:
        """``forget`` in a worker thread: the event loop keeps serving other requests meanwhile."""
        return await asyncio.to_thread(self.forget, user)

    def prune_orphans(self, nodes: list[str]) -> int:
        """Delete the group/context nodes among ``nodes`` that nothing holds: not declared in the
        config, no member or edge left, no memory, no stated preference of their own."""
        prune = self.store.prune_node
        g = self.config.graph
        declared = {group_node(x) for x in g.groups} | {context_node(x) for x in g.contexts}
        return sum(1 for n in nodes
                   if n not in declared and kind_of(n) in ("group", "context") and prune(n))

    # -- memberships ---------------------------------------------------------------------------

    @staticmethod
    def _valid_ids(user: str, group: str) -> None:
        for field, value in (("user", user), ("group", group)):
            if not isinstance(value, str) or not re.match(ID_PATTERN, value):
                raise RequestError(f"invalid {field} id {value!r}: expected {ID_PATTERN}", field=field)

    def join(self, user: str, group: str) -> dict[str, Any]:
        """Make ``user`` a permanent member of ``group`` (request ``groups`` last one request only).

        Refused past ``limits.max_groups_per_user`` memberships (``RequestError`` naming ``group``).
        """
        self._valid_ids(user, group)
        with self.profiles.lock(user_node(user)):
            added = self.graph.join(user, group)
        self.graph.forget_cached(user)
        return {"user": user, "group": group, "member": True, "changed": added,
                "groups": sorted(self.graph.groups_of(user))}

    def leave(self, user: str, group: str) -> dict[str, Any]:
        """End ``user``'s membership of ``group``; a group node nothing else holds is deleted.

        A membership declared in the config (``graph.groups.<g>.members``) comes back at the next start.
        """
        self._valid_ids(user, group)
        self.require(user)
        with self.profiles.lock(user_node(user)):
            removed = self.graph.leave(user, group)
        if removed:
            self.prune_orphans([group_node(group)])
        return {"user": user, "group": group, "member": False, "changed": removed,
                "groups": sorted(self.graph.groups_of(user))}

    async def ajoin(self, user: str, group: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.join, user, group)

    async def aleave(self, user: str, group: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.leave, user, group)

    async def aprofile(self, user: str, context: str | None = None) -> dict[str, Any]:
        """``profile`` in a worker thread (store reads stay off the event loop)."""
        return await asyncio.to_thread(self.profile, user, context)

    async def aexport_user(self, user: str) -> dict[str, Any]:
        """``export_user`` in a worker thread."""
        return await asyncio.to_thread(self.export_user, user)

    async def agroups(self, user: str) -> list[str]:
        return await asyncio.to_thread(self.groups, user)

    async def atrace(self, trace_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.trace, trace_id)

    def groups(self, user: str) -> list[str]:
        """The groups ``user`` is a permanent member of."""
        self.require(user)
        return sorted(self.graph.groups_of(user))

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The stored trace, or None; an id no trace can have (a NUL, a space) is unknown before any
        store is asked (Postgres text cannot hold a NUL: the lookup failed as a store error there)."""
        if not _TRACE_ID_RE.fullmatch(trace_id):
            return None
        t = self.store.get_trace(trace_id)
        return t.model_dump() if t else None


__all__ = ["UserService"]
