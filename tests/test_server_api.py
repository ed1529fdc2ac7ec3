"""The server's tenants, traces, OpenAPI schema, ``n`` streaming and tool pass-through, on loopback."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest

from persona_mw import ConfigError, Middleware, parse_config
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend

HELLO = [{"role": "user", "content": "hello there"}]
KEYS = {"acme": ["acme-key-0001"], "globex": ["sha256:" + hashlib.sha256(b"globex-key-01").hexdigest()]}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def tenant_server(session_store_url: Callable[[], str]) -> Iterator[tuple[str, Middleware]]:
    cfg = parse_config("pipeline:\n  - use: stated\n    placement: system\n")
    cfg.store.path = session_store_url()
    mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
    with serve_in_thread(create_app(mw, api_keys=KEYS)) as url:
        yield url, mw
    mw.close()


def test_missing_and_wrong_keys_are_401(tenant_server: Any) -> None:
    url, _ = tenant_server
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "user": "ana"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "user": "ana"}, headers=auth("nope-nope"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for method, path in (("GET", "/v1/users/ana"), ("DELETE", "/v1/users/ana"), ("GET", "/v1/models"),
                         ("GET", "/v1/traces/trace-x"), ("POST", "/v1/feedback")):
        assert httpx.request(method, url + path).status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200  # liveness needs no key
    c = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="m", messages=HELLO, user="ana")


def test_tenants_never_see_each_other(tenant_server: Any) -> None:
    url, mw = tenant_server
    acme = openai.OpenAI(base_url=url + "/v1", api_key="acme-key-0001", max_retries=0)
    httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "ana", "text": "Talk like a pirate."},
               headers=auth("acme-key-0001")).raise_for_status()
    raw = acme.chat.completions.with_raw_response.create(model="m", messages=HELLO, user="ana")
    trace_id = raw.headers["x-persona-trace-id"]
    # the same user id under the other tenant is a different, unknown user
    for path in ("/v1/users/ana", "/v1/users/ana/profile", f"/v1/traces/{trace_id}"):
        assert httpx.get(url + path, headers=auth("globex-key-01")).status_code == 404, path
        assert httpx.get(url + path, headers=auth("acme-key-0001")).status_code == 200, path
    assert httpx.delete(url + "/v1/users/ana", headers=auth("globex-key-01")).status_code == 404
    # the isolation is structural: one store per tenant (a SQLite file beside the base one, or a
    # Postgres schema of its own), none in the base store
    acme_store = mw.store.for_tenant("acme")
    try:
        assert acme_store.has_user("ana")
    finally:
        acme_store.close()
    assert not mw.store.has_user("ana")
    explained = httpx.get(f"{url}/v1/traces/{trace_id}", headers=auth("acme-key-0001")).json()
    assert explained["user"] == "ana" and explained["granularity"]
    assert any(s["plugin"] == "stated" for s in explained["changed_by"])
    assert any("pirate" in json.dumps(i) for i in explained["items_used"])


def test_keys_from_config_are_hashed(store_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_KEY", "from-env-key-1")
    cfg = parse_config("server:\n  api_keys:\n    acme: [{$env: ACME_KEY}]\n  max_body_bytes: 2048\n")
    assert cfg.server.api_keys == {"acme": ["sha256:" + hashlib.sha256(b"from-env-key-1").hexdigest()]}
    assert "from-env-key-1" not in cfg.model_dump_json()
    for bad in ("server:\n  api_keys:\n    acme: [short]\n", "server:\n  api_keys:\n    'a:b': [long-enough-key]\n",
                "server:\n  api_keys:\n    acme: ['sha256:xyz']\n", "server:\n  api_key: {}\n"):
        with pytest.raises(ConfigError):
            parse_config(bad)
    cfg.store.path = store_url()
    mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
    try:
        with serve_in_thread(create_app(mw)) as url:
            ok = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "user": "ana"},
                            headers=auth("from-env-key-1"))
            assert ok.status_code == 200
            big = {"messages": [{"role": "user", "content": "x" * 3000}], "user": "ana"}
            assert httpx.post(url + "/v1/chat/completions", json=big, headers=auth("from-env-key-1")).status_code == 413
    finally:
        mw.close()


@pytest.fixture(scope="module")
def open_url(session_store_url: Callable[[], str]) -> Iterator[str]:
    mw = Middleware(store=session_store_url(), backend=ScriptedBackend(), autoload=False)
    with serve_in_thread(create_app(mw)) as url:
        yield url
    mw.close()


def test_openapi_schema_describes_the_routes(open_url: str) -> None:
    doc = httpx.get(open_url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    assert set(paths) >= {"/v1/chat/completions", "/v1/feedback", "/v1/users/{user}", "/v1/users/{user}/profile",
                          "/v1/traces/{trace_id}", "/v1/models", "/healthz"}
    assert set(paths["/v1/users/{user}"]) == {"get", "delete"}
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["required"] == ["messages"]
    assert "422" not in paths["/v1/chat/completions"]["post"]["responses"]
    assert "securitySchemes" not in doc.get("components", {})  # open server


def test_stream_with_n_returns_n_choices(open_url: str) -> None:
    c = openai.OpenAI(base_url=open_url + "/v1", api_key="x", max_retries=0)
    chunks = list(c.chat.completions.create(model="m", messages=HELLO, user="ana", n=3, stream=True))
    texts: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 3
    assert chunks[-1].model_extra["persona_trace"]["user"] == "ana"


def test_context_header_reaches_the_pipeline(open_url: str) -> None:
    r = httpx.post(open_url + "/v1/chat/completions", json={"messages": HELLO, "user": "ctx-user"},
                   headers={"X-Persona-Context": "coding"})
    assert r.status_code == 200
    profile = httpx.get(open_url + "/v1/users/ctx-user/profile?context=coding")
    assert profile.status_code == 200


class ToolBackend(ScriptedBackend):
    """Records the params it was given, as a tool-capable backend would receive them."""

    seen: list[Any] = []

    async def generate(self, messages: Any, *, n: int = 1, params: Any = None, decoding: Any = None) -> Any:
        self.seen.append(params)
        cands = await super().generate(messages, n=n, params=params, decoding=decoding)
        if params is not None and params.tools:
            call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            cands[0].meta["tool_calls"] = [call]
            cands[0].finish_reason = "tool_calls"
        return cands


def test_tools_are_passed_through_untouched(store_url: Callable[[], str]) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    backend = ToolBackend()
    mw = Middleware(store=store_url(), backend=backend, autoload=False)
    try:
        with serve_in_thread(create_app(mw)) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            r = c.chat.completions.create(model="m", messages=HELLO, user="ana", tools=tools,  # type: ignore[arg-type]
                                          tool_choice="auto")
        assert backend.seen[-1].tools == tools and backend.seen[-1].tool_choice == "auto"
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    finally:
        mw.close()


def test_litellm_backend_sends_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The litellm backend hands tools/tool_choice to litellm as they came."""
    import asyncio

    from persona_mw.adapters.litellm import LiteLLMBackend
    from persona_mw.types import GenerationParams, Message

    b = LiteLLMBackend(model="openai/x")
    kwargs = b._kwargs([Message(role="user", content="hi")],
                       GenerationParams(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none"))
    assert kwargs["tools"] == [{"type": "function", "function": {"name": "f"}}] and kwargs["tool_choice"] == "none"
    assert asyncio.run(b.aclose()) is None


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_trace_id_no_trace_can_have_is_a_404_on_every_store(kind: str, request: pytest.FixtureRequest,
                                                             tmp_path: Any) -> None:
    """Found by the fuzz once it ran on Postgres: ``GET /v1/traces/%00`` reached the store, and Postgres
    text cannot hold a NUL, so the answer was a 503. An id no trace can have is unknown on every store."""
    from .conftest import fresh_pg_url

    url = str(tmp_path / "t.db") if kind == "sqlite" else fresh_pg_url(request.getfixturevalue("pg_server"), "trc")
    mw = Middleware(store=url, backend=ScriptedBackend(), autoload=False)
    try:
        known = mw.chat(user="ana", messages="hi").trace.id
        with serve_in_thread(create_app(mw)) as base:
            for bad in ("%00", "a%00b", "%01", "x%20y", "%E2%80%AE"):
                r = httpx.get(f"{base}/v1/traces/{bad}", timeout=30)
                assert r.status_code == 404, (bad, r.status_code, r.text[:300])
                assert r.json()["error"]["param"] == "trace_id"
            assert httpx.get(f"{base}/v1/traces/{known}", timeout=30).status_code == 200
        for bad in ("\x00", "a\x00b", "x y"):
            assert mw.trace(bad) is None  # the Python API: unknown, not a store error
        assert mw.trace(known) is not None
    finally:
        mw.close()
