"""Backend faults injected by a faulty OpenAI-compatible server on loopback, reached by the real
litellm backend: retries with backoff (honouring Retry-After), fail-over to another role, serving
unpersonalized with a trace flag, hard timeouts (never a hang), and 502/504 answers from our server."""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import pytest

from persona_mw import BackendError, BackendTimeout, Middleware, parse_config
from persona_mw.server import create_app, serve_in_thread

from .faulty_llm import faulty_app

pytest.importorskip("litellm")


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[str, Any]]:
    app = faulty_app()
    with serve_in_thread(app) as url:
        yield url + "/v1", app.state.calls


def make(store_url: Any, api: str, model: str, policy: str, roles: str = "") -> Middleware:
    cfg = parse_config(f"""
backend: {{type: litellm, model: openai/{model}, api_base: "{api}", api_key: x, timeout: 10}}
roles:
  spare: {{type: litellm, model: openai/ok, api_base: "{api}", api_key: x}}
{roles}
resilience:
  backend: {policy}
pipeline: [{{use: stated}}]
""")
    cfg.store.path = store_url()
    mw = Middleware(cfg, autoload=False)
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    return mw


def test_retry_with_backoff_then_success(store_url: Any, faulty: Any) -> None:
    api, calls = faulty
    with make(store_url, api, "flaky503", "{retries: 3, backoff_s: 0.05}") as mw:
        r = mw.chat(user="ana", messages="hi")
    assert "[user] hi" in r.text and calls["flaky503"] == 3
    assert sum(f.startswith("retry:") for f in r.trace.flags) == 2


def test_rate_limit_honours_retry_after(store_url: Any, faulty: Any) -> None:
    api, calls = faulty
    with make(store_url, api, "flaky429", "{retries: 2, backoff_s: 0.01, max_backoff_s: 3}") as mw:
        t = time.monotonic()
        r = mw.chat(user="ana", messages="hi")
        waited = time.monotonic() - t
    assert "[user] hi" in r.text and calls["flaky429"] == 3
    assert waited >= 1.9, f"Retry-After: 1 was not honoured ({waited:.2f}s for two retries)"
    assert any("retry:" in f and "1.00s" in f for f in r.trace.flags), r.trace.flags


def test_timeout_never_hangs_and_is_504(store_url: Any, faulty: Any) -> None:
    api, _ = faulty
    with make(store_url, api, "slow", "{timeout_s: 0.5, retries: 1, backoff_s: 0.01}") as mw:
        t = time.monotonic()
        with pytest.raises(BackendTimeout, match="within 0.5s"):
            mw.chat(user="ana", messages="hi")
        assert time.monotonic() - t < 3
        with serve_in_thread(create_app(mw)) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={"user": "ana", "messages": [
                {"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["type"] == "backend_timeout"


def test_fail_over_to_another_role(store_url: Any, faulty: Any) -> None:
    api, calls = faulty
    with make(store_url, api, "e500", "{retries: 1, backoff_s: 0.01, fallback: [spare]}") as mw:
        r = mw.chat(user="ana", messages="hi")
        chunks = list(mw.stream(user="ana", messages="hi"))  # streaming fails over too
    assert "[user] hi" in r.text and "Be brief" in r.text  # still personalized
    assert any(f.startswith("failover: backend -> spare") for f in r.trace.flags), r.trace.flags
    assert "[user] hi" in "".join(c.delta or "" for c in chunks if not c.done)


def test_malformed_response_is_a_clear_502(store_url: Any, faulty: Any) -> None:
    api, calls = faulty
    with make(store_url, api, "malformed", "{retries: 2, backoff_s: 0.01}") as mw:
        before = calls["malformed"]
        with pytest.raises(BackendError):
            mw.chat(user="ana", messages="hi")
        # litellm reports an unparseable body as a server error, so it is retried like a 5xx: bounded
        assert calls["malformed"] == before + 3
        with serve_in_thread(create_app(mw)) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={"user": "ana", "messages": [
                {"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["message"]
    assert "Traceback" not in r.text


def test_unpersonalized_when_the_personalized_prompt_fails(store_url: Any, faulty: Any) -> None:
    api, _ = faulty
    with make(store_url, api, "nopersonal", "{retries: 0, on_failure: unpersonalized}") as mw:
        r = mw.chat(user="ana", messages="hi")
        assert r.text == "[user] hi"
        assert any(f.startswith("degraded: unpersonalized") for f in r.trace.flags)
        assert any(f.startswith("degraded: unpersonalized") for f in mw.trace(r.trace.id)["flags"])
    with make(store_url, api, "e503", "{retries: 0, on_failure: unpersonalized}") as mw:
        with pytest.raises(BackendError):  # down for every prompt: an error, not a hang or a fake answer
            mw.chat(user="ana", messages="hi")


def test_failing_personalization_serves_unpersonalized(make_mw: Any) -> None:
    from persona_mw import PluginError, hookimpl

    class BrokenGather:
        @hookimpl
        def persona_gather(self, turn: Any) -> None:
            raise RuntimeError("vector index unavailable")

    from persona_mw.testing import registered

    strict = make_mw("pipeline: [{use: stated}]\n")
    lenient = make_mw("pipeline: [{use: stated}]\nresilience: {backend: {on_failure: unpersonalized}}\n")
    for mw in (strict, lenient):
        mw.feedback(kind="stated", user="ana", text="Be brief.")
    with registered(strict, BrokenGather(), "broken"), pytest.raises(PluginError):
        strict.chat(user="ana", messages="hi")
    with registered(lenient, BrokenGather(), "broken"):
        r = lenient.chat(user="ana", messages="hi")
    assert r.text == "hi" and any("degraded: unpersonalized" in f for f in r.trace.flags)


def test_bad_fallback_role_is_a_config_error(store_url: Any) -> None:
    from persona_mw import ConfigError

    cfg = parse_config("resilience: {backend: {fallback: [nope]}}\n")
    cfg.store.path = store_url()
    from persona_mw.testing import ScriptedBackend

    with pytest.raises(ConfigError, match="'nope' is not another role"):
        Middleware(cfg, backend=ScriptedBackend(), autoload=False)
