"""The OpenAI-compatible HTTP API: a real uvicorn server on loopback, driven by real clients
(the openai SDK, litellm, httpx). Backends are scripted only where a failure is injected."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import openai
import pytest

from persona_mw import BackendOverloaded, BackendTimeout, BackendUnavailable, Middleware, hookimpl
from persona_mw.server import create_app, serve_in_thread, to_chat_request
from persona_mw.testing import ScriptedBackend, registered
from persona_mw.types import Message

REPO = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "hello there"}]


def new_mw(store: str, backend: Any = None) -> Middleware:
    """On the test store (a SQLite file, or a Postgres schema with PERSONA_MW_TEST_STORE=postgres)."""
    return Middleware(store=store, backend=backend or ScriptedBackend(), autoload=False)


@pytest.fixture(scope="module")
def mw(session_store_url: Callable[[], str]) -> Iterator[Middleware]:
    m = new_mw(session_store_url())
    yield m
    m.close()


@pytest.fixture(scope="module")
def url(mw: Middleware) -> Iterator[str]:
    with serve_in_thread(create_app(mw)) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    yield c
    c.close()


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped JSON error with the given status (and the field named in ``param``)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# --------------------------------------------------------------------------- openai SDK


def test_openai_sdk_chat(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="persona", messages=HELLO, user="ana")
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "hello there"  # the scripted backend echoes
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    trace = resp.model_extra["persona_trace"]
    assert trace["user"] == "ana"
    assert raw.headers["x-persona-trace-id"] == trace["id"]


def test_openai_sdk_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="persona", messages=[{"role": "user", "content": "one two three"}], user="ana", stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["persona_trace"]["user"] == "ana"
    assert len({c.id for c in chunks}) == 1


def test_openai_sdk_n_and_params(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="persona", messages=HELLO, user="ana", n=3, max_tokens=20, temperature=0.5, top_p=0.9, seed=1,
        stop="\n",
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 3


def test_user_and_context_from_headers(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": HELLO},
                   headers={"X-Persona-User": "hdr-user", "X-Persona-Context": "coding"})
    assert r.status_code == 200, r.text
    assert r.json()["persona_trace"]["user"] == "hdr-user"


def test_to_chat_request_conversion() -> None:
    body = {"model": "m", "messages": HELLO, "user": "ana", "stop": "END", "max_tokens": 5,
            "max_completion_tokens": 7, "groups": ["acme"], "n": 2, "frequency_penalty": 1, "tools": []}
    req = to_chat_request(body, {"X-Persona-User": "other", "X-Persona-Context": "coding"})
    assert req.user == "ana"  # the body wins over the header
    assert req.context == "coding"
    assert req.params.stop == ["END"] and req.params.max_tokens == 7
    assert req.groups == ["acme"] and req.n == 2 and req.model == "m"
    assert req.messages == [Message(role="user", content="hello there")]


def test_unknown_openai_fields_are_ignored(url: str) -> None:
    body = {"model": "m", "messages": HELLO, "user": "ana", "frequency_penalty": 0.5, "presence_penalty": 0,
            "logit_bias": {"50256": -100}, "response_format": {"type": "text"}, "parallel_tool_calls": False,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
            "stream_options": {"include_usage": True}, "logprobs": False, "store": False, "service_tier": "auto"}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello there"


def test_concurrent_users_get_their_own_answers(url: str) -> None:
    async def ask(c: httpx.AsyncClient, i: int) -> tuple[int, str]:
        r = await c.post("/v1/chat/completions",
                         json={"model": "m", "user": f"u{i}", "messages": [{"role": "user", "content": f"q{i}"}]})
        return i, r.json()["choices"][0]["message"]["content"]

    async def main() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(ask(c, i) for i in range(12)))

    assert all(text == f"q{i}" for i, text in asyncio.run(main()))


# --------------------------------------------------------------------------- litellm as a client


def test_litellm_client(url: str) -> None:
    from persona_mw.adapters.litellm import import_litellm

    litellm = import_litellm()
    common = dict(model="openai/anything", api_base=url + "/v1", api_key="x", max_retries=0)
    r = litellm.completion(messages=[{"role": "user", "content": "via body"}], extra_body={"user": "ana"}, **common)
    assert r.choices[0].message.content == "via body"
    r = litellm.completion(messages=[{"role": "user", "content": "via header"}],
                           extra_headers={"X-Persona-User": "ana"}, **common)
    assert r.choices[0].message.content == "via header"
    stream = litellm.completion(messages=[{"role": "user", "content": "streamed via litellm"}],
                                extra_headers={"X-Persona-User": "ana"}, stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "streamed via litellm"


# --------------------------------------------------------------------------- bad input


BAD_CHAT: list[tuple[str, Any, int, str | None]] = [
    ("malformed json", '{"model": "m", "messages": [', 400, None),
    ("empty body", "", 400, None),
    ("json array", "[1, 2]", 400, None),
    ("json string", '"hello"', 400, None),
    ("missing messages", {"model": "m", "user": "ana"}, 400, "messages"),
    ("messages not a list", {"messages": "hi", "user": "ana"}, 400, "messages"),
    ("empty messages", {"messages": [], "user": "ana"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}], "user": "ana"}, 400, "messages.0.role"),
    ("no user message", {"messages": [{"role": "system", "content": "x"}], "user": "ana"}, 400, "messages"),
    ("missing user", {"messages": HELLO}, 400, "user"),
    ("bad user id", {"messages": HELLO, "user": "ana smith"}, 400, "user"),
    ("user wrong type", {"messages": HELLO, "user": 42}, 400, "user"),
    ("n wrong type", {"messages": HELLO, "user": "ana", "n": "many"}, 400, "n"),
    ("n too large", {"messages": HELLO, "user": "ana", "n": 1000}, 400, "n"),
    ("temperature out of range", {"messages": HELLO, "user": "ana", "temperature": 7}, 400, "temperature"),
    ("max_tokens negative", {"messages": HELLO, "user": "ana", "max_tokens": -1}, 400, "max_tokens"),
    ("max_completion_tokens zero", {"messages": HELLO, "user": "ana", "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("stop wrong type", {"messages": HELLO, "user": "ana", "stop": 5}, 400, "stop"),
    ("stream wrong type", {"messages": HELLO, "user": "ana", "stream": [1]}, 400, "stream"),
    ("bad context", {"messages": HELLO, "user": "ana", "context": "a b"}, 400, "context"),
    ("groups wrong type", {"messages": HELLO, "user": "ana", "groups": "acme"}, 400, "groups"),
]


@pytest.mark.parametrize("body,status,param", [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_requests(url: str, body: Any, status: int, param: str | None) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, status, param)


def test_bad_chat_stream_request_is_a_json_error(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "stream": True})
    assert_error(r, 400, "user")


def test_wrong_content_type(url: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", content="messages=hi", headers={"content-type": "text/plain"})
    assert_error(r, 400)
    r = httpx.post(url + "/v1/chat/completions", data={"messages": "hi"})  # form-encoded
    assert_error(r, 400)


def test_oversize_body(url: str) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}], "user": "ana"}
    r = httpx.post(url + "/v1/chat/completions", json=big)
    assert_error(r, 413)
    r = httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "ana", "text": "y" * (2 << 20)})
    assert_error(r, 413)
    # The server is still fine afterwards.
    assert httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "user": "ana"}).status_code == 200


def test_body_limit_is_configurable(mw: Middleware) -> None:
    with serve_in_thread(create_app(mw, max_body_bytes=400)) as base:
        ok = {"messages": HELLO, "user": "ana"}
        assert httpx.post(base + "/v1/chat/completions", json=ok).status_code == 200
        big = {"messages": [{"role": "user", "content": "x" * 500}], "user": "ana"}
        assert_error(httpx.post(base + "/v1/chat/completions", json=big), 413)


def test_unknown_route_and_method(url: str) -> None:
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(url + "/v1/chat/completions"), 405)


# --------------------------------------------------------------------------- feedback and users


def test_feedback_recorded(url: str) -> None:
    r = httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "fb-ana", "text": "short answers"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "recorded" and r.json()["id"].startswith("fb-")
    r = httpx.post(url + "/v1/feedback", headers={"X-Persona-User": "fb-ana"},
                   json={"kind": "choice", "prompt": "p", "chosen": "a", "rejected": ["b"]})
    assert r.status_code == 201, r.text
    exported = httpx.get(url + "/v1/users/fb-ana").json()
    assert "short answers" in json.dumps(exported)


BAD_FEEDBACK: list[tuple[str, Any, str | None]] = [
    ("missing kind", {"user": "ana", "text": "x"}, "kind"),
    ("unknown kind", {"user": "ana", "kind": "vote", "text": "x"}, "kind"),
    ("rating out of range", {"user": "ana", "kind": "rating", "prompt": "p", "response": "r", "rating": 3}, "rating"),
    ("choice without rejected", {"user": "ana", "kind": "choice", "prompt": "p", "chosen": "a"}, "rejected"),
    ("edit unchanged", {"user": "ana", "kind": "edit", "before": "a", "after": "a"}, None),
    ("unknown field", {"user": "ana", "kind": "stated", "text": "x", "colour": "red"}, "colour"),
    ("missing user", {"kind": "stated", "text": "x"}, "user"),
    ("bad user id", {"kind": "stated", "text": "x", "user": "a b"}, "user"),
]


@pytest.mark.parametrize("body,param", [c[1:] for c in BAD_FEEDBACK], ids=[c[0] for c in BAD_FEEDBACK])
def test_bad_feedback(url: str, body: Any, param: str | None) -> None:
    assert_error(httpx.post(url + "/v1/feedback", json=body), 400, param)


def test_feedback_malformed_json(url: str) -> None:
    r = httpx.post(url + "/v1/feedback", content="{nope", headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_profile_export_forget(url: str) -> None:
    for path in ("/v1/users/ghost/profile", "/v1/users/ghost"):
        err = assert_error(httpx.get(url + path), 404, "user")
        assert "ghost" in err["message"]
    assert_error(httpx.delete(url + "/v1/users/ghost"), 404, "user")
    assert_error(httpx.get(url + "/v1/users/a%20b/profile"), 400, "user")

    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "user": "carol"})
    assert r.status_code == 200
    profile = httpx.get(url + "/v1/users/carol/profile")
    assert profile.status_code == 200 and profile.json()["user"] == "carol"
    export = httpx.get(url + "/v1/users/carol")
    assert export.status_code == 200 and "carol" in export.text
    gone = httpx.delete(url + "/v1/users/carol")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert_error(httpx.get(url + "/v1/users/carol/profile"), 404)


def test_health_and_models(url: str, mw: Middleware, client: openai.OpenAI) -> None:
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == [mw.model_name]


# --------------------------------------------------------------------------- failures


class BreaksMidStream(ScriptedBackend):
    async def stream(self, messages: list[Message], **kw: Any) -> AsyncIterator[str]:
        yield "partial"
        raise BackendUnavailable("the backend went away mid-answer")


def test_backend_failures_map_to_status(store_url: Callable[[], str]) -> None:
    for fail, status, kind in ((BackendTimeout("too slow"), 504, "backend_timeout"),
                               (BackendUnavailable("refused"), 502, "backend_unavailable")):
        m = new_mw(store_url(), ScriptedBackend(fail=fail))
        try:
            with serve_in_thread(create_app(m)) as base:
                for stream in (False, True):
                    r = httpx.post(base + "/v1/chat/completions",
                                   json={"messages": HELLO, "user": "ana", "stream": stream})
                    assert assert_error(r, status)["type"] == kind
        finally:
            m.close()


def test_an_overloaded_backend_answers_503_with_retry_after(store_url: Callable[[], str]) -> None:
    m = new_mw(store_url(), ScriptedBackend(fail=BackendOverloaded("12 requests are waiting", retry_after_s=3)))
    try:
        with serve_in_thread(create_app(m)) as base:
            for stream in (False, True):
                r = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "user": "ana", "stream": stream})
                assert assert_error(r, 503)["type"] == "overloaded_error"
                assert r.headers["retry-after"] == "3"
    finally:
        m.close()


def test_error_mid_stream_is_an_sse_event(store_url: Callable[[], str]) -> None:
    m = new_mw(store_url(), BreaksMidStream())
    try:
        with serve_in_thread(create_app(m)) as base:
            with httpx.stream("POST", base + "/v1/chat/completions",
                              json={"messages": HELLO, "user": "ana", "stream": True}) as r:
                assert r.status_code == 200
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert json.loads(events[1])["choices"][0]["delta"]["content"] == "partial"
            assert json.loads(events[-1])["error"]["type"] == "backend_unavailable"
            assert "[DONE]" not in events

            c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIError, match="went away"):
                list(c.chat.completions.create(model="m", messages=HELLO, user="ana", stream=True))
            # The server survives: plain requests still work.
            assert httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "user": "ana"}).status_code == 200
    finally:
        m.close()


class Crashes:
    @hookimpl
    def persona_rewrite(self, turn: Any, messages: list[Message]) -> None:
        raise RuntimeError("rewrite exploded")


def test_plugin_crash_is_502_naming_the_plugin(store_url: Callable[[], str]) -> None:
    m = new_mw(store_url())
    try:
        with registered(m, Crashes(), name="crashy"), serve_in_thread(create_app(m)) as base:
            for stream in (False, True):
                r = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "user": "ana", "stream": stream})
                err = assert_error(r, 502)
                assert err["type"] == "plugin_error" and "crashy" in err["message"]
    finally:
        m.close()


def test_serve_in_thread_stops_cleanly(mw: Middleware) -> None:
    with serve_in_thread(create_app(mw)) as base:
        assert httpx.get(base + "/healthz").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/healthz", timeout=2)


def test_import_persona_mw_loads_no_server_or_litellm() -> None:
    code = ("import sys, persona_mw, persona_mw.server; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'litellm', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# --------------------------------------------------------------------------- the real local model


@pytest.mark.slow
def test_real_local_model_through_openai_sdk(store_url: Callable[[], str]) -> None:
    from persona_mw.adapters import transformers as transformers_adapter

    m = new_mw(store_url(), transformers_adapter.create())
    try:
        with serve_in_thread(create_app(m)) as base:
            c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
            msgs = [{"role": "user", "content": "Name one colour."}]
            resp = c.chat.completions.create(model="local", messages=msgs, user="ana", max_tokens=12, temperature=0)
            assert resp.choices[0].message.content.strip()
            assert resp.choices[0].finish_reason in ("stop", "length")
            stream = c.chat.completions.create(model="local", messages=msgs, user="ana", max_tokens=12,
                                               temperature=0, stream=True)
            chunks = list(stream)
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        m.close()
