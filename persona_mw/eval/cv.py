"""Nested K-fold cross-validation for the simulated-user benchmarks (``eval dsp|traits --folds K``).

Outer folds cross the items a user is tested on (queries, statements) with the users: fold ``f``
tests its own users on its own items, and nothing of fold ``f`` (its test items, its test users'
choices) is seen while choosing the settings for it. Every hand-picked setting of the profile
model is chosen per outer fold by an *inner* cross-validation on the outer fold's training part
only: each setting of a small ``grid`` is scored on ``inner`` splits of the training items and
users, and the setting with the best mean objective wins (ties: the earlier one in the grid, which
lists the current defaults first). The outer test fold then runs once with the chosen setting.

The report holds the mean and the standard deviation across outer folds of every metric, the
per-fold values, the grid, the inner scores and the setting chosen per fold, and the setting chosen
most often (ties broken by the mean inner score), which is what the plugin's defaults should be.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

S = TypeVar("S")
Setting = dict[str, Any]
Trial = Callable[[S, Setting, bool], dict[str, float]]


# The settings every outer fold's inner CV chooses from (the plugin's defaults first: they win ties):
# the precision of a node's prior around its parents (how far a user's or group's fit may move from
# them), the graph's k in (n*own + k*parent)/(n+k) (the blend of user and group evidence), and the
# feature blocks: the defaults, or the defaults plus the hidden states of the packaged local model at
# layer 4 or 8 of 30 (``persona_mw.hidden_features``). Precision 3.0 was dropped from an earlier grid:
# it scored worst in every fold of both benchmarks (docs/notes/cv20.md).
def _lm_features(layer: int) -> dict[str, Any]:
    from persona_mw.models import DEFAULT_MODEL

    return {"embedding_scale": 1.5, "lm": DEFAULT_MODEL, "lm_layer": layer}


FEATURE_CHOICES: list[dict[str, Any] | None] = [None, _lm_features(4), _lm_features(8)]  # None: the defaults
PROFILE_GRID: list[Setting] = [
    {"prior_precision": p, "graph.prior_strength": k, **({"features": f} if f else {})}
    for f in FEATURE_CHOICES for p in (1.0, 0.3) for k in (5.0, 20.0)]


def kfold(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` disjoint index folds covering ``range(n)`` (shuffled, sizes differ by at most one)."""
    if k < 2 or n < k:
        raise ValueError(f"need 2 <= folds <= {n} (got {k})")
    return [np.sort(f) for f in np.array_split(rng.permutation(n), k)]


def setting_key(s: Setting) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(s.items())) or "defaults"


def summarize(per_fold: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population) standard deviation across folds of every metric present in all folds."""
    keys = [k for k in per_fold[0] if all(k in m for m in per_fold)]
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in keys}
    std = {k: float(np.std([m[k] for m in per_fold])) for k in keys}
    return mean, std


def nested_cv(outer: Sequence[S], inner: Callable[[S], Sequence[S]], trial: Trial[S], grid: Sequence[Setting],
              objective: Callable[[dict[str, float]], float],
              log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the nested CV; ``trial(split, setting, final)`` returns metrics (baselines too when final)."""
    if not grid:
        raise ValueError("the grid needs at least one setting")
    folds: list[dict[str, Any]] = []
    for f, split in enumerate(outer):
        scores: list[float] = []
        for s in grid:
            vals = [objective(trial(sub, s, False)) for sub in inner(split)]
            scores.append(float(np.mean(vals)))
            log(f"fold {f}: inner {setting_key(s)} -> {scores[-1]:.4f}")
        best = int(np.argmax(scores))  # the first maximum: grid order breaks ties
        metrics = trial(split, grid[best], True)
        log(f"fold {f}: chose {setting_key(grid[best])}; " + ", ".join(
            f"{k}={v:.3f}" for k, v in metrics.items() if ":" not in k))
        folds.append({"fold": f, "chosen": dict(grid[best]), "inner_scores": {setting_key(s): round(v, 4)
                                                                              for s, v in zip(grid, scores)},
                      "metrics": {k: round(v, 4) for k, v in metrics.items()}})
    mean, std = summarize([fd["metrics"] for fd in folds])
    counts = Counter(setting_key(fd["chosen"]) for fd in folds)
    inner_mean = {setting_key(s): float(np.mean([fd["inner_scores"][setting_key(s)] for fd in folds])) for s in grid}
    top = max(counts.values())
    winner = max((s for s in grid if counts.get(setting_key(s), 0) == top), key=lambda s: inner_mean[setting_key(s)])
    return {"metrics": mean, "std": {k: round(v, 4) for k, v in std.items()}, "folds": folds,
            "grid": [dict(s) for s in grid], "chosen_counts": dict(counts), "inner_mean": {
                k: round(v, 4) for k, v in inner_mean.items()}, "chosen_most_often": dict(winner)}


__all__ = ["FEATURE_CHOICES", "PROFILE_GRID", "kfold", "nested_cv", "setting_key", "summarize"]
