"""The auxiliary-call budget: bounded calls, bounded time, every call recorded."""

import asyncio

import pytest

from persona_mw.budget import AuxBudget, BudgetExceeded, job_budget, turn_budget
from persona_mw.errors import BackendTimeout
from persona_mw.types import ChatRequest, Turn


def _run(coro):
    return asyncio.run(coro)


def test_calls_are_bounded_and_recorded():
    b = AuxBudget(max_calls=2, max_seconds=None)

    async def ok():
        return "x"

    async def go():
        assert await b.call("rewriter", "bpo", ok) == "x"
        assert await b.call("corrector", "corrector", ok) == "x"
        with pytest.raises(BudgetExceeded, match="2 calls"):
            await b.call("rewriter", "bpo", ok)

    _run(go())
    assert [r["role"] for r in b.as_list()] == ["rewriter", "corrector"]
    assert b.remaining == 0


def test_a_slow_call_times_out_and_counts():
    b = AuxBudget(max_calls=3, max_seconds=None)

    async def slow():
        await asyncio.sleep(5)

    async def go():
        with pytest.raises(BackendTimeout, match="timed out"):
            await b.call("optimizer", "fermi", slow, timeout=0.05)

    _run(go())
    assert b.used == 1 and b.records[0].ok is False


def test_time_budget_limits_the_call_and_then_refuses():
    b = AuxBudget(max_calls=10, max_seconds=0.1)

    async def slow():
        await asyncio.sleep(5)

    async def go():
        with pytest.raises(BackendTimeout):
            await b.call("judge", "rerank", slow)
        with pytest.raises(BudgetExceeded, match="time budget"):
            await b.call("judge", "rerank", slow)

    _run(go())
    assert b.used == 1


def test_a_failing_call_is_recorded_with_its_error():
    b = job_budget(max_calls=1)

    async def boom():
        raise RuntimeError("backend said no")

    with pytest.raises(RuntimeError):
        _run(b.call("extractor", "memory", boom))
    assert "backend said no" in b.records[0].error


def test_turn_budget_is_one_per_turn():
    turn = Turn(request=ChatRequest(user="ana", messages=[{"role": "user", "content": "hi"}]))
    assert turn_budget(turn) is turn_budget(turn)
