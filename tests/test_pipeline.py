"""Hook contract tests: YAML order, collect/chain/firstresult, async impls, failure policies."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel, ConfigDict

from persona_mw import Candidate, ContextItem, Message, PluginError, Scope, ScopeNode, hookimpl
from persona_mw.hookspecs import TURN_STAGES
from persona_mw.testing import HookRecorder, ScriptedBackend, registered


class Tagger:
    """Appends its tag to the last user message (rewrite) and gathers one item."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tag: str = "x"

    def __init__(self, config: Config, name: str) -> None:
        self.config, self.name = config, name

    @hookimpl
    def persona_gather(self, turn):
        return [ContextItem(kind="other", text=self.config.tag, source=self.name)]

    @hookimpl
    def persona_rewrite(self, messages):
        out = list(messages)
        out[-1] = out[-1].with_text(out[-1].text + f" <{self.config.tag}>")
        return out


class AsyncNone:
    """Async firstresult implementations that return None must not end the chain."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    @hookimpl
    async def persona_resolve_scope(self, turn):
        await asyncio.sleep(0)
        self.calls += 1
        return None

    @hookimpl
    async def persona_generate(self, turn, n):
        self.calls += 1
        return None

    @hookimpl
    async def persona_select(self, candidates):
        return None


class FixedGenerator:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    async def persona_generate(self, n):
        await asyncio.sleep(0)
        return [Candidate(text=f"generated-{i}", index=i) for i in range(n)]

    @hookimpl
    def persona_score(self, candidates):
        return {"len": [float(-len(c.text)) for c in candidates], "last": [float(i) for i in range(len(candidates))]}


class Boom:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        stage: str = "persona_rewrite"

    def __init__(self, config: Config, name: str) -> None:
        self.config, self.name = config, name

    @hookimpl
    def persona_rewrite(self, messages):
        if self.config.stage == "persona_rewrite":
            raise RuntimeError("kaboom")
        return None

    @hookimpl
    def persona_correct(self, candidate):
        if self.config.stage == "persona_correct":
            return "not a candidate"  # invalid result: must be caught at the boundary
        return None


PLUGINS = {"tagger": Tagger, "boom": Boom}


def user_text(resp):
    return next(m.text for m in reversed(resp.messages) if m.role == "user")


def test_rewrite_chain_follows_yaml_order(make_mw):
    yaml_ab = """
pipeline:
  - {use: tagger, name: a, tag: A}
  - {use: tagger, name: b, tag: B}
  - {use: tagger, name: c, tag: C}
