"""``ProfileService``: every read-modify-write of a profile, safe across threads and processes.

The core (evidence counts and stated preferences of a feedback event, a group's stated
preference, the config's declared graph, a rebuild's reset) and plugins (through
``PluginContext.update_profile``) change a node's profile row only through ``update`` and friends:
under ``lock(node)`` (the in-process fast path: threads of one process never race each other) the
profile is read with its row version and written with ``put_profile(expected_version=)``; when
another process (a second server, a worker, the CLI) wrote the row in between, the store refuses
with ``StaleVersionError`` and the change is re-applied to a fresh read (bounded retries), so no
writer anywhere drops another's update.

Exactly once per feedback event. An event's effects are several such writes (the core's, then each
feedback plugin's), and the process doing them can die between two of them. So the event is stored
together with a ``feedback`` job held by that process (``FeedbackStore.append_feedback``); while the
event is applied (``applying``), each write of a node's profile also records, in the same row, which
event it folded in (``Profile.applied``: per writer, the event's sequence number). If the process dies,
the job is retaken by a live one (the dead-holder sweep, or ``persona-mw worker``), which applies the
event again: every write already in is recognized by its mark and skipped, the missing ones are made.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from persona_mw.config import Config, StatedItem
from persona_mw.graph import GLOBAL
from persona_mw.errors import RequestError, StaleVersionError, StoreError
from persona_mw.nodes import group_node, kind_of, user_context_node, user_node
from persona_mw.store import Edge, Store
from persona_mw.types import Feedback, Profile, StatedFeedback, StatedPreference


T = TypeVar("T")

#: Marks kept per writer in ``Profile.applied`` (the newest): a replay comes within a job lease of the
#: first attempt, long before a user's node sees this many newer events.
APPLIED_KEEP = 256
#: The feedback event being applied now: (its sequence number, writes made per (writer, node) so far).
_EVENT: ContextVar[tuple[int, dict[tuple[str, str], int]] | None] = ContextVar("persona_mw_event", default=None)
#: Who writes now, while an event is applied: "core", or the plugin whose hook runs.
WRITER: ContextVar[str] = ContextVar("persona_mw_writer", default="core")


@contextlib.contextmanager
def applying(seq: int) -> Iterator[None]:
    """Profile writes inside are marks-checked for the feedback event with store sequence ``seq``."""
    token = _EVENT.set((seq, {}))
    try:
        yield
    finally:
        _EVENT.reset(token)


async def detached(coro: Coroutine[Any, Any, T]) -> T:
    """``coro``, run outside any feedback event being applied (for work scheduled from a feedback hook:
    its task inherits the hook's context, but its writes are not the event's)."""
    _EVENT.set(None)  # in the task's own copy of the context: the hook's is untouched
    return await coro


def _mark(node: str) -> tuple[str, str] | None:
    """(writer, mark) of the next write of ``node`` while an event is applied, or None outside one.
    The k-th write of one writer to one node for event ``seq`` is marked "seq" (k = 0) or "seq/k"."""
    current = _EVENT.get()
    if current is None:
        return None
    seq, counts = current
    writer = WRITER.get()
    k = counts.get((writer, node), 0)
    counts[(writer, node)] = k + 1
    return writer, str(seq) if k == 0 else f"{seq}/{k}"


class ProfileService:
    """Profile updates over one store, with per-node locks."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, node: str) -> threading.Lock:
        """The lock every read-modify-write of ``node``'s profile holds (core and plugins alike)."""
        with self._guard:
            return self._locks.setdefault(node, threading.Lock())

    #: Compare-and-set attempts before an update gives up (each after a short jittered back-off).
    max_attempts = 200

    def update(self, node: str, change: Callable[[Profile], None]) -> Profile:
        """Read-modify-write one node's profile (created if missing), never losing a concurrent update.

        ``change`` may run more than once (on a fresh read each time another process won the race),
        so it must only derive the new profile from the one it is given."""
        self.store.ensure_node(node)
        with self.lock(node):
            return self._compare_and_set(node, change)

    def _compare_and_set(self, node: str, change: Callable[[Profile], None]) -> Profile:
        mark = _mark(node)
        for attempt in range(self.max_attempts):
            prof, version = self.store.get_profile_versioned(node)
            prof = prof or Profile(node=node)
            if mark is not None:
                writer, tag = mark
                done = prof.applied.get(writer, [])
                if tag in done:  # a replayed event: this write went in before its first attempt died
                    return prof
                change(prof)
                prof.applied[writer] = [*done, tag][-APPLIED_KEEP:]
            else:
                change(prof)
            prof.updated_at = time.time()
            try:
                self.store.put_profile(prof, expected_version=version)
                return prof
            except StaleVersionError:
                # Another process wrote the row since our read: back off a little, re-read, re-apply.
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))
        raise StoreError(f"profile {node!r} kept changing under {self.max_attempts} update attempts",
                         hint="too many processes write this profile at once; retry the request")

    def apply_event(self, ev: Feedback) -> None:
        """The core's own reading of an event: evidence counts and stated preferences."""
        node = user_context_node(ev.user, ev.context) if ev.context else user_node(ev.user)
        self.store.ensure_node(node)
        with self.lock(node):
            self._compare_and_set(node, lambda prof: self._apply(prof, ev))

    def _apply(self, prof: Profile, ev: Feedback) -> None:
        prof.evidence += 1
        if isinstance(ev, StatedFeedback):
            prof.stated = [p for p in prof.stated if p.text.strip().lower() != ev.text.strip().lower()]
            prof.stated.append(StatedPreference(text=ev.text, polarity=ev.polarity, source_event=ev.id,
                                                created_at=ev.created_at))
            cap = self.config.limits.max_stated_per_user
            if len(prof.stated) > cap:  # the newest are kept; the events stay in the log
                prof.stated = sorted(prof.stated, key=lambda p: p.created_at)[-cap:]

    def state_for_group(self, group: str, text: str, polarity: str) -> None:
        """A preference stated for a whole group (the newest ``limits.max_stated_per_group`` are kept)."""
        node = group_node(group)
        pref = StatedPreference(text=text, polarity=polarity)  # type: ignore[arg-type]
        cap = self.config.limits.max_stated_per_group

        def change(prof: Profile) -> None:
            prof.stated.append(pref)
            if len(prof.stated) > cap:  # the newest are kept
                prof.stated = sorted(prof.stated, key=lambda p: p.created_at)[-cap:]
            prof.evidence += 1

        self.update(node, change)

    def user_nodes(self, user: str) -> list[str]:
        """The user's own nodes (user and user@context), matched exactly (``persona_mw.nodes``)."""
        return list(self.store.list_user_nodes(user))

    def check_context_bound(self, user: str, context: str) -> None:
        """Refuse a new context past ``limits.max_contexts_per_user`` (``RequestError`` naming ``context``)."""
        node = user_context_node(user, context)
        if self.store.get_node(node) is not None:
            return
        have = sum(1 for n in self.user_nodes(user) if kind_of(n) == "user_context")
        cap = self.config.limits.max_contexts_per_user
        if have >= cap:
            raise RequestError(f"user {user!r} already has feedback in {have} contexts (limit {cap})",
                               field="context", hint="raise limits.max_contexts_per_user")

    def reset(self, nodes: list[str]) -> None:
        """Empty the profiles of ``nodes`` (a rebuild replays the events next); optimized prompts stay."""
        def empty(prof: Profile) -> None:
            kept = Profile(node=prof.node, prompt=prof.prompt)
            for field in Profile.model_fields:
                setattr(prof, field, getattr(kept, field))

        for node in nodes:
            with self.lock(node):
                self._compare_and_set(node, empty)

    def apply_declared_graph(self) -> None:
        """Write the config's declared groups/contexts/global preferences into the store."""
        g = self.config.graph
        for kind, table in (("group", g.groups), ("context", g.contexts)):
            for gid, gc in table.items():
                self._set_declared(f"{kind}:{gid}", gc.stated)
                for member in gc.members:
                    self.store.ensure_node(user_node(member))
                    self.store.add_edge(Edge(src=user_node(member), dst=f"{kind}:{gid}", kind="member"))
        if g.global_.stated:
            self._set_declared(GLOBAL, g.global_.stated)

    def _set_declared(self, node: str, stated: list[StatedItem | str]) -> None:
        items = [StatedItem(text=s) if isinstance(s, str) else s for s in stated]

        def change(prof: Profile) -> None:
            kept = [p for p in prof.stated if p.source_event != "config"]
            prof.stated = kept + [StatedPreference(text=i.text, polarity=i.polarity, source_event="config")
                                  for i in items]
            # Declared preferences are evidence about the node, as a member's stated one is.
            prof.evidence = max(prof.evidence, len(prof.stated))

        self.update(node, change)


__all__ = ["APPLIED_KEEP", "WRITER", "ProfileService", "applying", "detached"]
