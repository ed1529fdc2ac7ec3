"""The preference graph of users, groups and contexts, and per-request scope resolution.

Nodes: ``global``, ``group:<id>``, ``context:<id>``, ``user:<id>`` and ``user:<id>@context:<id>``.
Resolution is hierarchical shrinkage: a node keeps the share ``n / (n + k)`` of the weight
(``n`` its evidence, ``k`` the prior strength) and passes the rest to its parents, split by
membership weight; a node without parents passes it to ``global``. A new user therefore
speaks through their groups and context, and a user with rich feedback speaks for themselves.
The graph lives in the store; the networkx view is built per user, on demand.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import networkx as nx

from persona_mw.nodes import (GLOBAL, GRANULARITY, KINDS, SPECIFICITY, context_node, group_node, kind_of, name_of, parse,
                              scope_node, user_context_node, user_node)
from persona_mw.store import Edge, Store
from persona_mw.types import ChatRequest, NodeId, Profile, Scope, ScopeNode

# Old names, kept for the code that imports them from here (persona_mw.nodes is their home).
_kind = kind_of
_GRANULARITY = GRANULARITY
_SPECIFICITY = SPECIFICITY
__all__ = ["GLOBAL", "PreferenceGraph", "user_context_node", "user_node"]


class PreferenceGraph:
    """Scope resolution over the store's nodes and edges, with a small cache of known users."""

    def __init__(self, store: Store, prior_strength: float = 5.0, cache_size: int = 10000,
                 max_groups_per_user: int | None = None, max_parents: int = 256) -> None:
        self.store = store
        self.k = prior_strength
        self._known: OrderedDict[str, None] = OrderedDict()
        self._cache_size = cache_size
        # Permanent memberships one user may hold (limits.max_groups_per_user); None = no bound.
        self.max_groups_per_user = max_groups_per_user
        # Parents read per node when a neighbourhood is built: a store that holds more (written
        # before the limits existed) still resolves in bounded time.
        self.max_parents = max_parents
        # graph.request_groups: permanent -> the request path joins the request's groups (ensure_user).
        self.request_groups_permanent = False

    # -- structure ---------------------------------------------------------------------------

    def ensure_request(self, request: ChatRequest) -> None:
        """What a chat request stores about its user: the user's node, once. Nothing else.

        The request's ``groups`` and ``context`` are per-request scope (``resolve`` adds them for
        that request only); permanent membership is explicit (``join`` / config ``members``).
        """
        key = f"{request.user}|"
        if key in self._known:
            self._known.move_to_end(key)
            return
        self.store.ensure_node(user_node(request.user))
        self._remember(key)

    def ensure_user(self, request: ChatRequest) -> None:
        """Create the user's node and make the request's groups permanent memberships (``join``).

        The Python API for callers that mean it (tests, evals, imports); the request path uses
        ``ensure_request``, which stores no membership.
        """
        key = f"{request.user}|{request.context}|{','.join(sorted(request.groups))}"
        if key in self._known:
            self._known.move_to_end(key)
            return
        self.store.ensure_node(user_node(request.user))
        for g in dict.fromkeys(request.groups):
            self.join(request.user, g)
        if request.context:
            self.store.ensure_node(context_node(request.context))
        self._remember(key)

    def _remember(self, key: str) -> None:
        self._known[key] = None
        if len(self._known) > self._cache_size:
            self._known.popitem(last=False)

    def groups_of(self, user: str) -> list[str]:
        """The groups ``user`` is a permanent member of (their ids, without ``group:``)."""
        return [name_of(e.dst) or "" for e in self.store.edges_from(user_node(user))
                if e.kind == "member" and kind_of(e.dst) == "group"]

    def join(self, user: str, group: str, weight: float = 1.0) -> bool:
        """Make ``user`` a permanent member of ``group``; False if they already were.

        Refused (``RequestError`` naming ``group``) past ``max_groups_per_user`` memberships.
        """
        from persona_mw.errors import RequestError

        u, g = user_node(user), group_node(group)
        current = self.groups_of(user)
        if group in current:
            return False
        cap = self.max_groups_per_user
        if cap is not None and len(current) >= cap:
            raise RequestError(f"user {user!r} is already in {len(current)} groups (limit {cap})",
                               field="group", hint="leave a group first, or raise limits.max_groups_per_user")
        self.store.ensure_node(u)
        self.store.add_edge(Edge(src=u, dst=g, kind="member", weight=weight))
        return True

    def leave(self, user: str, group: str) -> bool:
        """End ``user``'s membership of ``group``; False if they were not a member."""
        if group not in self.groups_of(user):
            return False
        self.store.remove_edge(user_node(user), group_node(group), "member")
        self.forget_cached(user)
        return True

    def forget_cached(self, user: str) -> None:
        for key in [k for k in self._known if k.split("|", 1)[0] == user]:
            del self._known[key]

    def neighbourhood(self, user: str, context: str | None = None,
                      groups: list[str] | tuple[str, ...] = ()) -> nx.DiGraph:
        """The user's nodes and their ancestors as a networkx graph (edges child -> parent).

        ``groups`` are the request's own groups: parents of the user node for this graph only.
        """
        g = nx.DiGraph()
        u = user_node(user)
        g.add_node(GLOBAL, kind="global")
        g.add_node(u, kind="user")
        frontier = [u]
        if context:
            uc = user_context_node(user, context)
            c = context_node(context)
            g.add_node(uc, kind="user_context")
            g.add_node(c, kind="context")
            g.add_edge(uc, u, weight=1.0, kind="specializes")
            g.add_edge(uc, c, weight=1.0, kind="in_context")
            frontier.append(c)
        seen = set(frontier)
        while frontier:
            node = frontier.pop()
            for e in self.store.edges_from(node)[: self.max_parents]:
                if e.dst == node:
                    continue
                g.add_node(e.dst, kind=_kind(e.dst))
                g.add_edge(node, e.dst, weight=e.weight, kind=e.kind)
                if e.dst not in seen:
                    seen.add(e.dst)
                    frontier.append(e.dst)
            if node == u:  # the request's groups, for this request only
                for gid in dict.fromkeys(groups):
                    gn = group_node(gid)
                    if not g.has_edge(u, gn):
                        g.add_node(gn, kind="group")
                        g.add_edge(u, gn, weight=1.0, kind="request")
                        if gn not in seen:
                            seen.add(gn)
                            frontier.append(gn)
        for node in list(g.nodes):
            if node != GLOBAL and g.out_degree(node) == 0:
                g.add_edge(node, GLOBAL, weight=1.0, kind="parent")
        return g

    # -- resolution --------------------------------------------------------------------------

    def resolve(self, request: ChatRequest) -> tuple[Scope, dict[NodeId, Profile]]:
        """The scope of a request and the profiles of its nodes (empty ones for new nodes)."""
        g = self.neighbourhood(request.user, request.context, request.groups)
        ids = list(g.nodes)
        profiles = self.store.get_profiles(ids)
        for node in ids:
            profiles.setdefault(node, Profile(node=node))
        evidence = {node: profiles[node].evidence for node in ids}
        start = scope_node(request.user, request.context)
        weights = self._shrink(g, start, evidence)
        nodes = [
            ScopeNode(id=n, kind=_kind(n), weight=w, evidence=evidence[n])  # type: ignore[arg-type]
            for n, w in sorted(weights.items(), key=lambda kv: (_SPECIFICITY[_kind(kv[0])], kv[0]))
        ]
        # Granularity: the node that carried the most weight among those with evidence (a node without
        # any holds only a prior: it shaped nothing); "global" when no node has evidence yet.
        informed = [sn for sn in nodes if sn.evidence > 0] or [sn for sn in nodes if sn.kind == "global"] or nodes
        top = max(informed, key=lambda sn: (sn.weight, -_SPECIFICITY[sn.kind]))
        scope = Scope(
            user=request.user,
            nodes=nodes,
            granularity=_GRANULARITY[top.kind],  # type: ignore[arg-type]
            evidence={n.id: n.evidence for n in nodes},
        )
        return scope, {n.id: profiles[n.id] for n in nodes}

    def shrink_weights(self, user: str, context: str | None, groups: list[str] | tuple[str, ...],
                       evidence: dict[NodeId, int]) -> dict[NodeId, float]:
        """The weights ``resolve`` would give the request's nodes under other evidence counts.

        For a plugin whose state has its own evidence (e.g. the events a node's adapter learned
        from, pooled over members for a group): the same graph and prior strength, with ``evidence``
        (0 for nodes not named) in place of the profiles'. A node without evidence keeps nothing and
        passes its mass to its parents, so a new user's weight reaches their groups.
        """
        g = self.neighbourhood(user, context, groups)
        return self._shrink(g, scope_node(user, context), evidence)

    def _shrink(self, g: nx.DiGraph, start: NodeId, evidence: dict[NodeId, int]) -> dict[NodeId, float]:
        """Push mass 1 from ``start`` toward the root, each node keeping n/(n+k) of what reaches it."""
        mass: dict[NodeId, float] = {start: 1.0}
        kept: dict[NodeId, float] = {}
        # Children before parents, so each node has received all its mass when processed.
        for node in nx.topological_sort(g.subgraph(nx.descendants(g, start) | {start})):
            m = mass.get(node, 0.0)
            if m == 0.0:
                continue
            parents = list(g.successors(node))
            n = evidence.get(node, 0)
            share = 1.0 if not parents else n / (n + self.k)
            kept[node] = kept.get(node, 0.0) + m * share
            rest = m * (1.0 - share)
            if parents and rest > 0:
                total = sum(max(g.edges[node, p].get("weight", 1.0), 0.0) for p in parents) or 1.0
                for p in parents:
                    mass[p] = mass.get(p, 0.0) + rest * max(g.edges[node, p].get("weight", 1.0), 0.0) / total
        # Every node on the way stays in scope, even with weight 0: its stated preferences still apply.
        return {n: kept.get(n, 0.0) for n in nx.descendants(g, start) | {start}}

    def export_graph(self, kinds: tuple[str, ...] = KINDS,
                     page: int = 5000) -> nx.DiGraph:
        """The whole stored graph (nodes with kind and evidence, member edges) for GraphML export.

        Read page by page from the store, so the export never holds more than the graph itself.
        """
        g = nx.DiGraph()
        for kind in kinds:
            offset = 0
            while True:
                nodes = self.store.list_nodes(kind, limit=page, offset=offset)
                if not nodes:
                    break
                profiles = self.store.get_profiles([n.id for n in nodes])
                for n in nodes:
                    prof = profiles.get(n.id)
                    g.add_node(n.id, kind=kind, evidence=prof.evidence if prof else 0,
                               stated=len(prof.stated) if prof else 0)
                    for e in self.store.edges_from(n.id):
                        g.add_edge(e.src, e.dst, kind=e.kind, weight=e.weight)
                offset += len(nodes)
        if "global" in kinds and GLOBAL not in g:  # the root every resolution ends at, stored or not
            prof = self.store.get_profiles([GLOBAL]).get(GLOBAL)
            g.add_node(GLOBAL, kind="global", evidence=prof.evidence if prof else 0, stated=len(prof.stated) if prof else 0)
        # The implicit edges resolution uses (as ``neighbourhood``): a user-in-context specializes the
        # user and the context; a node with no stored parent has ``global`` as its parent.
        for node in list(g.nodes):
            if _kind(node) == "user_context":  # split exactly: user 'ana@evil' in 'x' is not user 'ana'
                ref = parse(node)
                user, ctx = user_node(ref.user or ""), context_node(ref.name or "")
                for dst, kind in ((user, "specializes"), (ctx, "in_context")):
                    if not g.has_edge(node, dst):
                        g.add_edge(node, dst, kind=kind, weight=1.0)
        for node in list(g.nodes):
            if node != GLOBAL and GLOBAL in g and g.out_degree(node) == 0:
                g.add_edge(node, GLOBAL, kind="parent", weight=1.0)
        for node, data in g.nodes(data=True):  # endpoints of edges whose node row is missing
            data.setdefault("kind", _kind(node))
            data.setdefault("evidence", 0)
            data.setdefault("stated", 0)
        return g

    def describe(self, user: str, context: str | None = None) -> dict[str, Any]:
        """The user's neighbourhood as plain data (for `persona-mw graph show`)."""
        g = self.neighbourhood(user, context)
        profiles = self.store.get_profiles(list(g.nodes))
        return {
            "nodes": [{"id": n, "kind": g.nodes[n].get("kind"), "evidence": profiles[n].evidence if n in profiles else 0}
                      for n in g.nodes],
            "edges": [{"src": a, "dst": b, **d} for a, b, d in g.edges(data=True)],
        }