"""
    mw = make_mw(yaml_ab, plugins=PLUGINS)
    r = mw.chat(user="ana", messages="hi")
    assert user_text(r) == "hi <A> <B> <C>"
    assert r.text == "hi <A> <B> <C>"  # the scripted backend echoes what it saw
    assert [s.plugin for s in r.trace.steps if s.hook == "persona_rewrite"] == ["a", "b", "c"]
    yaml_ba = yaml_ab.replace("name: a, tag: A", "name: z, tag: Z")
    mw2 = make_mw("pipeline:\n  - {use: tagger, name: c, tag: C}\n  - {use: tagger, name: a, tag: A}\n",
                  plugins=PLUGINS)
    assert user_text(mw2.chat(user="ana", messages="hi")) == "hi <C> <A>"
    assert yaml_ba  # same class twice with different settings is the point of names


def test_collect_gathers_from_every_plugin_in_order(make_mw):
    mw = make_mw("pipeline:\n  - {use: tagger, name: a, tag: A}\n  - {use: tagger, name: b, tag: B}\n",
                 plugins=PLUGINS)
    seen = {}

    class Spy:
        @hookimpl
        def persona_rewrite(self, turn, messages):
            seen["items"] = [i.text for i in turn.items]

    with registered(mw, Spy()):
        mw.chat(user="ana", messages="hi")
    assert seen["items"] == ["A", "B"]


def test_async_firstresult_none_does_not_end_chain(make_mw):
    mw = make_mw()
    an, gen = AsyncNone("an"), FixedGenerator("gen")
    # registered() puts the newest first: gen then an  ->  an runs first.
    with registered(mw, gen, "gen"), registered(mw, an, "an"):
        r = mw.chat(user="ana", messages="hi", n=3)
    assert an.calls == 2  # resolve_scope and generate both ran and returned None
    assert r.choices[0].text.startswith("generated-")
    assert len(r.choices) == 3
    # default select: mean of the scores -> "last" dominates -> index 2 served first
    assert r.choices[0].text == "generated-2"
    assert mw.backend.calls == []  # the plugin owned generation; the backend was not called


def test_firstresult_stops_at_first_non_none(make_mw):
    class Scoper:
        def __init__(self, gran):
            self.gran, self.calls = gran, 0

        @hookimpl
        def persona_resolve_scope(self, turn):
            self.calls += 1
            return Scope(user=turn.user, nodes=[ScopeNode(id=turn.user_node, kind="user", weight=1.0)],
                         granularity=self.gran)

    mw = make_mw()
    first, second = Scoper("user"), Scoper("global")
    with registered(mw, second, "second"), registered(mw, first, "first"):
        r = mw.chat(user="ana", messages="hi")
    assert (first.calls, second.calls) == (1, 0)
    assert r.trace.granularity == "user"


def test_failing_plugin_fail_policy_names_plugin(make_mw):
    mw = make_mw("pipeline:\n  - {use: boom, name: exploder}\n", plugins=PLUGINS)
    with pytest.raises(PluginError) as ei:
        mw.chat(user="ana", messages="hi")
    assert ei.value.plugin == "exploder" and ei.value.hook == "persona_rewrite"
    assert "exploder" in str(ei.value) and "kaboom" in str(ei.value)


def test_failing_plugin_skip_policy_records_trace(make_mw):
    mw = make_mw("pipeline:\n  - {use: boom, name: exploder, on_error: skip}\n  - {use: tagger, tag: T}\n",
                 plugins=PLUGINS)
    r = mw.chat(user="ana", messages="hi")
    assert r.text == "hi <T>"
    (err,) = r.trace.errors
    assert err.plugin == "exploder" and err.skipped and "kaboom" in err.error
    stored = mw.trace(r.trace.id)
    assert any((s["error"] or "").endswith("kaboom") for s in stored["steps"])


def test_invalid_plugin_result_is_caught_at_boundary(make_mw):
    mw = make_mw("pipeline:\n  - {use: boom, name: bad, stage: persona_correct}\n", plugins=PLUGINS)
    with pytest.raises(PluginError, match="bad.*invalid result from persona_correct"):
        mw.chat(user="ana", messages="hi")


def test_misspelled_hook_is_an_error(make_mw):
    class Typo:
        def __init__(self, name):
            pass

        @hookimpl
        def persona_gahter(self, turn):
            return None

    with pytest.raises(PluginError, match="persona_gahter"):
        make_mw("pipeline:\n  - {use: typo}\n", plugins={"typo": Typo})


def test_every_hook_is_called_and_documented(make_mw):
    import persona_mw.hookspecs as hs

    mw = make_mw()
    rec = HookRecorder()
    with registered(mw, rec, "rec"):
        mw.chat(user="ana", messages="hi", n=2)
        mw.drain()
        mw.feedback(kind="stated", user="ana", text="be brief")
    assert set(rec.calls) == set(TURN_STAGES) | {"persona_feedback"}
    order = [c for c in rec.calls if c != "persona_feedback"]
    assert order == list(TURN_STAGES)
    for name in dir(hs):
        if name.startswith("persona_"):
            doc = getattr(hs, name).__doc__ or ""
            assert "When" in doc and "Returns" in doc, f"{name} is not documented with the template"


def test_async_api_and_streaming_run_after_turn(make_mw):
    done = []

    class After:
        @hookimpl
        async def persona_after_turn(self, turn, response):
            await asyncio.sleep(0.01)
            done.append(response.text)

    mw = make_mw("pipeline:\n  - {use: tagger, tag: S}\n", plugins=PLUGINS)

    async def main():
        with registered(mw, After(), "after"):
            r = await mw.achat(user="ana", messages="hello world")
            chunks = [c async for c in mw.astream(user="ana", messages="hello world")]
            await mw.adrain()
        return r, chunks

    r, chunks = asyncio.run(main())
    assert r.text == "hello world <S>"
    assert "".join(c.delta for c in chunks) == "hello world <S>"
    assert chunks[-1].done and chunks[-1].trace is not None
    assert done == ["hello world <S>", "hello world <S>"]


def test_after_turn_failure_is_recorded_not_raised(make_mw):
    class BadAfter:
        @hookimpl
        def persona_after_turn(self, turn):
            raise ValueError("extraction broke")

    mw = make_mw()
    with registered(mw, BadAfter(), "bad_after"):
        r = mw.chat(user="ana", messages="hi")
        mw.drain()
    stored = mw.trace(r.trace.id)
    assert any("extraction broke" in (s["error"] or "") for s in stored["steps"])
    assert any("after_turn_failed" in f for f in stored["flags"])


def test_stream_with_correcting_plugin_streams_final_answer(make_mw):
    class Upper:
        @hookimpl
        def persona_correct(self, candidate):
            return candidate.model_copy(update={"text": candidate.text.upper()})

    mw = make_mw()
    with registered(mw, Upper(), "upper"):
        chunks = list(mw.stream(user="ana", messages="quiet words"))
    assert "".join(c.delta for c in chunks) == "QUIET WORDS"


def test_backend_failure_surfaces_as_backend_error(make_mw):
    from persona_mw import BackendTimeout

    mw = make_mw(backend=ScriptedBackend(fail=BackendTimeout("too slow")))
    with pytest.raises(BackendTimeout):
        mw.chat(user="ana", messages="hi")


def test_public_api_is_complete():
    import persona_mw
    import persona_mw.types as t

    for name in persona_mw.__all__:
        assert hasattr(persona_mw, name), name
    public_models = [n for n, v in vars(t).items()
                     if isinstance(v, type) and v.__module__ == t.__name__ and not n.startswith("_")]
    missing = set(public_models) - set(persona_mw.__all__) - {"Usage", "Stash"}
    assert not missing, f"types not exported from persona_mw: {missing}"
    assert Message(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]).text == "a\nb"


def test_role_backends_are_shared_and_closed(make_mw, monkeypatch):
    from persona_mw.testing import ScriptedBackend

    built = []

    def factory(**settings):
        b = ScriptedBackend(name=settings.get("label", "judge"))
        closed = []

        async def aclose():
            closed.append(True)

        b.aclose = aclose
        b.closed = closed
        built.append(b)
        return b

    mw = make_mw("roles:\n  judge: {type: fake, label: j}\n")
    mw.host.backend_types["fake"] = factory
    first, second = mw.make_backend("judge"), mw.make_backend("judge")
    assert first is second and len(built) == 1 and first.name == "j"
    assert mw.make_backend("persona") is mw.backend  # an unconfigured role falls back to the main backend
    mw.close()
    assert first.closed == [True]


def test_plugin_scope_loads_the_profiles_of_its_nodes(make_mw):
    class OnlyUser:
        @hookimpl
        def persona_resolve_scope(self, turn):
            return Scope(user=turn.user, nodes=[ScopeNode(id=turn.user_node, kind="user", weight=1.0)],
                         granularity="user")

    mw = make_mw("pipeline: [{use: stated}]\ngraph:\n  groups:\n    g: {stated: ['group pref'], members: [ana]}\n")
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    with registered(mw, OnlyUser(), "only_user"):
        r = mw.chat(user="ana", messages="hi")
    assert "Be brief." in r.text and "group pref" not in r.text  # only the plugin's nodes apply
    assert mw.chat(user="ana", messages="hi").text.count("group pref") == 1  # default scope includes the group
