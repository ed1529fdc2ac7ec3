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
from pathlib import Path
from typing import Any

import numpy as np

from persona_mw.errors import PersonaError
from persona_mw.eval.common import PROFILE_SETTINGS, eval_middleware, resolve
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


def run(data: str | Path, *, users_per_domain: int = 10, hs: tuple[int, ...] = HS, seed: int = 0,
        test_frac: float = 0.4, user_domains: int = 4) -> dict[str, float]:
    items = load(data)
    domains = [d for d in items[0]["responses"] if all(d in it["responses"] for it in items)]
    if len(domains) < 2:
        raise PersonaError("DSP items need at least two response domains in common")
    udom = domains[:user_domains]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(items))
    ntest = min(len(items) - 1, max(1, int(round(len(items) * test_frac))))
    test, obs = perm[:ntest], perm[ntest:]
    metrics: dict[str, float] = {}
    for H in hs:
        r = np.random.default_rng(seed * 1000 + H)
        users = [(f"d{di}-u{i}", di) for di in range(len(udom)) for i in range(users_per_domain)]
        seen = {u: r.choice(obs, size=min(H, len(obs)), replace=False) for u, _ in users}
        events = [{"kind": "choice", "user": u, "prompt": items[q]["query"],
                   "chosen": items[q]["responses"][udom[di]],
                   "rejected": [items[q]["responses"][d] for d in domains if d != udom[di]]}
                  for u, di in users for q in seen[u]]
        for variant, overrides in (("", {}), (":user_only", {"hierarchy": False, "discover_groups": False})):
            t1, pw = _run_variant(overrides, events, users, items, test, domains, udom)
            metrics[f"top1@H{H}{variant}"] = t1
            metrics[f"pairwise@H{H}{variant}"] = pw
        t1, pw = _centroid(events, users, items, test, domains, udom)
        metrics[f"top1@H{H}:centroid"] = t1
        metrics[f"pairwise@H{H}:centroid"] = pw
        metrics[f"top1@H{H}:random"] = 1.0 / len(domains)
        metrics[f"pairwise@H{H}:random"] = 0.5
    return metrics


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
                 items: list[dict[str, Any]], test: np.ndarray, domains: list[str], udom: list[str]) -> tuple[float, float]:
    from persona_mw.plugins.profile import score_texts

    texts = [items[q]["responses"][d] for q in test for d in domains]
    with eval_middleware(**overrides) as (mw, plugin):
        for ev in events:
            mw.feedback(ev)
        plugin.refit(mw.store, mw.graph)
        t1s, pws = [], []
        for u, di in users:
            scope, profiles = resolve(mw, u)
            if not plugin.config.hierarchy:  # the user alone
                scope = scope.model_copy(update={"nodes": [n.model_copy(update={"weight": 1.0 if n.id == user_node(u) else 0.0})
                                                           for n in scope.nodes]})
            s = np.asarray(score_texts(scope, profiles, "", texts, spec=plugin.spec)).reshape(len(test), len(domains))
            t1, pw = _accuracy(s, domains.index(udom[di]))
            t1s.append(t1)
            pws.append(pw)
    return float(np.mean(t1s)), float(np.mean(pws))


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
