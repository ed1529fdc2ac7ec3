"""``persona_mw.wire_responses`` against the official ``openai`` SDK: the SDK builds the Responses request,
the pipeline answers through the wire module, and the SDK parses the response and the stream events with
its own types (an ``httpx2.MockTransport`` stands where the route will be, until the server's refactor)."""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx2 as httpx  # the openai SDK here runs on httpx2, the httpx fork with the same API
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from persona_mw import Middleware, parse_config
from persona_mw.errors import RequestError
from persona_mw.testing import ScriptedBackend
from persona_mw.wire_responses import response_json, sse, stream_events, to_chat_request

PREF = "Answer like a pirate."


@pytest.fixture
def mw(store_url: Callable[[], str]) -> Any:
    cfg = parse_config("pipeline:\n  - use: stated\n    placement: system\n")
    cfg.store.path = store_url()
    m = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
    m.feedback(kind="stated", user="ana", text=PREF)
    yield m
    m.close()


def sdk_client(mw: Any, seen: list[dict[str, Any]]) -> openai.OpenAI:
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        try:
            chat = to_chat_request(body, request.headers)
        except RequestError as exc:
            return httpx.Response(400, json={"error": {"message": str(exc), "type": "invalid_request_error",
                                                       "param": exc.field, "code": None}})
        if chat.stream:
            frames = "".join(sse(ev) for ev in stream_events(mw.stream(chat), model=body["model"]))
            seen.append({"frames": frames})
            return httpx.Response(200, content=frames.encode(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=response_json(mw.chat(chat), body["model"]))

    return openai.OpenAI(api_key="x", base_url="http://persona.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handle)))


def test_sdk_response_round_trip(mw: Any) -> None:
    client = sdk_client(mw, [])
    r = client.responses.create(model="m", instructions="Be helpful.", user="ana", input=[
        {"role": "user", "content": "Name a cat."}, {"role": "assistant", "content": "Whiskers."},
        {"role": "user", "content": [{"type": "input_text", "text": "And a dog?"}]}])
    assert isinstance(r, Response) and r.output_text == "And a dog?" and r.status == "completed"
    prompt = [(m.role, m.text) for m in mw.backend.calls[-1]]
    assert prompt[0][0] == "system" and PREF in prompt[0][1] and "Be helpful." in prompt[0][1]
    assert prompt[1:] == [("user", "Name a cat."), ("assistant", "Whiskers."), ("user", "And a dog?")]
    # the user from the fields clients already send
    r = client.responses.create(model="m", input="Hi there", safety_identifier="ana")
    assert r.output_text == "Hi there" and PREF in mw.backend.calls[-1][0].text


def test_sdk_stream_events(mw: Any) -> None:
    seen: list[dict[str, Any]] = []
    client = sdk_client(mw, seen)
    with client.responses.stream(model="m", input="Tell me about ships.", prompt_cache_key="ana") as stream:
        types = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert final.output_text == "Tell me about ships."
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    adapter = TypeAdapter(ResponseStreamEvent)
    frames = seen[-1]["frames"].split("\n\n")[:-1]
    events = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for ev in events:
        assert adapter.validate_python(ev).type == ev["type"]


def test_bad_requests_name_the_field(mw: Any) -> None:
    client = sdk_client(mw, [])
    with pytest.raises(openai.BadRequestError, match="missing user"):
        client.responses.create(model="m", input="hi")
    for body, field in [({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                         "input.0.content.0.type"),
                        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
                        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
                        ({}, "input"),
                        ({"input": "x", "user": "a b"}, "user")]:
        with pytest.raises(RequestError) as info:
            to_chat_request(body, {"X-Persona-User": "ana"})
        assert info.value.field == field and field in str(info.value), (body, info.value)
