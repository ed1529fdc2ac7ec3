"""A set of named, weighted rewards that scores candidates: the one reward-calling protocol.

``rerank`` (best-of-n) and ``corrector`` (original vs edit) both hold a ``RewardSet``. A reward is a
function from the registry (``persona_register_rewards``) that takes any of ``turn``,
``candidates``, ``backend_for`` and ``options`` by name (or ``**kwargs`` for all), may be async, and
returns one score per candidate, or ``{node id: scores}``, which is combined with the scope's node
weights (a plain mean when none of the nodes has weight in the scope).
"""

from __future__ import annotations

import difflib
import inspect
import math
import statistics
from typing import Any, Callable, Literal, Mapping, Sequence

from persona_mw.errors import ConfigError
from persona_mw.types import Candidate, Turn

RewardFn = Callable[..., Any]
Normalize = Literal["none", "minmax", "zscore"]


def unknown_reward_error(reward: str, known: Mapping[str, RewardFn], where: str, index: object,
                         plugin: str) -> ConfigError:
    """The error for a ``rewards:`` name the registry does not have (file and line, a close match)."""
    close = difflib.get_close_matches(reward, list(known), n=1)
    return ConfigError(
        f"{where}: pipeline[{index}].rewards: unknown reward {reward!r} in plugin {plugin!r} "
        f"(known: {', '.join(sorted(known)) or 'none'})",
        hint=f"did you mean {close[0]!r}?" if close else "rewards come from persona_register_rewards",
    )


def node_weights(turn: Turn, nodes: Sequence[str]) -> dict[str, float]:
    """The scope's weight of each node; all 1 when they sum to nothing (nodes outside the scope)."""
    weights = {node: (turn.scope.weight_of(node) if turn.scope else 1.0) for node in nodes}
    if sum(weights.values()) <= 0:
        return {node: 1.0 for node in nodes}
    return weights


def normalized(xs: list[float], how: Normalize) -> list[float]:
    """``xs`` rescaled across the candidates: ``minmax`` to [0, 1], ``zscore``, or as is."""
    if how == "none" or len(xs) < 2:
        return xs
    if how == "minmax":
        lo, hi = min(xs), max(xs)
        return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]
    mu, sd = statistics.fmean(xs), statistics.pstdev(xs)
    return [0.0 if sd == 0 else (x - mu) / sd for x in xs]


class RewardSet:
    """Rewards by name with weights: each one's scores of the candidates, and the weighted total."""

    def __init__(self, weights: Mapping[str, float], fns: Mapping[str, RewardFn],
                 backend_for: Callable[[str], Any], options: Mapping[str, Mapping[str, Any]] | None = None,
                 normalize: Normalize = "none") -> None:
        missing = [r for r in weights if r not in fns]
        if missing:
            raise ValueError(f"no function for reward(s): {', '.join(missing)}")
        self.weights = dict(weights)
        self.fns = {r: fns[r] for r in weights}
        self.backend_for = backend_for
        self.options = {r: dict(o) for r, o in (options or {}).items()}
        self.normalize = normalize

    async def score(self, reward: str, turn: Turn, candidates: list[Candidate]) -> tuple[list[float], list[str]]:
        """One reward's score of each candidate (unrounded) and the nodes it scored by (empty when
        it returned a plain list). ValueError when it returns the wrong count or a non-finite score."""
        fn = self.fns[reward]
        available = {"turn": turn, "candidates": candidates, "backend_for": self.backend_for,
                     "options": dict(self.options.get(reward, {}))}
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        result = fn(**{k: v for k, v in available.items() if takes_all or k in params})
        if inspect.isawaitable(result):
            result = await result
        n = len(candidates)
        nodes: list[str] = []
        if isinstance(result, dict):
            per_node = {str(k): [float(x) for x in v] for k, v in result.items()}
            if any(len(v) != n for v in per_node.values()):
                raise ValueError(f"returned per-node scores that are not one per candidate ({n})")
            nodes = list(per_node)
            weights = node_weights(turn, nodes)
            total = sum(weights.values())
            scores = ([sum(weights[nd] * s[i] for nd, s in per_node.items()) / total for i in range(n)]
                      if per_node else [0.0] * n)
        else:
            scores = [float(x) for x in result]
            if len(scores) != n:
                raise ValueError(f"returned {len(scores)} score(s) for {n} candidates")
        if not all(math.isfinite(x) for x in scores):
            raise ValueError(f"returned a non-finite score: {scores}")
        return scores, nodes

    def total(self, scores: Mapping[str, list[float]]) -> list[float]:
        """The weighted total per candidate over the rewards in ``scores`` (each rescaled by
        ``normalize`` first), divided by the sum of their absolute weights; rounded to 4 places."""
        names = [r for r in scores if r in self.weights]
        if not names:
            return []
        norm = sum(abs(self.weights[r]) for r in names) or 1.0
        scaled = {r: normalized(list(scores[r]), self.normalize) for r in names}
        n = len(scaled[names[0]])
        return [round(sum(self.weights[r] * scaled[r][i] for r in names) / norm, 4) for i in range(n)]


__all__ = ["Normalize", "RewardFn", "RewardSet", "node_weights", "normalized", "unknown_reward_error"]
