"""``persona-mw eval dsp``: domain-specific preference (Cheng et al. 2023) with simulated users.

Recipe (fixed seeds): the queries present are split once into an observation pool (60%) and a
test pool (40%); nobody observes a test query. Each of the first four response domains gets
``users_per_domain`` simulated users (never labelled with their domain). For H in {1, 5, 20}
each user observes H choices on their own queries from the observation pool (their domain's
response chosen over the others), all through ``Middleware.afeedback``; the profile plugin's
batch refit then discovers groups from the users' choices. Each user is tested on every test
query: ``top1@H`` (their domain's response ranked first of all responses) and ``pairwise@H``
(their response above each other one). Baselines: ``:random`` (expected value), ``:centroid``
(cosine to the mean MiniLM embedding of the user's chosen responses) and ``:user_only`` (the
same profile model with ``hierarchy: false``: no graph, no groups).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from persona_mw.errors import PersonaError
from persona_mw.eval.common import PROFILE_SETTINGS, eval_middleware, replay_key, resolve
from persona_mw.eval.cv import PROFILE_GRID, kfold, nested_cv
from persona_mw.nodes import user_node

HS = (1, 5, 20)


def load(data: str | Path) -> list[dict[str, Any]]:
    root = Path(data)
    files = sorted(root.glob("*.json.gz")) + sorted(root.glob("*.json")) if root.is_dir() else [root]
    items: list[dict[str, Any]] = []
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            raw = json.load(fh)
        items += [it for it in raw if isinstance(it, dict) and "query" in it and isinstance(it.get("responses"), dict)]
    if not items:
        raise PersonaError(f"no DSP queries under {data!r}", hint="expected *.json.gz lists of {query, responses}")
    return items


@dataclass
class Split:
    """Who gives feedback on which queries, and who is scored on which queries."""

    obs: np.ndarray  # query indices the users' choices are drawn from
    test: np.ndarray  # query indices the scored users are tested on (never observed by anyone)
    users: list[tuple[str, int]]  # every user giving feedback (id, domain index)
    scored: list[tuple[str, int]]  # the users tested (a subset of ``users``)
    seed: int


@dataclass
class _Bench:
    items: list[dict[str, Any]]
    domains: list[str]
    udom: list[str]
    hs: tuple[int, ...]


def _bench(data: str | Path, hs: tuple[int, ...], user_domains: int) -> _Bench:
    items = load(data)
    domains = [d for d in items[0]["responses"] if all(d in it["responses"] for it in items)]
    if len(domains) < 2:
        raise PersonaError("DSP items need at least two response domains in common")
    return _Bench(items, domains, domains[:user_domains], tuple(hs))


def _users(b: _Bench, users_per_domain: int) -> list[tuple[str, int]]:
    return [(f"d{di}-u{i}", di) for di in range(len(b.udom)) for i in range(users_per_domain)]


def run(data: str | Path, *, users_per_domain: int = 10, hs: tuple[int, ...] = HS, seed: int = 0,
        test_frac: float = 0.4, user_domains: int = 4) -> dict[str, float]:
    """One fixed split (``test_frac`` of the queries tested), every user scored, the given settings."""
    b = _bench(data, hs, user_domains)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(b.items))
    ntest = min(len(b.items) - 1, max(1, int(round(len(b.items) * test_frac))))
    users = _users(b, users_per_domain)
    return trial(b, Split(obs=perm[ntest:], test=perm[:ntest], users=users, scored=users, seed=seed), {}, True)


def trial(b: _Bench, split: Split, settings: dict[str, Any], final: bool) -> dict[str, float]:
    """top1/pairwise at every H for ``split`` under ``settings``; ``final`` adds the baselines."""
    metrics: dict[str, float] = {}
    for H in b.hs:
        r = np.random.default_rng(split.seed * 1000 + H)
        seen = {u: r.choice(split.obs, size=min(H, len(split.obs)), replace=False) for u, _ in split.users}
        events = [{"kind": "choice", "user": u, "prompt": b.items[q]["query"],
                   "chosen": b.items[q]["responses"][b.udom[di]],
                   "rejected": [b.items[q]["responses"][d] for d in b.domains if d != b.udom[di]]}
                  for u, di in split.users for q in seen[u]]
        variants: list[tuple[str, dict[str, Any]]] = [("", settings)]
        if final:
            variants.append((":user_only", {**settings, "hierarchy": False, "discover_groups": False}))
        for variant, overrides in variants:
            t1, pw, extra = _run_variant(overrides, events, split.scored, b.items, split.test, b.domains, b.udom,
                                          split.users)
            metrics[f"top1@H{H}{variant}"] = t1
            metrics[f"pairwise@H{H}{variant}"] = pw
            if final:  # where the errors are: top1 per hidden domain
                metrics.update({f"top1@H{H}/{d}{variant}": v for d, v in extra.pop("domains").items()})
            if final and not variant:
                metrics.update({f"{k}@H{H}:groups": v for k, v in extra.items()})
        if final:
            t1, pw = _centroid(events, split.scored, b.items, split.test, b.domains, b.udom)
            metrics[f"top1@H{H}:centroid"] = t1
            metrics[f"pairwise@H{H}:centroid"] = pw
            metrics[f"top1@H{H}:random"] = 1.0 / len(b.domains)
            metrics[f"pairwise@H{H}:random"] = 0.5
    return metrics


def _stratified(users: list[tuple[str, int]], k: int, rng: np.random.Generator) -> list[list[tuple[str, int]]]:
    """Users split into ``k`` folds, each domain spread evenly over them."""
    out: list[list[tuple[str, int]]] = [[] for _ in range(k)]
    i = 0
    for di in sorted({d for _, d in users}):
        mine = [u for u in users if u[1] == di]
        for j in rng.permutation(len(mine)):
            out[i % k].append(mine[j])
            i += 1
    return out


def cv_splits(n_items: int, users: list[tuple[str, int]], folds: int, seed: int) -> list[Split]:
    """Outer folds: fold f tests user fold f on query fold f; everyone observes the other queries only."""
    rng = np.random.default_rng(seed)
    qf = kfold(n_items, folds, rng)
    uf = _stratified(users, folds, rng)
    every = np.arange(n_items)
    return [Split(obs=np.setdiff1d(every, qf[f]), test=qf[f], users=users, scored=uf[f], seed=seed * 100 + f)
            for f in range(folds)]


def inner_splits(split: Split, folds: int) -> list[Split]:
    """Inner folds inside an outer fold's training part: its observed queries and its unscored users only."""
    train_users = [u for u in split.users if u not in split.scored]
    rng = np.random.default_rng(split.seed + 7)
    qf = kfold(len(split.obs), folds, rng)
    uf = _stratified(train_users, folds, rng)
    return [Split(obs=np.setdiff1d(split.obs, split.obs[qf[j]]), test=split.obs[qf[j]], users=train_users,
                  scored=uf[j], seed=split.seed * 10 + j + 1) for j in range(folds)]


