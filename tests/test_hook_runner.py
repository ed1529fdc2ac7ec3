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
