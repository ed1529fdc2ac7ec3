"""``POST /v1/messages`` (Anthropic Messages) and ``POST /v1/responses`` (OpenAI Responses) on a real server
on loopback, driven by the official ``anthropic`` and ``openai`` SDKs with nothing but the base URL (and
the user in the fields those clients already send). Same auth, tenants, rate limit, body limits as chat
completions; errors in each API's own shape. The scripted backend stands in for the LLM except in the
two ``slow`` tests, which use the real SmolLM2."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from persona_mw.server import create_app, serve_in_thread

PIRATE = "Answer like a pirate."
STATED = "pipeline:\n  - use: stated\n"
HI = [{"role": "user", "content": "hello there"}]


def _anthropic(url: str, key: str = "x", **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=300, **kw)


def _openai(url: str, key: str = "x", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300, **kw)


@pytest.fixture
def pirate(make_mw: Any) -> Any:
    mw = make_mw(STATED)
    mw.feedback(kind="stated", user="ana", text=PIRATE)
    return mw


def test_messages_plain_and_streamed_are_personalized(pirate: Any) -> None:
    with serve_in_thread(create_app(pirate)) as url:
        c = _anthropic(url)
        msg = c.messages.create(model="m", max_tokens=50, messages=HI, metadata={"user_id": "ana"},
                                system="Be brief.")
        assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
        assert PIRATE in msg.content[0].text  # the scripted backend echoes the personalized prompt
        trace = msg.model_extra["persona_trace"]
        assert trace["user"] == "ana" and any(i["text"] == PIRATE for i in trace["items_used"])
        with c.messages.stream(model="m", max_tokens=50, messages=HI, metadata={"user_id": "ana"}) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert PIRATE in text and final.content[0].text == text and final.stop_reason == "end_turn"
        # the event sequence, as Anthropic sends it
        raw = httpx.post(url + "/v1/messages", json={"max_tokens": 9, "messages": HI, "stream": True},
                         headers={"X-Persona-User": "ana"}, timeout=60)
        events = [ln[7:] for ln in raw.text.splitlines() if ln.startswith("event: ")]
        assert events[:3] == ["message_start", "content_block_start", "ping"]
        assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert set(events[3:-3]) == {"content_block_delta"} and raw.headers["x-persona-trace-id"]


def test_responses_plain_and_streamed_are_personalized(pirate: Any) -> None:
    with serve_in_thread(create_app(pirate)) as url:
        c = _openai(url)
        r = c.responses.create(model="m", input="hello there", user="ana", instructions="Be brief.")
        assert r.status == "completed" and PIRATE in r.output_text
        assert r.model_extra["persona_trace"]["user"] == "ana"
        for who in ({"safety_identifier": "ana"}, {"prompt_cache_key": "ana"}):
            assert PIRATE in c.responses.create(model="m", input=HI, **who).output_text  # type: ignore[arg-type]
        stream = c.responses.create(model="m", input=HI, user="ana", stream=True)  # type: ignore[arg-type]
        events = list(stream)
        kinds = [e.type for e in events]
        assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
        assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
        done = events[-1].response  # type: ignore[union-attr]
        assert PIRATE in done.output_text
        assert [e.sequence_number for e in events] == list(range(len(events)))
        # someone else (from the header) does not get ana's preference
        other = _openai(url, default_headers={"X-Persona-User": "bob"}).responses.create(model="m", input="hello")
        assert PIRATE not in other.output_text


def test_errors_are_each_apis_own_shape_and_name_the_field(pirate: Any) -> None:
    with serve_in_thread(create_app(pirate, max_body_bytes=4096)) as url:
        a, o = _anthropic(url), _openai(url)
        with pytest.raises(anthropic.BadRequestError) as ei:
            a.messages.create(model="m", max_tokens=5, messages=HI)  # no user anywhere
        body = ei.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert body["error"]["param"] == "metadata.user_id"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            a.messages.create(model="m", max_tokens=0, messages=HI, metadata={"user_id": "ana"})
        with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.0\.type"):
            a.messages.create(model="m", max_tokens=5, metadata={"user_id": "ana"}, messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}])
        with pytest.raises(openai.BadRequestError) as eo:
            o.responses.create(model="m", input="hi")
        assert eo.value.body["param"] == "user"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
            o.responses.create(model="m", input="hi", user="ana", max_output_tokens=0)
        # body limit: 413 in each shape
        big = "x" * 10_000
        r = httpx.post(url + "/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": big}],
                                                   "metadata": {"user_id": "ana"}})
        assert r.status_code == 413 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "request_too_large"
        r = httpx.post(url + "/v1/responses", json={"input": big, "user": "ana"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        for path in ("/v1/messages", "/v1/responses"):
            r = httpx.post(url + path, content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["message"]
    assert PIRATE in str(pirate.export_user("ana"))  # nothing stored was lost


def test_tenants_keys_and_rate_limit(make_mw: Any) -> None:
    base = make_mw(STATED + "server: {rate_limit: {requests_per_s: 0.01, burst: 2}}\n")
    keys = {"t1": ["key-t1"], "t2": ["key-t2"]}
    app = create_app(base, api_keys=keys)
    app.state.tenants.middleware("t1").feedback(kind="stated", user="ana", text=PIRATE)
    with serve_in_thread(app) as url:
        with pytest.raises(anthropic.AuthenticationError) as ea:
            _anthropic(url, "wrong").messages.create(model="m", max_tokens=5, messages=HI,
                                                     metadata={"user_id": "ana"})
        assert ea.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            _openai(url, "wrong").responses.create(model="m", input="hi", user="ana")
        # the anthropic SDK sends x-api-key; each tenant sees only its own users
        assert PIRATE in _anthropic(url, "key-t1").messages.create(
            model="m", max_tokens=50, messages=HI, metadata={"user_id": "ana"}).content[0].text
        assert PIRATE not in _openai(url, "key-t2").responses.create(model="m", input="hello", user="ana").output_text
        # t1 has used 1 of its burst of 2: one more, then 429 in Anthropic's shape with Retry-After
        _openai(url, "key-t1").responses.create(model="m", input="hello", user="ana")
        with pytest.raises(anthropic.RateLimitError) as er:
            _anthropic(url, "key-t1").messages.create(model="m", max_tokens=5, messages=HI,
                                                      metadata={"user_id": "ana"})
        assert er.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert er.value.response.headers["retry-after"]
        with pytest.raises(openai.RateLimitError):
            _openai(url, "key-t1").responses.create(model="m", input="hello", user="ana")


def test_openapi_lists_the_new_routes(pirate: Any) -> None:
    with serve_in_thread(create_app(pirate)) as url:
        doc = httpx.get(url + "/openapi.json").json()
    assert {"/v1/messages", "/v1/responses"} <= set(doc["paths"])
    assert {"MessagesBody", "ResponsesBody"} <= set(doc["components"]["schemas"])


@pytest.mark.slow
def test_messages_with_the_local_model(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw(STATED, backend=local_backend)
    mw.feedback(kind="stated", user="ana", text="Keep answers short.")
    with serve_in_thread(create_app(mw)) as url:
        c = _anthropic(url)
        with c.messages.stream(model="m", max_tokens=8, metadata={"user_id": "ana"},
                               messages=[{"role": "user", "content": "Name a fruit."}]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
            trace_id = s.response.headers["x-persona-trace-id"]
    assert text.strip() and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert mw.trace(trace_id)["items_used"]


@pytest.mark.slow
def test_responses_with_the_local_model(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw(STATED, backend=local_backend)
    mw.feedback(kind="stated", user="ana", text="Keep answers short.")
    with serve_in_thread(create_app(mw)) as url:
        r = _openai(url).responses.create(model="m", input="Name a fruit.", user="ana", max_output_tokens=8)
    assert r.output_text.strip() and r.status in ("completed", "incomplete")
    assert r.model_extra["persona_trace"]["items_used"]
