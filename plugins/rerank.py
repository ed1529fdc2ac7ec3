"""Best-of-n reranking: n candidates in one backend call, scored by named rewards, argmax served.

``rewards: {name: weight}`` names functions from the reward registry (``persona_register_rewards``;
built-ins in ``persona_mw.plugins.rewards``), called through ``persona_mw.reward_set.RewardSet`` as
``corrector`` does; an unknown name fails at startup naming it. A reward evaluated per graph node
(``{node: scores}``) is combined with the scope's node weights, so a new user's group preferences
count until their own evidence outweighs them. The weighted total picks the answer; every reward's
scores, the total and the choice go into the trace. A failing reward fails the turn
(``on_error: fail``) or is dropped and named in the trace (``skip``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.errors import PluginError
from persona_mw.reward_set import RewardSet, unknown_reward_error
from persona_mw.types import Candidate, Message, StashKey, Turn

_TOTAL: StashKey[dict[str, list[float]]] = StashKey("rerank.total")


class Rerank:
    """Generate n candidates, score them with weighted rewards, serve the best."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int = Field(default=4, ge=2, le=16, description="candidates generated in one call")
        rewards: dict[str, float] = Field(
            default_factory=lambda: {"style": 1.0, "stated": 1.0},
            description="reward name -> weight (names from the reward registry)",
        )
        options: dict[str, dict[str, Any]] = Field(
            default_factory=dict, description="per-reward settings, e.g. {judge: {mode: pairwise}}"
        )
        temperature: float | None = Field(
            default=None, ge=0.0, le=2.0,
            description="sampling temperature of the candidates (None: the request's, else the backend's)",
        )
        normalize: Literal["none", "minmax", "zscore"] = Field(
            default="none", description="rescale each reward across the candidates before weighting"
        )

        @field_validator("rewards")
        @classmethod
        def _weights(cls, v: dict[str, float]) -> dict[str, float]:
            if not v:
                raise ValueError("name at least one reward")
            if not all(math.isfinite(w) for w in v.values()) or not any(v.values()):
                raise ValueError("weights must be finite and not all zero")
            return v

    def __init__(self, config: Config | None = None, name: str = "rerank") -> None:
        self.config = config or self.Config()
        self.name = name
        self._rewards: RewardSet | None = None
        self._policy = "fail"
        self._ctx: Any = None
        self._role_backends: dict[str, Any] = {}
        self._key: StashKey[dict[str, list[float]]] = StashKey(f"rerank.{name}")

    # -- startup ------------------------------------------------------------------------------

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        at = ctx.index if ctx.index is not None else "pipeline"
        known = ctx.rewards
        for reward in self.config.rewards:
            if reward not in known:
                raise unknown_reward_error(reward, known, ctx.where("rewards", reward), at, self.name)
        extra = set(self.config.options) - set(self.config.rewards)
        if extra:
            raise ctx.config_error(
                f"pipeline[{at}].options: settings for reward(s) not in rewards: {', '.join(sorted(extra))}", "options")
        self._rewards = RewardSet(self.config.rewards, known, self.backend_for, self.config.options,
                                  self.config.normalize)
        self._policy = ctx.policy
        self._ctx = ctx

    def backend_for(self, role: str) -> Any:
        """The backend of a ``roles:`` entry (the main one when the role is not configured), cached."""
        if role not in self._role_backends:
            self._role_backends[role] = self._ctx.backend(role)
        return self._role_backends[role]

    # -- generate -----------------------------------------------------------------------------

    @hookimpl
    async def persona_generate(self, turn: Turn, backend: Any, messages: list[Message], n: int,
                               decoding: list[Any]) -> list[Candidate] | None:
        want = max(self.config.n, n)
        params = turn.request.params
        if self.config.temperature is not None and params.temperature is None:
            params = params.model_copy(update={"temperature": self.config.temperature})
        cands = await backend.generate(messages, n=want, params=params, decoding=decoding)
        turn.note(f"{len(cands)} candidate(s) from one call to {getattr(backend, 'name', 'the backend')}")
        return [c.model_copy(update={"index": i}) for i, c in enumerate(cands)]

    # -- score --------------------------------------------------------------------------------

    async def _one(self, rewards: RewardSet, reward: str, turn: Turn, candidates: list[Candidate]) -> list[float]:
        scores, nodes = await rewards.score(reward, turn, candidates)
        if len(nodes) > 1:
            turn.note(f"{reward} by node: " + ", ".join(
                f"{nd}(w={turn.scope.weight_of(nd) if turn.scope else 1:.2f})" for nd in nodes))
        return [round(x, 4) for x in scores]

    @hookimpl
    async def persona_score(self, turn: Turn, candidates: list[Candidate]) -> dict[str, list[float]] | None:
        rewards = self._rewards
        if rewards is None:
            raise PluginError(f"plugin {self.name!r} was not started (persona_startup did not run)",
                              plugin=self.name, hook="persona_score")
        scores: dict[str, list[float]] = {}
        for reward in rewards.fns:
            try:
                scores[reward] = await self._one(rewards, reward, turn, candidates)
            except Exception as exc:
                if self._policy != "skip":
                    raise PluginError(f"plugin {self.name!r}: reward {reward!r} failed: {type(exc).__name__}: {exc}",
                                      plugin=self.name, hook="persona_score") from exc
                turn.note(f"reward {reward!r} failed and was dropped: {type(exc).__name__}: {exc}")
                turn.trace.flags.append(f"{self.name}: reward {reward} failed: {type(exc).__name__}")
        if not scores:
            return None
        total = rewards.total(scores)
        out = dict(scores)
        out[f"{self.name}:total"] = total
        turn.stash[self._key] = {"total": total}
        for i, c in enumerate(candidates):
            c.meta["scores"] = {r: v[i] for r, v in out.items()}
        turn.note("; ".join(f"{r}={v}" for r, v in out.items()))
        return out

    # -- select -------------------------------------------------------------------------------

    @hookimpl
    def persona_select(self, turn: Turn, candidates: list[Candidate]) -> int | None:
        got = turn.stash.get(self._key, {})
        total = got.get("total")
        if not total or len(total) != len(candidates):
            return None
        best = max(range(len(total)), key=lambda i: (total[i], -i))
        turn.note(f"picked {best} of {len(total)} (total {total[best]})")
        return best


__all__ = ["Rerank"]
