"""The PluginContext is what a plugin may use; the old ``persona_startup(middleware)`` still works, warned."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest

from persona_mw import ConfigError, hookimpl
from persona_mw.context import PluginContext


class UsesContext:
    """Touches every part of the context a built-in plugin relies on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ctx: PluginContext | None = None
        self.ran: list[str] = []

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    @hookimpl
    def persona_feedback(self, event: Any) -> None:
        assert self.ctx is not None
        self.ctx.update_profile(f"user:{event.user}", lambda p: p.extra.update({self.name: event.text}))

        async def job() -> None:
            await asyncio.sleep(0)
            self.ran.append(event.text)

        self.ctx.schedule(job())


class OldStyle:
    def __init__(self, name: str) -> None:
        self.name = name
        self.mw: Any = None

    @hookimpl
    def persona_startup(self, middleware: Any) -> None:
        self.mw = middleware


def _plugin(mw: Any, cls: type) -> Any:
    return next(p.instance for p in mw.host.pipeline if isinstance(p.instance, cls))


def test_context_surface(make_mw: Any) -> None:
    from persona_mw.testing import ScriptedBackend

    mw = make_mw("roles:\n  judge: {type: fake}\npipeline: [{use: stated}, {use: uses, on_error: skip}]\n",
                 plugins={"uses": UsesContext})
    mw.host.backend_types["fake"] = lambda **settings: ScriptedBackend(name="judge")
    plugin = _plugin(mw, UsesContext)
    ctx = plugin.ctx
    assert isinstance(ctx, PluginContext)
    assert ctx.plugin == "uses" and ctx.index == 1 and ctx.policy == "skip"
    assert ctx.backend() is mw.backend
    assert ctx.backend("judge") is ctx.backend("judge") is not mw.backend  # a role's backend, built once
    assert ctx.backend("unconfigured") is mw.backend
    assert "style" in ctx.rewards and not hasattr(ctx.rewards, "__setitem__")  # read-only registry
    assert ctx.store is mw.store and ctx.graph is mw.graph
    assert ctx.profile_lock("user:x") is mw.profile_lock("user:x")
    assert ctx.job_budget().max_calls == mw.config.budget.aux_calls_per_job
    err = ctx.config_error("bad setting", "threshold")
    assert isinstance(err, ConfigError) and err.message.endswith(": bad setting")
    mw.feedback(kind="stated", user="ana", text="short answers")
    mw.drain()
    assert plugin.ran == ["short answers"]
    assert mw.store.get_profile("user:ana").extra["uses"] == "short answers"


def test_contexts_are_per_plugin(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: uses, name: a}, {use: uses, name: b, on_error: skip}]\n",
                 plugins={"uses": UsesContext})
    a, b = (p.instance.ctx for p in mw.host.pipeline)
    assert (a.plugin, a.policy, a.index) == ("a", "fail", 0)
    assert (b.plugin, b.policy, b.index) == ("b", "skip", 1)


def test_old_startup_argument_still_works_with_a_deprecation_warning(make_mw: Any) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mw = make_mw("pipeline: [{use: old}]\n", plugins={"old": OldStyle})
    assert _plugin(mw, OldStyle).mw is mw
    dep = [w for w in caught if issubclass(w.category, DeprecationWarning) and "persona_startup" in str(w.message)]
    assert dep and "persona_startup(ctx)" in str(dep[0].message)


def test_no_builtin_plugin_declares_the_deprecated_argument() -> None:
    import inspect

    from persona_mw.manager import PluginHost

    host = PluginHost(autoload=False)
    for name, cls in host.plugin_types.items():
        fn = getattr(cls, "persona_startup", None)
        if fn is not None:
            assert "middleware" not in inspect.signature(fn).parameters, name


def test_white_box_plugin_refused_on_black_box_names_its_entry(make_mw: Any) -> None:
    with pytest.raises(ConfigError, match=r"<string>:1: plugin 'vectors' \(vectors\) steers decoding"):
        make_mw("pipeline: [{use: vectors}]\n")


def test_for_tenant_shares_backends_not_data(make_mw: Any, tmp_path: Any, store_url) -> None:
    from persona_mw.testing import ScriptedBackend

    closed: list[bool] = []
    backend = ScriptedBackend()

    async def aclose() -> None:
        closed.append(True)

    backend.aclose = aclose  # type: ignore[method-assign]
    base = make_mw("pipeline: [{use: stated}]\n", backend=backend)
    base.feedback(kind="stated", user="ana", text="answer in French")
    acme = base.for_tenant("acme", store_url())
    try:
        assert acme.backend is base.backend and acme.tenant == "acme"
        assert [p.name for p in acme.host.pipeline] == ["stated"]
        assert not acme.store.has_user("ana")  # another store: the base's users are not there
        acme.chat(user="ana", messages="hi")
        assert "French" not in backend.calls[-1][0].text
    finally:
        acme.close()
    assert closed == []  # the tenant leaves the shared backend open
    base.chat(user="ana", messages="hi")  # and the base still serves
    assert "French" in " ".join(m.text for m in backend.calls[-1])
