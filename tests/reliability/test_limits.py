"""Resource limits (``limits:``): request size and message count give a clear 400, an over-long
personalized prompt is trimmed (trace flag), stated preferences and memories per user are capped,
and auxiliary calls spend from the configured per-request budget."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from persona_mw import RequestError, hookimpl
from persona_mw.budget import BudgetExceeded, turn_budget
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import registered
from persona_mw.types import Memory


def test_defaults_are_safe(make_mw: Any) -> None:
    lim = make_mw().config.limits
    assert lim.max_messages <= 1000 and lim.max_request_chars <= 1_000_000 and lim.max_memories_per_user <= 10_000
    assert lim.aux_calls_per_request <= 8 and lim.job_attempts <= 5


def test_request_limits_are_clear_400s(make_mw: Any) -> None:
    mw = make_mw("limits: {max_messages: 3, max_message_chars: 50, max_request_chars: 80}\n")
    many = [{"role": "user", "content": "x"}] * 4
    with pytest.raises(RequestError, match=r"too many messages: 4 \(limit 3\)"):
        mw.chat(user="ana", messages=many)
    with pytest.raises(RequestError, match=r"message 0 has 51 characters \(limit 50\)"):
        mw.chat(user="ana", messages="y" * 51)
    with pytest.raises(RequestError, match=r"81 characters in all \(limit 80\)"):
        mw.chat(user="ana", messages=[{"role": "user", "content": "z" * 40}, {"role": "user", "content": "z" * 41}])
    with serve_in_thread(create_app(mw)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"user": "ana", "messages": many})
        assert r.status_code == 400 and "too many messages" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
        r = httpx.post(f"{url}/v1/chat/completions", json={"user": "ana", "messages": [{"role": "user",
                                                                                        "content": "y" * 60}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


def test_long_prompt_is_trimmed_oldest_first(make_mw: Any) -> None:
    mw = make_mw("limits: {max_prompt_tokens: 120}\npipeline: [{use: stated}]\n")
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    history = [{"role": "system", "content": "You are kind."}]
    for i in range(10):
        history += [{"role": "user", "content": f"question {i} " + "words " * 20},
                    {"role": "assistant", "content": f"answer {i} " + "words " * 20}]
    history.append({"role": "user", "content": "the last question"})
    r = mw.chat(user="ana", messages=history)
    seen = mw.backend.calls[-1]
    assert seen[0].text == "You are kind." and "the last question" in seen[-1].text and "Be brief" in seen[-1].text
    assert len(seen) < len(history)
    (flag,) = [f for f in r.trace.flags if f.startswith("trimmed:")]
    assert "oldest message" in flag and "max_prompt_tokens=120" in flag
    # a last turn that cannot fit even alone is refused, not silently cut
    with pytest.raises(RequestError, match="even without earlier turns"):
        mw.chat(user="ana", messages="word " * 400)


def test_stated_preferences_and_memories_per_user_are_capped(make_mw: Any) -> None:
    mw = make_mw("limits: {max_stated_per_user: 3, max_memories_per_user: 4}\npipeline: [{use: stated}]\n")
    for i in range(6):
        mw.feedback(kind="stated", user="ana", text=f"preference number {i}")
    prof = mw.store.get_profile("user:ana")
    assert [p.text for p in prof.stated] == [f"preference number {i}" for i in (3, 4, 5)]
    assert mw.store.count_feedback("ana") == 6  # the events are all kept; rebuild applies the same cap
    mw.rebuild("ana")
    assert len(mw.store.get_profile("user:ana").stated) == 3
    mw.store.add_memory(Memory(owner="user:ana", kind="preference", text="likes tea", created_at=0))
    for i in range(6):
        mw.store.add_memory(Memory(owner="user:ana", text=f"fact {i}", created_at=i + 1))
    left = [m.text for m in mw.store.list_memories("user:ana")]
    assert len(left) == 4 and "likes tea" in left and left[-1] == "fact 5"


def test_aux_call_budget_comes_from_limits(make_mw: Any) -> None:
    mw = make_mw("limits: {aux_calls_per_request: 1}\n")
    seen: list[str] = []

    class TwoCalls:
        @hookimpl
        async def persona_gather(self, turn: Any) -> None:
            budget = turn_budget(turn)

            async def call() -> str:
                return "ok"

            seen.append(await budget.call("judge", "twocalls", call))
            try:
                await budget.call("judge", "twocalls", call)
            except BudgetExceeded as exc:
                seen.append(str(exc))

    with registered(mw, TwoCalls(), "twocalls"):
        mw.chat(user="ana", messages="hi")
    assert seen[0] == "ok" and "auxiliary call budget spent (1 calls)" in seen[1]


def test_budget_is_the_one_home_of_aux_limits() -> None:
    """``limits.aux_*`` (older configs) move to ``budget:``; both at once is a clear config error."""
    from persona_mw.config import parse_config
    from persona_mw.errors import ConfigError

    cfg = parse_config("limits: {aux_calls_per_request: 2, aux_seconds_per_request: 3}\n", "old.yaml")
    assert (cfg.budget.aux_calls_per_request, cfg.budget.aux_seconds_per_request) == (2, 3)
    cfg = parse_config("budget: {aux_calls_per_request: 5}\nlimits: {aux_seconds_per_request: 7}\n", "mixed.yaml")
    assert (cfg.budget.aux_calls_per_request, cfg.budget.aux_seconds_per_request) == (5, 7)
    with pytest.raises(ConfigError, match="both budget: and limits:"):
        parse_config("budget: {aux_calls_per_request: 5}\nlimits: {aux_calls_per_request: 1}\n", "clash.yaml")
