"""Budgets of auxiliary LLM calls (optimizer, rewriter, corrector, judge, extractor).

A plugin that calls a model other than the one answering the user spends from a budget: one per
request (``budget.aux_calls_per_request``) or one per background ingestion / optimization job
(``budget.aux_calls_per_job``). Every call is recorded (role, plugin, seconds, ok/error) and the
records of a turn land in its trace as ``aux_calls``, so a user can see what personalization cost.

    budget = turn_budget(turn)                       # this request's budget, created on first use
    text = await budget.call("rewriter", "bpo", lambda: backend.agenerate(...), timeout=5)

``call`` raises ``BudgetExceeded`` when no call or time is left (before starting the call) and
``BackendTimeout`` when the call itself runs past its timeout; the caller decides whether that
means "serve without my change" (the usual choice) or failing the turn.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from persona_mw.errors import BackendTimeout, PersonaError
from persona_mw.types import StashKey, Turn

T = TypeVar("T")

DEFAULT_CALLS_PER_REQUEST = 4
DEFAULT_SECONDS_PER_REQUEST = 20.0
DEFAULT_CALLS_PER_JOB = 16


class BudgetExceeded(PersonaError):
    """No auxiliary call (or time) is left in this budget."""


@dataclass
class AuxCall:
    role: str
    plugin: str
    seconds: float
    ok: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "plugin": self.plugin, "seconds": round(self.seconds, 4),
                "ok": self.ok, "error": self.error}


@dataclass
class AuxBudget:
    """A bounded number of auxiliary calls and wall-clock seconds (None = no time limit)."""

    max_calls: int = DEFAULT_CALLS_PER_REQUEST
    max_seconds: float | None = DEFAULT_SECONDS_PER_REQUEST
    records: list[AuxCall] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def used(self) -> int:
        return len(self.records)

    @property
    def remaining(self) -> int:
        return max(0, self.max_calls - self.used)

    def seconds_left(self) -> float | None:
        if self.max_seconds is None:
            return None
        return self.max_seconds - (time.monotonic() - self.started)

    def check(self, role: str, plugin: str) -> None:
        """Raise ``BudgetExceeded`` if a call by ``plugin`` for ``role`` may not start now."""
        if self.remaining <= 0:
            raise BudgetExceeded(f"{plugin}: auxiliary call budget spent ({self.max_calls} calls); "
                                 f"{role!r} call skipped", hint="raise budget.aux_calls_per_request")
        left = self.seconds_left()
        if left is not None and left <= 0:
            raise BudgetExceeded(f"{plugin}: auxiliary time budget spent ({self.max_seconds} s); "
                                 f"{role!r} call skipped", hint="raise budget.aux_seconds_per_request")

    async def call(self, role: str, plugin: str, fn: Callable[[], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """Run ``fn()`` as one auxiliary call, within the budget's calls and time."""
        self.check(role, plugin)
        left = self.seconds_left()
        limit = min(x for x in (timeout, left) if x is not None) if (timeout or left) is not None else None
        t0 = time.monotonic()
        try:
            if limit is None:
                result = await fn()
            else:
                result = await asyncio.wait_for(fn(), timeout=limit)
        except asyncio.TimeoutError:
            self.records.append(AuxCall(role, plugin, time.monotonic() - t0, False, f"timed out after {limit:.2f} s"))
            raise BackendTimeout(f"{plugin}: {role!r} call timed out after {limit:.2f} s") from None
        except Exception as exc:
            self.records.append(AuxCall(role, plugin, time.monotonic() - t0, False, f"{type(exc).__name__}: {exc}"))
            raise
        self.records.append(AuxCall(role, plugin, time.monotonic() - t0, True))
        return result

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]


BUDGET_KEY: StashKey[AuxBudget] = StashKey("aux_budget")


def turn_budget(turn: Turn, max_calls: int | None = None, max_seconds: float | None = None) -> AuxBudget:
    """The request's budget, created on first use (limits from ``budget:`` in the config)."""
    if BUDGET_KEY not in turn.stash:
        limits = turn.stash.get(BUDGET_LIMITS_KEY, (DEFAULT_CALLS_PER_REQUEST, DEFAULT_SECONDS_PER_REQUEST))
        turn.stash[BUDGET_KEY] = AuxBudget(max_calls if max_calls is not None else limits[0],
                                           max_seconds if max_seconds is not None else limits[1])
    return turn.stash[BUDGET_KEY]


# The Middleware puts the configured per-request limits here when it builds a turn.
BUDGET_LIMITS_KEY: StashKey[tuple[int, float | None]] = StashKey("aux_budget_limits")


def job_budget(max_calls: int = DEFAULT_CALLS_PER_JOB, max_seconds: float | None = None) -> AuxBudget:
    """A budget for one background job (memory ingestion, prompt optimization)."""
    return AuxBudget(max_calls, max_seconds)


__all__ = ["AuxBudget", "AuxCall", "BudgetExceeded", "turn_budget", "job_budget", "BUDGET_KEY",
           "BUDGET_LIMITS_KEY"]