def run_cv(data: str | Path, *, folds: int = 5, inner_folds: int = 2, users_per_domain: int = 10,
           hs: tuple[int, ...] = HS, seed: int = 0, user_domains: int = 4, grid: list[dict[str, Any]] | None = None,
           log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Nested K-fold CV over queries x users (``persona_mw.eval.cv``); objective: mean top1 over the Hs."""
    b = _bench(data, hs, user_domains)
    users = _users(b, users_per_domain)
    if folds > len(b.items) or folds > users_per_domain:
        raise PersonaError(f"--folds {folds}: needs at least {folds} queries and {folds} users per domain")
    outer = cv_splits(len(b.items), users, folds, seed)
    report = nested_cv(outer, lambda s: inner_splits(s, inner_folds), lambda s, g, fin: trial(b, s, g, fin),
                       grid or PROFILE_GRID, lambda m: float(np.mean([m[f"top1@H{H}"] for H in b.hs])), log)
    report["protocol"] = {
        "outer": f"{folds} folds; fold f scores user fold f (users stratified by domain) on query fold f; "
                 "every user observes H choices on the other folds' queries only",
        "inner": f"{inner_folds} folds over the outer fold's observed queries x its unscored users; the outer "
                 "fold's scored users and test queries are not used",
        "objective": "mean over H of top1@H (the middleware variant)",
        "baselines": ":user_only runs with the fold's chosen settings and hierarchy off"}
    return report


def _accuracy(scores: np.ndarray, truth: int) -> tuple[float, float]:
    """scores: (queries, domains). Ties count as fractions."""
    top = scores[:, truth][:, None]
    others = np.delete(scores, truth, axis=1)
    better = (others > top).sum(1)
    ties = (others == top).sum(1)
    top1 = np.where(better == 0, 1.0 / (1 + ties), 0.0).mean()
    pairwise = ((others < top).sum(1) + 0.5 * ties).mean() / others.shape[1]
    return float(top1), float(pairwise)


def _run_variant(overrides: dict[str, Any], events: list[dict[str, Any]], users: list[tuple[str, int]],
                 items: list[dict[str, Any]], test: np.ndarray, domains: list[str], udom: list[str],
                 population: list[tuple[str, int]]) -> tuple[float, float, dict[str, Any]]:
    from persona_mw.plugins.profile import score_texts

    texts = [items[q]["responses"][d] for q in test for d in domains]

    def feed(mw: Any) -> None:
        for ev in events:
            mw.feedback(ev)

    with eval_middleware(replay=(replay_key(events), feed), **overrides) as (mw, plugin):
        plugin.refit(mw.store, mw.graph)
        t1s, pws = [], []
        by_domain: dict[str, list[float]] = {}
        for u, di in users:
            scope, profiles = resolve(mw, u)
            if not plugin.config.hierarchy:  # the user alone
                scope = scope.model_copy(update={"nodes": [n.model_copy(update={"weight": 1.0 if n.id == user_node(u) else 0.0})
                                                           for n in scope.nodes]})
            s = np.asarray(score_texts(scope, profiles, "", texts, spec=plugin.spec)).reshape(len(test), len(domains))
            t1, pw = _accuracy(s, domains.index(udom[di]))
            t1s.append(t1)
            pws.append(pw)
            by_domain.setdefault(udom[di], []).append(t1)
        extra: dict[str, Any] = _purity(mw.store, population) if plugin.config.discover_groups else {}
    extra["domains"] = {d: float(np.mean(v)) for d, v in sorted(by_domain.items())}
    return float(np.mean(t1s)), float(np.mean(pws)), extra


def _purity(store: Any, population: list[tuple[str, int]]) -> dict[str, float]:
    """Discovered groups vs the hidden domains: purity (share of users in their group's majority domain), k."""
    from persona_mw.plugins.profile import AUTO_PREFIX

    by_group: dict[str, list[int]] = {}
    for u, di in population:
        label = next((e.dst for e in store.edges_from(user_node(u)) if e.dst.startswith(AUTO_PREFIX)), None)
        if label is not None:
            by_group.setdefault(label, []).append(di)
    grouped = sum(len(ds) for ds in by_group.values())
    major = sum(max(ds.count(d) for d in set(ds)) for ds in by_group.values())
    return {"purity": major / grouped if grouped else 0.0, "k": float(len(by_group))}


def _centroid(events: list[dict[str, Any]], users: list[tuple[str, int]], items: list[dict[str, Any]],
              test: np.ndarray, domains: list[str], udom: list[str]) -> tuple[float, float]:
    from persona_mw.embeddings import default_embedder

    emb = default_embedder()
    T = emb.embed([items[q]["responses"][d] for q in test for d in domains]).reshape(len(test), len(domains), -1)
    chosen: dict[str, list[str]] = {}
    for ev in events:
        chosen.setdefault(ev["user"], []).append(ev["chosen"])
    t1s, pws = [], []
    for u, di in users:
        c = emb.embed(chosen[u]).mean(0)
        c = c / (np.linalg.norm(c) or 1.0)
        t1, pw = _accuracy(T @ c, domains.index(udom[di]))
        t1s.append(t1)
        pws.append(pw)
    return float(np.mean(t1s)), float(np.mean(pws))


def config() -> dict[str, Any]:
    return {"profile": PROFILE_SETTINGS or "defaults", "users_per_domain": 10, "hs": list(HS), "seed": 0,
            "test_frac": 0.4}
