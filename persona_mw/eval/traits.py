"""``persona-mw eval traits``: pluralistic simulated users over Anthropic persona statements.

Recipe (fixed seeds). Traits are the ``*.jsonl.gz`` / ``*.jsonl`` files present; each trait's
statements are split into an observation pool (60%) and a test pool (40%) of Yes / No
statements (``answer_matching_behavior``), at most ``per_trait`` of each kind. A stance
combination is 2–3 traits, each "for" or "against". Latent groups come in mirrored pairs (a
combination and its exact opposite), so every trait has as many users for as against it and
no global model can beat chance. A choice is between a Yes and a No statement of one of the
user's traits (prompt "Which statement would you say?"): a user for the trait picks the Yes
statement, a user against it the No one.

Population: ``groups`` latent groups x ``users_per_group`` users, 20 observed choices each,
every one declared a member of its cohort group (as an app passes an org or cohort). Test
users arrive with k in {0, 5, 20} observed choices: at k = 0 with their cohort id declared,
at k > 0 without one (groups must be discovered). Each is tested on ``test_choices`` choices
built from test-pool statements. One refit (group discovery included) covers everyone.
Metrics: ``acc@k{0,5,20}`` (the middleware: graph + profile plugin), ``:user_only`` (the same
model with ``hierarchy: false``), ``:global`` (the global node alone), and ``:novel`` for
test users whose exact stance combination no population user has (their declared cohort is
new and empty).
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
from persona_mw.nodes import GLOBAL, user_node

KS = (0, 5, 20)
PROMPT = "Which statement would you say?"


def load(data: str | Path, per_trait: int, rng: np.random.Generator,
         cut: float | None = 0.6) -> dict[str, dict[str, list[list[str]]]]:
    """Each trait's Yes / No statements: ``[observation pool, test pool]`` (``cut`` of them observed),
    or ``[all]`` with ``cut`` None (the cross-validation folds them)."""
    root = Path(data)
    files = sorted(root.rglob("*.jsonl.gz")) + sorted(root.rglob("*.jsonl"))
    traits: dict[str, dict[str, list[list[str]]]] = {}
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        yes: list[str] = []
        no: list[str] = []
        with opener(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                st = row.get("statement")
                ans = str(row.get("answer_matching_behavior", "")).strip().lower()
                if st and ans in ("yes", "no"):
                    (yes if ans == "yes" else no).append(st)
        if len(yes) < 4 or len(no) < 4:
            continue
        name = f.name.split(".")[0]
        split: dict[str, list[list[str]]] = {}
        for label, pool in (("yes", yes), ("no", no)):
            pool = [pool[i] for i in rng.permutation(len(pool))[:per_trait]]
            if cut is None:
                split[label] = [pool]
                continue
            n_obs = max(2, int(round(len(pool) * cut)))
            split[label] = [pool[:n_obs], pool[n_obs:]]
        traits[name] = split
    if len(traits) < 2:
        raise PersonaError(f"need at least two trait files with Yes and No statements under {data!r}")
    return traits


def _combos(names: list[str], n_pairs: int, rng: np.random.Generator, taken: set[Any]) -> list[tuple[tuple[str, int], ...]]:
    out: list[tuple[tuple[str, int], ...]] = []
    for _ in range(n_pairs * 50):
        if len(out) >= 2 * n_pairs:
            break
        size = int(rng.integers(2, min(3, len(names)) + 1))
        ts = sorted(rng.choice(len(names), size=size, replace=False).tolist())
        combo = tuple((names[t], int(rng.integers(2)) * 2 - 1) for t in ts)
        mirror = tuple((t, -s) for t, s in combo)
        if combo in taken or mirror in taken:
            continue
        taken.update({combo, mirror})
        out += [combo, mirror]
    return out


def _choice(traits: dict[str, Any], combo: tuple[tuple[str, int], ...], fold: int,
            rng: np.random.Generator) -> tuple[str, str]:
    t, stance = combo[int(rng.integers(len(combo)))]
    yes = traits[t]["yes"][fold]
    no = traits[t]["no"][fold]
    y, n = yes[int(rng.integers(len(yes)))], no[int(rng.integers(len(no)))]
    return (y, n) if stance > 0 else (n, y)


@dataclass
class Sizes:
    groups: int = 8
    users_per_group: int = 8
    test_users: int = 3
    novel_groups: int = 2
    test_choices: int = 20


def run(data: str | Path, *, groups: int = 8, users_per_group: int = 8, test_users: int = 3,
        novel_groups: int = 2, test_choices: int = 20, per_trait: int = 120, seed: int = 0) -> dict[str, float]:
    """One fixed split (60% of each trait's statements observed, 40% tested), the given settings."""
    rng = np.random.default_rng(seed)
    traits = load(data, per_trait, rng)
    sizes = Sizes(groups, users_per_group, test_users, novel_groups, test_choices)
    known, novel = _latent_groups(sorted(traits), sizes, rng)
    return trial(traits, known, novel, sizes, rng, {}, True)


Combo = tuple[tuple[str, int], ...]


def _latent_groups(names: list[str], sizes: Sizes, rng: np.random.Generator) -> tuple[list[Combo], list[Combo]]:
    taken: set[Any] = set()
    known = _combos(names, max(1, sizes.groups // 2), rng, taken)
    novel = _combos(names, max(1, sizes.novel_groups // 2), rng, taken) if sizes.novel_groups else []
    return known, novel


def _simulate(traits: dict[str, Any], known: list[Combo], novel: list[Combo], sizes: Sizes,
              rng: np.random.Generator) -> tuple[list[dict[str, Any]], dict[str, list[str]],
                                                  list[tuple[str, int, bool, list[tuple[str, str]]]]]:
    """Population and test users: their observed choices (pool 0), declared cohorts, test pairs (pool 1)."""
    events: list[dict[str, Any]] = []
    declared: dict[str, list[str]] = {}
    for gi, combo in enumerate(known):
        for i in range(sizes.users_per_group):
            u = f"pop-g{gi}-u{i}"
            declared[u] = [f"cohort-{gi}"]
            for _ in range(20):
                c, r = _choice(traits, combo, 0, rng)
                events.append({"kind": "choice", "user": u, "prompt": PROMPT, "chosen": c, "rejected": [r]})
    tests: list[tuple[str, int, bool, list[tuple[str, str]]]] = []  # user, k, novel, test pairs
    for kind, combos, offset in (("t", known, 0), ("n", novel, len(known))):
        for gi, combo in enumerate(combos):
            for k in KS:
                for i in range(sizes.test_users):
                    u = f"{kind}-g{gi}-k{k}-u{i}"
                    declared[u] = [f"cohort-{gi + offset}"] if k == 0 else []
                    for _ in range(k):
                        c, r = _choice(traits, combo, 0, rng)
                        events.append({"kind": "choice", "user": u, "prompt": PROMPT, "chosen": c, "rejected": [r]})
                    tests.append((u, k, kind == "n", [_choice(traits, combo, 1, rng) for _ in range(sizes.test_choices)]))
    return events, declared, tests


def trial(traits: dict[str, Any], known: list[Combo], novel: list[Combo], sizes: Sizes, rng: np.random.Generator,
          settings: dict[str, Any], final: bool) -> dict[str, float]:
    """acc@k for users simulated on ``traits`` (pool 0 observed, pool 1 tested); ``final`` adds the baselines."""
    events, declared, tests = _simulate(traits, known, novel, sizes, rng)
    metrics: dict[str, float] = {}
    variants: list[tuple[str, dict[str, Any]]] = [("", settings)]
    if final:
        variants.append((":user_only", {**settings, "hierarchy": False, "discover_groups": False}))
    for variant, overrides in variants:
        acc, acc_global = _run_variant(overrides, events, declared, tests)
        for (k, nov), v in acc.items():
            metrics[f"acc@k{k}{variant}{':novel' if nov else ''}"] = v
        if final and not variant:
            for (k, nov), v in acc_global.items():
                if not nov:
                    metrics[f"acc@k{k}:global"] = v
    return dict(sorted(metrics.items(), key=lambda kv: (int(kv[0].split("@k")[1].split(":")[0]), kv[0])))


@dataclass
class Split:
    traits: dict[str, dict[str, list[list[str]]]]  # per trait and label: [observed pool, tested pool]
    seed: int


def _view(pools: dict[str, dict[str, list[str]]], folds: dict[str, dict[str, list[np.ndarray]]],
          f: int) -> dict[str, dict[str, list[list[str]]]]:
    return {t: {lab: [[p[i] for i in range(len(p)) if i not in set(folds[t][lab][f].tolist())],
                      [p[i] for i in folds[t][lab][f]]] for lab, p in by.items()} for t, by in pools.items()}


def _fold_splits(pools: dict[str, dict[str, list[str]]], k: int, seed: int) -> list[Split]:
    rng = np.random.default_rng(seed)
    folds = {t: {lab: kfold(len(p), k, rng) for lab, p in by.items()} for t, by in pools.items()}
    return [Split(_view(pools, folds, f), seed * 100 + f + 1) for f in range(k)]


def run_cv(data: str | Path, *, folds: int = 5, inner_folds: int = 2, per_trait: int = 120, seed: int = 0,
           sizes: Sizes | None = None, grid: list[dict[str, Any]] | None = None,
           log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Nested K-fold CV over statements x users (``persona_mw.eval.cv``); objective: mean acc@k over k."""
    sizes = sizes or Sizes()
    rng = np.random.default_rng(seed)
    whole = load(data, per_trait, rng, cut=None)
    pools = {t: {lab: v[0] for lab, v in by.items()} for t, by in whole.items()}
    if min(len(p) for by in pools.values() for p in by.values()) < folds * max(2, inner_folds):
        raise PersonaError(f"--folds {folds}: every trait needs {folds * max(2, inner_folds)} Yes and No statements")
    known, novel = _latent_groups(sorted(pools), sizes, rng)
    outer = _fold_splits(pools, folds, seed)

    def inner(split: Split) -> list[Split]:
        obs = {t: {lab: v[0] for lab, v in by.items()} for t, by in split.traits.items()}
        return _fold_splits(obs, inner_folds, split.seed * 10)

    def run_trial(split: Split, setting: dict[str, Any], final: bool) -> dict[str, float]:
        return trial(split.traits, known, novel, sizes, np.random.default_rng(split.seed), setting, final)

    report = nested_cv(outer, inner, run_trial, grid or PROFILE_GRID,
                       lambda m: float(np.mean([m[f"acc@k{k}"] for k in KS])), log)
    report["protocol"] = {
        "outer": f"{folds} folds over each trait's Yes and No statements; fold f tests on its statements; its "
                 "population and test users (fresh simulated users, seed per fold) observe the other folds' only",
        "inner": f"{inner_folds} folds over the outer fold's observed statements, with their own simulated users; "
                 "the outer fold's test statements and users are not used",
        "objective": "mean over k of acc@k (the middleware variant, users of known groups)",
        "baselines": ":user_only runs with the fold's chosen settings and hierarchy off"}
    return report


def _run_variant(overrides: dict[str, Any], events: list[dict[str, Any]], declared: dict[str, list[str]],
                 tests: list[tuple[str, int, bool, list[tuple[str, str]]]]) -> tuple[dict[Any, float], dict[Any, float]]:
    from persona_mw.plugins.profile import score_texts

    acc: dict[Any, list[float]] = {}
    acc_g: dict[Any, list[float]] = {}

    def feed(mw: Any) -> None:
        for u, gs in declared.items():  # declared cohorts, as the app's requests carry them
            if gs and u.startswith("pop-") or (gs and "-k0-" in u):
                resolve(mw, u, gs)
        for ev in events:
            mw.feedback(ev)

    with eval_middleware(replay=(replay_key(events, declared), feed), **overrides) as (mw, plugin):
        plugin.refit(mw.store, mw.graph)
        for u, k, nov, pairs in tests:
            if k == 0 and not plugin.config.hierarchy:
                scope, profiles = resolve(mw, u)
            else:
                scope, profiles = resolve(mw, u, declared[u])
            flat = [t for p in pairs for t in p]
            if not plugin.config.hierarchy:
                scope = scope.model_copy(update={"nodes": [n.model_copy(update={"weight": 1.0 if n.id == user_node(u) else 0.0})
                                                           for n in scope.nodes]})
            s = np.asarray(score_texts(scope, profiles, PROMPT, flat, spec=plugin.spec)).reshape(-1, 2)
            acc.setdefault((k, nov), []).append(float(np.mean(np.where(s[:, 0] > s[:, 1], 1.0,
                                                                        np.where(s[:, 0] == s[:, 1], 0.5, 0.0)))))
            if plugin.config.hierarchy:
                gscope = scope.model_copy(update={"nodes": [n.model_copy(update={"weight": 1.0 if n.id == GLOBAL else 0.0})
                                                            for n in scope.nodes]})
                g = np.asarray(score_texts(gscope, profiles, PROMPT, flat, spec=plugin.spec)).reshape(-1, 2)
                acc_g.setdefault((k, nov), []).append(float(np.mean(np.where(g[:, 0] > g[:, 1], 1.0,
                                                                             np.where(g[:, 0] == g[:, 1], 0.5, 0.0)))))
    return ({k: float(np.mean(v)) for k, v in acc.items()}, {k: float(np.mean(v)) for k, v in acc_g.items()})


def config() -> dict[str, Any]:
    return {"profile": PROFILE_SETTINGS or "defaults", "groups": 8, "users_per_group": 8, "test_users": 3,
            "novel_groups": 2, "test_choices": 20, "per_trait": 120, "seed": 0, "ks": list(KS)}
