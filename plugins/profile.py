"""``profile``: a latent preference model learned from choices, per node of the preference graph.

Model. Each graph node (``global``, ``group:*``, ``user:*``, ``user:*@context:*``) holds a
Bradley-Terry weight vector ``w`` over response features ``x(text)`` (``persona_mw.features``:
style metrics, hashed word n-grams, MiniLM embeddings): P(a preferred to b) = sigmoid(w·(x_a - x_b)).
A node's state is the MAP estimate whose Gaussian prior is centred on its parents' state
(``global`` is centred on 0), so a user's fit is shrunk toward their groups and keeps the
groups' values in every direction their own choices say nothing about. At scoring time the
resolved scope combines node states with the graph's hierarchical-shrinkage weights
(posterior mean = (n * own + k * parent) / (n + k), DESIGN §5).

Events -> comparisons (``event_pairs``):
  choice  chosen > each rejected (weight 1 each)
  edit    after > before (weight 1)
  rating  the response against a neutral point: rating r in [0, 1] is a comparison of the
          response's features against the origin, won when r > 0.5, with weight 2|r - 0.5|
          (a neutral rating carries nothing)
  stated  nothing here (the ``stated`` plugin handles words)

Learning. ``persona_feedback`` does an online Laplace update of the event's node (user, or
user-in-context): a few Newton steps on the new comparisons with a diagonal Gaussian prior
(the current state and its ``uncertainty``), closed form by Woodbury — O(pairs x dims).
``ProfilePlugin.refit(store)`` (also ``refit_profiles(mw)``) rebuilds every node from the
stored events: global, then discovered groups (PAL-style prototypes: spherical k-means over
users' preference vectors ``w_user - w_global``, the number of groups chosen by leave-one-out
cohesion,
then hard-EM reassignment by likelihood; written as ``member`` edges with weights to
``group:auto-<k>`` nodes), declared and discovered groups pooled from their members, then
users with their parents as prior. ``mw.rebuild(user)`` replays the user's events online.

State. ``Profile.weights`` (the vector), ``Profile.uncertainty`` (diagonal posterior
variance), ``Profile.extra["profile"]`` = {"spec": FeatureSpec dict, "pairs": comparisons,
"fit": "online" | "batch"}.

API for rerankers:
  ``score_texts(scope, profiles, prompt, texts) -> list[float]``: the scope-combined model's
  score of each text (higher = preferred; ``prompt`` is accepted for prompt-conditioned models,
  unused by this one). ``score_turn(turn, texts)`` does the same from a ``Turn``. The reward
  ``profile`` (``profile_reward(turn=, candidates=)``) is registered through
  ``persona_register_rewards`` by ``persona_mw.builtins``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.features import FeatureSpec, Featurizer
from persona_mw.nodes import GLOBAL, context_of, group_node, is_group, kind_of, scope_node, user_of
from persona_mw.store import Edge
from persona_mw.types import (
    ChatRequest,
    ChoiceFeedback,
    EditFeedback,
    Message,
    NodeId,
    Profile,
    RatingFeedback,
    Scope,
    Turn,
)

log = logging.getLogger("persona_mw.plugins.profile")

EXTRA_KEY = "profile"
AUTO_PREFIX = group_node("auto-")  # discovered groups: group:auto-<k>

# --------------------------------------------------------------------------- features

_featurizers: dict[str, Featurizer] = {}
_feat_lock = threading.Lock()


def get_featurizer(spec: FeatureSpec | Mapping[str, Any]) -> Featurizer:
    """One shared featurizer (and cache) per feature spec in this process."""
    if not isinstance(spec, FeatureSpec):
        spec = FeatureSpec.model_validate(dict(spec))
    key = spec.key()
    with _feat_lock:
        f = _featurizers.get(key)
        if f is None:
            f = _featurizers[key] = Featurizer(spec)
        return f


@contextmanager
def use_featurizer(featurizer: Featurizer) -> Iterator[Featurizer]:
    """Serve ``featurizer`` for its spec in this process while inside (the one before comes back after).

    For harnesses that own every party in the process (``persona_mw.eval``): they bring a featurizer
    whose cache is not split per party, so a text every simulated user saw is featurized once."""
    key = featurizer.spec.key()
    with _feat_lock:
        before = _featurizers.get(key)
        _featurizers[key] = featurizer
    try:
        yield featurizer
    finally:
        with _feat_lock:
            if before is None:
                _featurizers.pop(key, None)
            else:
                _featurizers[key] = before


# --------------------------------------------------------------------------- comparisons


def event_pairs(event: Any) -> list[tuple[str, str | None, float]]:
    """Comparisons in an event: (better, worse or None for the neutral point, weight).

    With ``worse`` None the comparison is the text against the origin; a rating below 0.5
    is returned as (None, text, w): the neutral point beat the text.
    """
    if isinstance(event, ChoiceFeedback):
        return [(event.chosen, r, 1.0) for r in event.rejected if r != event.chosen]
    if isinstance(event, EditFeedback):
        return [(event.after, event.before, 1.0)]
    if isinstance(event, RatingFeedback):
        w = 2.0 * abs(event.rating - 0.5)
        if w == 0:
            return []
        return [(event.response, None, w)] if event.rating > 0.5 else [(None, event.response, w)]  # type: ignore[list-item]
    return []


def pair_matrix(feat: Featurizer, pairs: Sequence[tuple[str | None, str | None, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Difference vectors ``x(better) - x(worse)`` and their weights."""
    if not pairs:
        return np.zeros((0, feat.dim), np.float32), np.zeros(0)
    texts = sorted({t for a, b, _ in pairs for t in (a, b) if t is not None})
    X = feat.transform(texts)
    idx = {t: i for i, t in enumerate(texts)}
    zero = np.zeros(X.shape[1], np.float32)
    D = np.stack([(X[idx[a]] if a is not None else zero) - (X[idx[b]] if b is not None else zero)
                  for a, b, _ in pairs]).astype(np.float64)
    return D, np.array([w for _, _, w in pairs], dtype=np.float64)


