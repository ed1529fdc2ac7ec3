"""The litellm callback on every path litellm has: completion, acompletion, streaming both, the proxy hook."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterator

import pytest

from persona_mw.adapters.litellm import import_litellm
from persona_mw.integrations.litellm import MARK, PersonaCallback

from .conftest import SYSTEM_BLOCK, last_prompt

litellm = import_litellm()
HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def callback(personal: Any) -> Iterator[PersonaCallback]:
    mw, _ = personal
    cb = PersonaCallback(mw)
    litellm.callbacks = [cb]
    yield cb
    remove_callback(cb)


def remove_callback(cb: object) -> None:
    """litellm copies ``litellm.callbacks`` into several internal lists on first use: clear them all."""
    for name in ("callbacks", "input_callback", "success_callback", "failure_callback", "_async_input_callback",
                 "_async_success_callback", "_async_failure_callback", "service_callback"):
        lst = getattr(litellm, name, None)
        if isinstance(lst, list):
            lst[:] = [c for c in lst if c is not cb]


def common(url: str) -> dict[str, Any]:
    return dict(model="openai/upstream", api_base=url + "/v1", api_key="x", max_retries=0)


def settle(mw: Any, cb: PersonaCallback, completed: int) -> None:
    """litellm runs success callbacks in a thread (sync) or a task (async): wait for them."""
    for _ in range(100):
        if cb.completed >= completed:
            break
        asyncio.run(asyncio.sleep(0.05))
    mw.drain()


def check(upstream: Any, personal: Any, cb: PersonaCallback, n: int, answer: str = "hi there") -> None:
    mw, rec = personal
    settle(mw, cb, n)
    prompt = last_prompt(upstream[1])
    assert prompt[0] == ("system", SYSTEM_BLOCK), prompt
    assert prompt[-1] == ("user", "hi there")
    assert cb.completed == n and not cb._pending
    assert rec.seen[-1][:2] == ("ana", answer)  # the post-call stage saw the real (unredacted) answer


def test_sync_completion_and_stream(upstream: Any, personal: Any, callback: PersonaCallback) -> None:
    url = upstream[0]
    r = litellm.completion(messages=HI, user="ana", **common(url))
    assert r.choices[0].message.content == "hi there"
    check(upstream, personal, callback, 1)
    stream = litellm.completion(messages=HI, metadata={"persona_user": "ana"}, stream=True, **common(url))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "hi there"
    check(upstream, personal, callback, 2)


def test_async_completion_and_stream(upstream: Any, personal: Any, callback: PersonaCallback) -> None:
    url = upstream[0]

    async def main() -> str:
        r = await litellm.acompletion(messages=HI, user="ana", **common(url))
        s = await litellm.acompletion(messages=HI, extra_headers={"X-Persona-User": "ana"}, stream=True,
                                      **common(url))
        text = "".join([c.choices[0].delta.content or "" async for c in s])
        for _ in range(100):  # success callbacks are tasks on this loop
            if callback.completed >= 2:
                break
            await asyncio.sleep(0.05)
        return r.choices[0].message.content + "|" + text

    assert asyncio.run(main()) == "hi there|hi there"
    check(upstream, personal, callback, 2)


def test_proxy_pre_call_hook_then_router_call(upstream: Any, personal: Any, callback: PersonaCallback) -> None:
    """What the LiteLLM proxy does: ``async_pre_call_hook(data)``, then ``acompletion(**data)``.
    The deployment hook sees the mark and does not rewrite twice."""
    url = upstream[0]

    async def main() -> str:
        data = {"model": "openai/upstream", "messages": HI, "user": "ana", "litellm_call_id": "proxy-call-1",
                "metadata": {}}
        out = await callback.async_pre_call_hook(None, None, data, "acompletion")
        assert out["metadata"][MARK] == "proxy-call-1" and out["messages"][0]["role"] == "system"
        assert callback.turn_for("proxy-call-1") is not None
        r = await litellm.acompletion(**{**out, **common(url)})
        for _ in range(100):
            if callback.completed >= 1:
                break
            await asyncio.sleep(0.05)
        return r.choices[0].message.content

    assert asyncio.run(main()) == "hi there"
    check(upstream, personal, callback, 1)
    assert sum(1 for m in upstream[1].calls[-1] if m.role == "system") == 1


def test_calls_without_a_user_pass_through(upstream: Any, personal: Any, callback: PersonaCallback) -> None:
    r = litellm.completion(messages=HI, **common(upstream[0]))
    assert r.choices[0].message.content == "hi there"
    assert last_prompt(upstream[1]) == [("user", "hi there")]
    assert not callback._pending


def test_failed_call_drops_the_pending_turn(personal: Any, callback: PersonaCallback) -> None:
    with pytest.raises(Exception):
        litellm.completion(messages=HI, user="ana", model="openai/x", api_base="http://127.0.0.1:9/v1",
                           api_key="x", max_retries=0, timeout=5)
    for _ in range(100):
        if not callback._pending:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not callback._pending


def test_proxy_config_example_loads_the_callback(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                store_url: Any) -> None:
    """examples/litellm_proxy/config.yaml parses and its callback resolves with litellm's own loader."""
    import yaml
    from litellm.proxy.types_utils.utils import get_instance_fn

    from tests.test_examples import EXAMPLES

    path = EXAMPLES / "litellm_proxy" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    (name,) = cfg["litellm_settings"]["callbacks"]
    pipeline = EXAMPLES / "litellm_proxy" / "pipeline.yaml"
    text = pipeline.read_text().replace("store:\n  path: persona.db", f"store:\n  path: {json.dumps(store_url())}")
    (tmp_path / "pipeline.yaml").write_text(text)
    monkeypatch.setenv("PERSONA_MW_CONFIG", str(tmp_path / "pipeline.yaml"))
    import persona_mw.integrations.litellm as integration

    monkeypatch.setattr(integration, "_proxy_handler", None)
    handler = get_instance_fn(name, config_file_path=str(path))
    assert isinstance(handler, PersonaCallback)
    assert [p.use for p in handler.mw.host.pipeline] == ["stated"]
    assert cfg["model_list"][0]["litellm_params"]["model"].startswith("openai/")
    handler.mw.close()


def test_a_failed_calls_trace_is_stored_redacted(store_url: Any) -> None:
    """The failure path stored the trace bare, past the Middleware's trace writer: the trace bounds and the
    coarse timings (``trace.timing_resolution_ms``) were skipped."""
    from persona_mw.testing import ScriptedBackend
    from persona_mw.config import parse_config
    from persona_mw.middleware import Middleware

    cfg = parse_config("pipeline: [{use: stated}]\nprivacy: {redact: [email]}\n"
                       "trace: {timing_resolution_ms: 50}\n")
    cfg.store.path = store_url()
    with Middleware(cfg, backend=ScriptedBackend(), autoload=False) as mw:
        cb = PersonaCallback(mw)
        litellm.callbacks = [cb]
        try:
            with pytest.raises(Exception):
                litellm.completion(messages=[{"role": "user", "content": "mail me at ana.secret@example.com"}],
                                   user="ana", model="openai/x", api_base="http://127.0.0.1:9/v1",
                                   api_key="x", max_retries=0, timeout=5)
            for _ in range(100):
                if not cb._pending:
                    break
                asyncio.run(asyncio.sleep(0.05))
        finally:
            remove_callback(cb)
        traces = mw.store.list_traces("ana")
        assert traces and any("llm_call_failed" in f for f in traces[0].flags)
        assert "ana.secret@example.com" not in traces[0].model_dump_json()
        assert traces[0].steps and all(step.ms % 50 == 0 for step in traces[0].steps)
