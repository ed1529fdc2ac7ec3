"""Node ids of the preference graph: the one place that builds, parses and orders them.

Ids: ``global``, ``user:<id>``, ``group:<id>``, ``context:<id>`` and ``user:<id>@context:<id>``.
``<id>`` follows ``persona_mw.types.ID_PATTERN``: letters, digits, ``_.-+`` and ``@`` (user ids
are often e-mail addresses), never ``:``. So ``@context:`` occurs at most once in a node id and,
when it does, splits it exactly: ``user:ana@evil`` is a *user* node (user ``ana@evil``), and
``user:ana@evil@context:x`` is user ``ana@evil`` in context ``x``, never a context node of ``ana``.
Code that needs "the nodes of user U" must compare parsed parts (``parse(n).user == U``), not
prefixes of the id string (``startswith("user:ana@")`` also matches user ``ana@evil``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

__all__ = ["CONTEXT_SEP", "GLOBAL", "GRANULARITY", "KINDS", "Kind", "NodeRef", "SPECIFICITY", "USER_KINDS",
           "context_node", "context_of", "group_node", "is_group", "is_user_node_of", "is_user_scoped", "kind_of",
           "most_specific_first", "name_of", "parse", "scope_node", "specificity", "user_context_node",
           "user_context_prefix", "user_node", "user_of"]

GLOBAL = "global"
CONTEXT_SEP = "@context:"
Kind = Literal["global", "group", "context", "user", "user_context"]
KINDS: tuple[str, ...] = ("global", "group", "context", "user", "user_context")
# The kinds that belong to one user (forget, export and rebuild touch exactly these).
USER_KINDS: tuple[str, ...] = ("user", "user_context")
# Ties in carried weight go to the more specific node.
SPECIFICITY = {"user_context": 0, "user": 1, "group": 2, "context": 3, "global": 4}
GRANULARITY = {"user_context": "user+context", "user": "user", "group": "group", "context": "context",
               "global": "global"}
# One id part (a user, group or context id): no ":", no leading "@" (types.ID_PATTERN, any length).
_PART = re.compile(r"[A-Za-z0-9_.\-+][A-Za-z0-9_.@\-+]*")


@dataclass(frozen=True)
class NodeRef:
    """A parsed node id: its kind and its parts (``user`` and/or ``name`` of the group/context)."""

    kind: Kind
    user: str | None = None
    name: str | None = None  # the group's or the context's id

    @property
    def id(self) -> str:
        if self.kind == "global":
            return GLOBAL
        if self.kind == "user_context":
            return user_context_node(self.user or "", self.name or "")
        if self.kind == "user":
            return user_node(self.user or "")
        return f"{self.kind}:{self.name}"


def user_node(user: str) -> str:
    return f"user:{user}"


def group_node(group: str) -> str:
    return f"group:{group}"


def context_node(context: str) -> str:
    return f"context:{context}"


def user_context_node(user: str, context: str) -> str:
    return f"user:{user}{CONTEXT_SEP}{context}"


def scope_node(user: str, context: str | None = None) -> str:
    """The node a user's request or event lands on: ``user:<u>@context:<c>`` with a context, else ``user:<u>``."""
    return user_context_node(user, context) if context else user_node(user)


def user_context_prefix(user: str) -> str:
    """``user:<u>@context:``: every user-in-context node of ``user`` starts with it, and (ids have no
    ``:``) no node of another user does. For store queries; in Python compare parsed parts instead."""
    return user_context_node(user, "")


def _part(text: str, node_id: str) -> str:
    if not _PART.fullmatch(text):
        raise ValueError(f"not a node id: {node_id!r} (the id part {text!r} is empty or has characters "
                         "outside [A-Za-z0-9_.@-+], or starts with '@')")
    return text


def parse(node_id: str) -> NodeRef:
    """The kind and parts of ``node_id``; ``ValueError`` for anything that is not exactly a node id."""
    if node_id == GLOBAL:
        return NodeRef("global")
    prefix, sep, rest = node_id.partition(":")
    if not sep:
        raise ValueError(f"not a node id: {node_id!r} (expected 'global', 'user:ID', 'group:ID', 'context:ID' "
                         "or 'user:ID@context:ID')")
    if prefix == "user":
        user, csep, ctx = rest.partition(CONTEXT_SEP)
        if csep:
            return NodeRef("user_context", user=_part(user, node_id), name=_part(ctx, node_id))
        return NodeRef("user", user=_part(rest, node_id))
    if prefix in ("group", "context"):
        return NodeRef(prefix, name=_part(rest, node_id))  # type: ignore[arg-type]
    raise ValueError(f"not a node id: {node_id!r} (unknown kind {prefix!r})")


def kind_of(node_id: str) -> str:
    """The kind of a node id (lenient: ids that do not parse get the kind their prefix says)."""
    try:
        return parse(node_id).kind
    except ValueError:
        if node_id == GLOBAL:
            return "global"
        if node_id.startswith("user:") and CONTEXT_SEP in node_id:
            return "user_context"
        return node_id.split(":", 1)[0]


def is_user_node_of(node_id: str, user: str) -> bool:
    """Whether ``node_id`` is ``user:<user>`` or ``user:<user>@context:<c>`` for exactly this user."""
    try:
        ref = parse(node_id)
    except ValueError:
        return False
    return ref.kind in ("user", "user_context") and ref.user == user


def specificity(node_id: str) -> int:
    """Sort key: user+context (0) < user < group < context < global (4)."""
    return SPECIFICITY[kind_of(node_id)]


def user_of(node_id: str) -> str | None:
    """``ana`` for ``user:ana`` and ``user:ana@context:x``; None for other nodes and for non-ids."""
    try:
        return parse(node_id).user
    except ValueError:
        return None


def name_of(node_id: str) -> str | None:
    """The group's id for ``group:<g>``, the context's id for ``context:<c>`` and ``user:<u>@context:<c>``;
    None for ``global``, user nodes and non-ids."""
    try:
        return parse(node_id).name
    except ValueError:
        return None


def context_of(node_id: str) -> str | None:
    """The context id of a ``context:<c>`` or ``user:<u>@context:<c>`` node; None otherwise."""
    return name_of(node_id) if kind_of(node_id) in ("context", "user_context") else None


def is_group(node_id: str) -> bool:
    """Whether ``node_id`` is a ``group:<g>`` node."""
    return kind_of(node_id) == "group"


def is_user_scoped(node_id: str) -> bool:
    """Whether ``node_id`` belongs to one user (``user:<u>`` or ``user:<u>@context:<c>``)."""
    return kind_of(node_id) in USER_KINDS


class _Weighted(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def weight(self) -> float: ...


_W = TypeVar("_W", bound=_Weighted)


def most_specific_first(nodes: Iterable[_W]) -> list[_W]:
    """Scope nodes ordered user+context, user, group, context, global; heavier first within a kind."""
    return sorted(nodes, key=lambda n: (SPECIFICITY.get(n.kind, len(SPECIFICITY)), -n.weight))