# --------------------------------------------------------------------------- the model


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_bt(D: np.ndarray, sw: np.ndarray, prior_mean: np.ndarray, precision: float,
           iters: int = 20, cg_iters: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """MAP Bradley-Terry: min sum sw*log(1+exp(-D w)) + precision/2 |w - prior_mean|^2.

    Newton-CG (Hessian-vector products only), so it scales to thousands of comparisons and
    dimensions. Returns the weights and the diagonal Laplace variance.
    """
    m = np.asarray(prior_mean, dtype=np.float64)
    w = m.copy()
    if len(D) == 0:
        return w, np.full_like(w, 1.0 / precision)
    for _ in range(iters):
        p = _sigmoid(D @ w)
        g = -(D.T @ (sw * (1.0 - p))) + precision * (w - m)
        gn = float(np.linalg.norm(g))
        if gn < 1e-6 * (1.0 + float(np.linalg.norm(w))):
            break
        s = sw * p * (1.0 - p)
        x = np.zeros_like(w)
        r = g.copy()
        d = r.copy()
        rs = float(r @ r)
        for _ in range(cg_iters):
            Hd = precision * d + D.T @ (s * (D @ d))
            a = rs / float(d @ Hd)
            x += a * d
            r -= a * Hd
            rs_new = float(r @ r)
            if math.sqrt(rs_new) < 1e-3 * gn:
                break
            d = r + (rs_new / rs) * d
            rs = rs_new
        w = w - x
    p = _sigmoid(D @ w)
    var = 1.0 / (precision + (sw * p * (1.0 - p)) @ (D * D))
    return w, var


def online_update(w: np.ndarray, var: np.ndarray, D: np.ndarray, sw: np.ndarray,
                  steps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A few Newton steps on the new comparisons with the diagonal Gaussian prior N(w, var).

    The Hessian is diag(1/var) + D^T S D with few rows in D, so each step is closed form by
    Woodbury: O(rows * dims + rows^3).
    """
    w0 = w.astype(np.float64)
    P = 1.0 / var.astype(np.float64)
    w = w0.copy()
    Pinv = var.astype(np.float64)
    for _ in range(steps):
        p = _sigmoid(D @ w)
        g = -(D.T @ (sw * (1.0 - p))) + P * (w - w0)
        s = np.maximum(sw * p * (1.0 - p), 1e-9)
        PinvG = Pinv * g
        DPinv = D * Pinv
        small = np.diag(1.0 / s) + DPinv @ D.T
        w = w - (PinvG - DPinv.T @ np.linalg.solve(small, D @ PinvG))
    p = _sigmoid(D @ w)
    new_var = 1.0 / (P + (sw * p * (1.0 - p)) @ (D * D))
    return w, new_var


def _compact(v: np.ndarray) -> list[float]:
    # 4 decimals: short JSON (the shortest repr round-trips) at a precision far below the noise.
    return np.round(np.asarray(v, dtype=np.float64), 4).tolist()  # type: ignore[no-any-return]


def node_state(profile: Profile | None, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """The node's (weights, variance) if it holds a state of this feature spec."""
    if profile is None or not profile.weights:
        return None
    meta = profile.extra.get(EXTRA_KEY) or {}
    if meta.get("key") != spec.key():
        return None
    w = np.asarray(profile.weights, dtype=np.float64)
    var = np.asarray(profile.uncertainty, dtype=np.float64) if len(profile.uncertainty) == len(w) else None
    return w, (var if var is not None else np.ones_like(w))


def combine(scope: Scope, profiles: Mapping[NodeId, Profile], spec: FeatureSpec,
            exclude: Iterable[NodeId] = ()) -> tuple[np.ndarray | None, dict[NodeId, float]]:
    """The scope-weighted combination of node states (nodes without a state drop out)."""
    skip = set(exclude)
    acc: np.ndarray | None = None
    used: dict[NodeId, float] = {}
    total = 0.0
    for n in scope.nodes:
        if n.id in skip or n.weight <= 0:
            continue
        st = node_state(profiles.get(n.id), spec)
        if st is None:
            continue
        acc = st[0] * n.weight if acc is None else acc + st[0] * n.weight
        used[n.id] = n.weight
        total += n.weight
    if acc is None or total <= 0:
        return None, {}
    return acc / total, {k: v / total for k, v in used.items()}


def _spec_of(profiles: Mapping[NodeId, Profile]) -> FeatureSpec | None:
    for p in profiles.values():
        meta = p.extra.get(EXTRA_KEY) or {}
        if meta.get("spec") and p.weights:
            return FeatureSpec.model_validate(meta["spec"])
    return None


def score_texts(scope: Scope, profiles: Mapping[NodeId, Profile], prompt: str, texts: Sequence[str],
                spec: FeatureSpec | None = None) -> list[float]:
    """Scores of ``texts`` under the scope-combined preference model (higher = preferred).

    ``spec`` defaults to the one stored with the profiles; with no fitted node in scope every
    text scores 0.0. ``prompt`` is part of the API for prompt-conditioned models; this model
    scores responses by their features alone.
    """
    spec = spec or _spec_of(profiles)
    if spec is None or not texts:
        return [0.0] * len(texts)
    w, _ = combine(scope, profiles, spec)
    if w is None:
        return [0.0] * len(texts)
    X = get_featurizer(spec).transform(list(texts))
    return [float(v) for v in X.astype(np.float64) @ w]


def score_turn(turn: Turn, texts: Sequence[str]) -> list[float]:
    """``score_texts`` with the turn's resolved scope, profiles and last user message."""
    if turn.scope is None:
        return [0.0] * len(texts)
    prompt = next((m.text for m in reversed(turn.request.messages) if m.role == "user"), "")
    return score_texts(turn.scope, turn.profiles, prompt, texts)


def profile_reward(turn: Turn, candidates: Sequence[Any]) -> list[float]:
    """Reward ``profile``: the latent profile score of each candidate (``persona_register_rewards``)."""
    return score_turn(turn, [getattr(c, "text", str(c)) for c in candidates])


# --------------------------------------------------------------------------- clustering


def spherical_kmeans(V: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 8,
                     iters: int = 50) -> tuple[np.ndarray, np.ndarray, float]:
    """Cosine k-means (k-means++ init, best of ``restarts``): labels, unit centroids, cohesion."""
    n = len(V)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(restarts):
        cent = [V[rng.integers(n)]]
        for _ in range(1, k):
            sim = np.max(np.stack([V @ c for c in cent]), axis=0)
            d = np.clip(1.0 - sim, 0.0, None) ** 2
            cent.append(V[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else V[rng.integers(n)])
        C = np.stack(cent)
        labels = np.zeros(n, dtype=int)
        for it in range(iters):
            new = np.argmax(V @ C.T, axis=1)
            if it and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = V[labels == j]
                if len(members):
                    c = members.sum(0)
                    C[j] = c / (np.linalg.norm(c) or 1.0)
        score = float(np.sum(np.max(V @ C.T, axis=1)))
        if best is None or score > best[2]:
            best = (labels.copy(), C.copy(), score)
    assert best is not None
    return best


def loo_cohesion(V: np.ndarray, labels: np.ndarray) -> float:
    """Mean cosine of each unit vector to its cluster's centroid computed without it.

    A predictive criterion for the number of groups: merging distinct groups pulls the
    centroid away from members, splitting a homogeneous one leaves noisier centroids.
    """
    total = 0.0
    for j in set(labels.tolist()):
        idx = labels == j
        S = V[idx].sum(0)
        for v in V[idx]:
            c = S - v
            n = float(np.linalg.norm(c))
            total += float(v @ c) / n if n > 0 else 0.0
    return total / len(V)


def silhouette(V: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance."""
    Dm = 1.0 - V @ V.T
    out = []
    for i in range(len(V)):
        same = labels == labels[i]
        if same.sum() <= 1:
            out.append(0.0)
            continue
        a = Dm[i, same].sum() / (same.sum() - 1)
        b = min((Dm[i, labels == j].mean() for j in set(labels.tolist()) if j != labels[i]), default=0.0)
        out.append((b - a) / max(a, b, 1e-12))
    return float(np.mean(out))


# --------------------------------------------------------------------------- the plugin


class ProfilePlugin:
    """Bradley-Terry preference profiles per graph node, learned from choices, edits and ratings."""

    # Feedback kinds this plugin uses (Middleware warns about events no configured plugin uses).
    feedback_kinds = ("choice", "edit", "rating")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        features: FeatureSpec = Field(default_factory=lambda: FeatureSpec(embedding_scale=1.5),
                                       description="feature blocks of the preference vector and their scales")
        prior_precision: float = Field(default=1.0, gt=0, description="precision of a node's prior around its parents")
        global_precision: float = Field(default=10.0, gt=0, description="precision of the global node's prior around 0")
        online_steps: int = Field(default=3, ge=1, le=20, description="Newton steps per online update after feedback")
        hierarchy: bool = Field(default=True, description="false: every user alone (prior 0, no groups)")
        discover_groups: bool = Field(default=True, description="refit clusters users into group:auto-<k>")
        max_groups: int = Field(default=12, ge=2, le=256, description="most groups group discovery tries")
        min_users: int = Field(default=6, ge=2, description="users with choices needed before clustering")
        em_iters: int = Field(default=3, ge=0, le=50, description="hard-EM rounds refining discovered groups")
        seed: int = Field(default=0, description="random seed of group discovery (k-means starts)")

    def __init__(self, config: Config | None = None, name: str = "profile") -> None:
        self.config = config or self.Config()
        self.name = name
        self.spec = self.config.features
        self.key = self.spec.key()
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self.last_refit: dict[str, Any] = {}

    @property
    def featurizer(self) -> Featurizer:
        return get_featurizer(self.spec)

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        self._check_lm()
        # Share the core's per-node locks: the core bumps evidence and stated preferences in
        # the same profile row, so separate locks would let one writer drop the other's update.
        self._shared_lock = ctx.profile_lock
        # Writes go through the core's compare-and-set update (``ProfileService.update``): a row
        # another process changed in between is re-read and the change re-applied, never overwritten.
        self._update = ctx.update_profile

    def _check_lm(self) -> None:
        """``features.lm`` must name a model of the registry or an existing path: said at startup, not
        at the first feedback event (no weights are loaded here)."""
        lm = self.spec.lm
        if not lm:
            return
        from persona_mw.errors import ConfigError, ModelNotFound
        from persona_mw.models import get_spec, is_local_path

        if is_local_path(lm):
            if not Path(lm).expanduser().exists():
                raise ConfigError(f"plugin {self.name!r}: features.lm: no model at {lm!r}")
            return
        try:
            get_spec(lm)
        except ModelNotFound as exc:
            raise ConfigError(f"plugin {self.name!r}: features.lm: {exc.message}", hint=exc.hint) from exc

    def _lock(self, node: str) -> threading.Lock:
        shared = getattr(self, "_shared_lock", None)
        if shared is not None:
            return shared(node)  # type: ignore[no-any-return]
        with self._locks_guard:
            return self._locks[node]

    def _meta(self, pairs: int, fit: str) -> dict[str, Any]:
        return {"key": self.key, "spec": self.spec.model_dump(mode="json"), "pairs": pairs, "fit": fit}

    def _write(self, store: Any, node: str, w: np.ndarray, var: np.ndarray, pairs: int, fit: str,
               evidence: int | None = None) -> None:
        self._change(store, node, lambda prof: self._fill(prof, w, var, pairs, fit, evidence))

    def _change(self, store: Any, node: str, change: Callable[[Profile], None]) -> None:
        """Read-modify-write ``node``: the core's compare-and-set update (a concurrent write to the node,
        e.g. a group's stated preference, stays), or the node lock when the plugin runs standalone."""
        update = getattr(self, "_update", None)
        if update is not None:
            update(node, change)
            return
        with self._lock(node):
            prof = store.get_profile(node) or Profile(node=node)
            change(prof)
            store.put_profile(prof)

    def _fill(self, prof: Profile, w: np.ndarray, var: np.ndarray, pairs: int, fit: str,
              evidence: int | None = None) -> None:
        prof.weights = _compact(w)
        prof.uncertainty = _compact(var)
        prof.extra = {**prof.extra, EXTRA_KEY: self._meta(pairs, fit)}
        if evidence is not None:
            prof.evidence = evidence
        prof.updated_at = time.time()

    # -- online --------------------------------------------------------------------------

    def prior_for(self, graph: Any, user: str, context: str | None, node: str) -> tuple[np.ndarray, np.ndarray]:
        """The node's prior: its parents' scope-combined state (zeros without the hierarchy)."""
        dim = self.featurizer.dim
        if self.config.hierarchy and graph is not None:
            req = ChatRequest(user=user, context=context, messages=[Message(role="user", content="-")])
            scope, profiles = graph.resolve(req)
            w, _ = combine(scope, profiles, self.spec, exclude=[node])
            if w is not None:
                return w, np.full(dim, 1.0 / self.config.prior_precision)
        return np.zeros(dim), np.full(dim, 1.0 / self.config.prior_precision)

    @hookimpl
    def persona_feedback(self, event: Any, store: Any, graph: Any) -> None:
        pairs = event_pairs(event)
        if not pairs:
            return
        D, sw = pair_matrix(self.featurizer, pairs)
        node = scope_node(event.user, event.context)
        def change(prof: Profile) -> None:
            st = node_state(prof, self.spec)
            if st is None:
                w0, var0 = self.prior_for(graph, event.user, event.context, node)
                done = 0
            else:
                w0, var0 = st
                done = int((prof.extra.get(EXTRA_KEY) or {}).get("pairs", 0))
            w, var = online_update(w0, var0, D, sw, steps=self.config.online_steps)
            self._fill(prof, w, var, done + len(pairs), "online")

        self._change(store, node, change)

    @hookimpl
    def persona_forget(self, user: str, nodes: list[str], store: Any, graph: Any) -> None:
        """Recompute the pooled statistics the forgotten user contributed to (global and their groups).

        A group left with no member holding comparisons loses its learned weights (its stated
        preferences, which are the group's own, stay). Other users' own profiles are left alone: a
        refit of them from a snapshot of the events would overwrite the online updates that other
        requests (and other processes) make meanwhile — lost, or counted twice. Group discovery does
        not run again (it would move every user's automatic membership at each forget): the groups the
        user was in are refit from their remaining members, as the global state is from everyone left."""
        summary = self.refit(store, graph, include_users=False, groups=[n for n in nodes if is_group(n)])
        for gid in nodes:
            prof = store.get_profile(gid) if is_group(gid) else None
            if prof is None or EXTRA_KEY not in prof.extra:
                continue
            if gid not in summary.get("refit_groups", []):
                def clear(prof: Profile) -> None:
                    prof.weights, prof.uncertainty = [], []
                    prof.extra = {k: v for k, v in prof.extra.items() if k != EXTRA_KEY}
                    prof.evidence = len(prof.stated)
                    prof.updated_at = time.time()

                self._change(store, gid, clear)

    # -- batch refit ---------------------------------------------------------------------

    def refit(self, store: Any, graph: Any = None, include_users: bool = True,
              groups: list[str] | None = None) -> dict[str, Any]:
        """Rebuild every node's state from the stored events; discover groups. Returns a summary.

        ``include_users=False``: only the pooled nodes (global, groups); users' own profiles stay as the
        online updates left them. ``groups``: refit only these groups, and discover none (both what a
        forget needs, see ``persona_forget``)."""
        t0 = time.perf_counter()
        cfg = self.config
        feat = self.featurizer
        dim = feat.dim
        by_node: dict[str, list[tuple[Any, Any, float]]] = defaultdict(list)
        for ev in store.list_feedback():
            node = scope_node(ev.user, ev.context)
            by_node[node].extend(event_pairs(ev))
        mats = {n: pair_matrix(feat, p) for n, p in by_node.items() if p}
        zeros = np.zeros(dim)
        summary: dict[str, Any] = {"nodes": len(mats), "pairs": sum(len(m[1]) for m in mats.values())}

        if not cfg.hierarchy:
            for n, (D, sw) in (mats.items() if include_users else ()):
                w, var = fit_bt(D, sw, zeros, cfg.prior_precision)
                self._write(store, n, w, var, len(sw), "batch")
            summary["seconds"] = time.perf_counter() - t0
            self.last_refit = summary
            return summary

        # global: everyone's comparisons, centred on 0
        allD = np.concatenate([m[0] for m in mats.values()]) if mats else np.zeros((0, dim))
        allw = np.concatenate([m[1] for m in mats.values()]) if mats else np.zeros(0)
        g, gvar = fit_bt(allD, allw, zeros, cfg.global_precision)
        self._write(store, GLOBAL, g, gvar, len(allw), "batch", evidence=len(allw))

        users = sorted(n for n in mats if kind_of(n) == "user")
        if cfg.discover_groups and groups is None:
            summary["groups"] = self._discover(store, users, mats, g)

        # groups (declared and discovered): pooled members' comparisons, centred on global
        group_ids = sorted({e.dst for u in users for e in store.edges_from(u) if is_group(e.dst)}
                           if groups is None else set(groups))
        group_state: dict[str, np.ndarray] = {}
        for gid in group_ids:
            members = [e for e in store.edges_to(gid) if e.src in mats and e.weight > 0]
            if not members:
                continue
            D = np.concatenate([mats[e.src][0] for e in members])
            sw = np.concatenate([mats[e.src][1] * e.weight for e in members])
            w, var = fit_bt(D, sw, g, cfg.prior_precision)
            prof = store.get_profile(gid)
            stated = len(prof.stated) if prof else 0
            self._write(store, gid, w, var, len(sw), "batch", evidence=stated + int(round(sw.sum())))
            group_state[gid] = w
        summary["refit_groups"] = sorted(group_state)
        # users (then users in context), centred on their parents' combined state
        for n in sorted(mats if include_users else (), key=lambda x: (kind_of(x) == "user_context", x)):
            user, ctx = user_of(n) or "", context_of(n)
            prior, _ = self.prior_for(graph, user, ctx or None, n) if graph is not None else (g, None)
            w, var = fit_bt(*mats[n], prior, cfg.prior_precision)
            self._write(store, n, w, var, len(mats[n][1]), "batch")
        summary["seconds"] = time.perf_counter() - t0
        self.last_refit = summary
        return summary

    def _discover(self, store: Any, users: list[str], mats: dict[str, tuple[np.ndarray, np.ndarray]],
                  g: np.ndarray) -> dict[str, Any]:
        """PAL-style prototypes: cluster users' preference vectors, write group:auto-<k> edges."""
        cfg = self.config
        for u in users:  # old discovered memberships go; declared ones stay
            for e in store.edges_from(u):
                if e.dst.startswith(AUTO_PREFIX):
                    store.remove_edge(u, e.dst, e.kind)
        if len(users) < cfg.min_users:
            return {"k": 0, "reason": f"fewer than {cfg.min_users} users with choices"}
        W = np.stack([fit_bt(*mats[u], g, cfg.prior_precision)[0] for u in users])
        V = W - g
        V = V / (np.linalg.norm(V, axis=1, keepdims=True) + 1e-12)
        rng = np.random.default_rng(cfg.seed)
        best: tuple[float, int, np.ndarray] | None = None
        for k in range(2, min(cfg.max_groups, len(users) // 2) + 1):
            labels, _, _ = spherical_kmeans(V, k, rng)
            s = loo_cohesion(V, labels)
            if best is None or s > best[0]:
                best = (s, k, labels)
        if best is None:
            return {"k": 0}
        sil, k, labels = best
        # hard EM: prototypes fitted on their members, users move to the most likely prototype
        for _ in range(cfg.em_iters):
            protos = {}
            for j in set(labels.tolist()):
                idx = [i for i in range(len(users)) if labels[i] == j]
                protos[j] = fit_bt(np.concatenate([mats[users[i]][0] for i in idx]),
                                   np.concatenate([mats[users[i]][1] for i in idx]), g, cfg.prior_precision)[0]
            ll = np.stack([[float(np.sum(mats[u][1] * np.log(_sigmoid(mats[u][0] @ protos[j]) + 1e-12)))
                            for j in sorted(protos)] for u in users])
            keys = sorted(protos)
            new = np.array([keys[i] for i in np.argmax(ll, axis=1)])
            if np.array_equal(new, labels):
                break
            labels = new
        # memberships: softmax of the per-user log-likelihood over prototypes, top-1 kept
        names = {j: f"{AUTO_PREFIX}{i}" for i, j in enumerate(sorted(set(labels.tolist())))}
        for u, j in zip(users, labels):
            store.add_edge(Edge(src=u, dst=names[int(j)], kind="member", weight=1.0))
        sizes = {names[j]: int((labels == j).sum()) for j in names}
        return {"k": len(names), "cohesion": round(sil, 4), "sizes": sizes}


def refit_profiles(mw: Any, plugin: str = "profile") -> dict[str, Any]:
    """Batch refit of ``mw``'s profile plugin instance named ``plugin`` (see ``ProfilePlugin.refit``)."""
    for p in mw.host.pipeline:
        if p.name == plugin and isinstance(p.instance, ProfilePlugin):
            return p.instance.refit(mw.store, mw.graph)
    from persona_mw.errors import PersonaError

    raise PersonaError(f"no profile plugin named {plugin!r} in this pipeline")


__all__ = ["ProfilePlugin", "event_pairs", "fit_bt", "online_update", "profile_reward", "refit_profiles",
           "score_texts", "score_turn", "use_featurizer"]
