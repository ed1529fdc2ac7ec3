"""One runner for every hook: startup and forget are awaited and follow the plugin's policy like the
per-turn stages; the registration hooks are sync only and an async one is refused, not dropped."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persona_mw import PluginError, hookimpl


class AsyncLifecycle:
    """Async startup and forget, each awaiting before it records (a dropped coroutine records nothing)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False
        self.forgotten: list[tuple[str, list[str]]] = []

    @hookimpl
    async def persona_startup(self, middleware: Any) -> None:
        await asyncio.sleep(0.01)
        self.started = middleware is not None

    @hookimpl
    async def persona_forget(self, user: str, nodes: list[str], store: Any) -> None:
        await asyncio.sleep(0.01)
        self.forgotten.append((user, list(nodes)))
        store.ensure_node("context:forget-ran")  # a real write, seen through the real store


def _plugin(mw: Any, cls: type) -> Any:
    return next(p.instance for p in mw.host.pipeline if isinstance(p.instance, cls))


def test_async_startup_and_forget_run(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}, {use: life}]\n", plugins={"life": AsyncLifecycle})
    plugin = _plugin(mw, AsyncLifecycle)
    assert plugin.started, "async persona_startup was never awaited"
    mw.chat(user="ana", messages="hi")
    mw.join("ana", "team")
    mw.forget("ana")
    assert plugin.forgotten == [("ana", ["group:team"])], "async persona_forget was never awaited"
    assert mw.store.get_node("context:forget-ran") is not None


def test_async_forget_runs_from_aforget(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: life}]\n", plugins={"life": AsyncLifecycle})
    mw.chat(user="bo", messages="hi")

    async def main() -> dict[str, Any]:
        return await mw.aforget("bo")

    asyncio.run(main())
    assert _plugin(mw, AsyncLifecycle).forgotten == [("bo", [])]


class FailingForget:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    async def persona_forget(self, user: str) -> None:
        raise RuntimeError("cannot reach the side index")


def test_forget_failure_follows_the_plugins_policy(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: ff}]\n", plugins={"ff": FailingForget})
    mw.chat(user="ana", messages="hi")
    with pytest.raises(PluginError, match="plugin 'ff' failed in persona_forget: RuntimeError") as err:
        mw.forget("ana")
    assert err.value.plugin == "ff" and err.value.hook == "persona_forget"
    assert not mw.store.has_user("ana")  # the rows went first; a retry of forget is safe

    skipping = make_mw("pipeline: [{use: ff, on_error: skip}]\n", plugins={"ff": FailingForget})
    skipping.chat(user="ana", messages="hi")
    assert skipping.forget("ana")["scrubbed"] in (True, False)  # skipped: forget itself succeeds


class FailingStartup:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    async def persona_startup(self) -> None:
        raise RuntimeError("no model")


def test_async_startup_failure_names_the_plugin(make_mw: Any) -> None:
    with pytest.raises(PluginError, match="plugin 'boot' failed in persona_startup: RuntimeError: no model"):
        make_mw("pipeline: [{use: boot}]\n", plugins={"boot": FailingStartup})


class AsyncRegistrar:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    async def persona_register_rewards(self, register: Any) -> None:
        register("never", lambda: [])


def test_async_registration_hook_is_refused(make_mw: Any) -> None:
    with pytest.raises(PluginError, match="'reg'.*persona_register_rewards must be a plain def"):
        make_mw("pipeline: [{use: reg}]\n", plugins={"reg": AsyncRegistrar})


class SlowFeedback:
    """A plain-function feedback hook that blocks (a store write with retry sleeps, say)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, float]] = []

    @hookimpl
    def persona_feedback(self, event: Any) -> None:
        import threading
        import time

        from persona_mw.profiles import WRITER

        time.sleep(0.8)
        self.calls.append((threading.current_thread().name, WRITER.get(), time.perf_counter()))


def test_a_blocking_feedback_hook_does_not_stall_the_requests_beside_it(make_mw: Any) -> None:
    """A sync ``persona_feedback`` runs on its plugin's thread (stage ``offload``): a chat started while
    it sleeps is answered before it ends, its profile writes are still marked as its own, and two
    events reach it one at a time, in order. On the event loop (before) the chat waited 0.8 s."""
    import time

    mw = make_mw("pipeline: [{use: stated}, {use: slow}]\n", plugins={"slow": SlowFeedback})
    plugin = _plugin(mw, SlowFeedback)

    async def scenario() -> tuple[float, float]:
        fb = asyncio.ensure_future(mw.afeedback({"user": "ana", "kind": "stated", "text": "Be brief.",
                                                 "polarity": "like"}))
        fb2 = asyncio.ensure_future(mw.afeedback({"user": "ana", "kind": "stated", "text": "Use metric units.",
                                                  "polarity": "like"}))
        await asyncio.sleep(0.2)  # both events are in their hook by now
        await mw.achat(user="bob", messages=[{"role": "user", "content": "hi"}])
        chat_done = time.perf_counter()
        await asyncio.gather(fb, fb2)
        return chat_done, time.perf_counter()

    chat_done, feedback_done = mw.runtime.run(scenario())
    assert chat_done < plugin.calls[0][2] < feedback_done
    assert [c[0].startswith("persona-slow") for c in plugin.calls] == [True, True]
    assert [c[1] for c in plugin.calls] == ["slow", "slow"]
    assert plugin.calls[1][2] - plugin.calls[0][2] >= 0.75  # one at a time
    prompt = mw.chat(user="ana", messages=[{"role": "user", "content": "hi"}]).messages[0].text
    assert "Be brief." in prompt and "Use metric units." in prompt  # both events were applied
