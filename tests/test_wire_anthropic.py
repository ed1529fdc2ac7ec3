"""``persona_mw.wire_anthropic`` against the official ``anthropic`` SDK: the SDK builds the request body,
the pipeline answers through the wire module, and the SDK parses the message and the SSE event stream
with its own types (an ``httpx2.MockTransport`` stands where the route will be, until the server's refactor)."""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx2 as httpx  # the anthropic SDK (2.x) runs on httpx2, the httpx fork with the same API
import pytest

anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is not installed")

from persona_mw import Middleware, parse_config  # noqa: E402
from persona_mw.errors import RequestError  # noqa: E402
from persona_mw.testing import ScriptedBackend  # noqa: E402
from persona_mw.wire_anthropic import (  # noqa: E402
    error_json,
    message_json,
    sse,
    stream_events,
    to_chat_request,
)

PREF = "Answer like a pirate."


@pytest.fixture
def mw(store_url: Callable[[], str]) -> Any:
    cfg = parse_config("pipeline:\n  - use: stated\n    placement: system\n")
    cfg.store.path = store_url()
    m = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
    m.feedback(kind="stated", user="ana", text=PREF)
    yield m
    m.close()


def sdk_client(mw: Any, seen: list[dict[str, Any]]) -> Any:
    """The SDK over a transport that answers through the wire module and the real pipeline."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        try:
            chat = to_chat_request(body, request.headers)
        except RequestError as exc:
            return httpx.Response(400, json=error_json(400, str(exc)))
        if chat.stream:
            frames = "".join(sse(ev) for ev in stream_events(mw.stream(chat), model=body["model"]))
            seen.append({"frames": frames})
            return httpx.Response(200, content=frames.encode(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=message_json(mw.chat(chat), body["model"]))

    return anthropic.Anthropic(api_key="x", base_url="http://persona.test", max_retries=0,
                               http_client=httpx.Client(transport=httpx.MockTransport(handle)))


def test_sdk_message_round_trip(mw: Any) -> None:
    seen: list[dict[str, Any]] = []
    client = sdk_client(mw, seen)
    msg = client.messages.create(model="m", max_tokens=64, system="Be helpful.", metadata={"user_id": "ana"},
                                 messages=[{"role": "user", "content": "Name a cat."},
                                           {"role": "assistant", "content": "Whiskers."},
                                           {"role": "user", "content": [{"type": "text", "text": "And a dog?"}]}])
    assert isinstance(msg, anthropic.types.Message)
    assert msg.content[0].text == "And a dog?" and msg.stop_reason == "end_turn"  # the echo backend
    prompt = [(m.role, m.text) for m in mw.backend.calls[-1]]
    assert prompt[0][0] == "system" and PREF in prompt[0][1] and "Be helpful." in prompt[0][1]
    assert prompt[1:] == [("user", "Name a cat."), ("assistant", "Whiskers."), ("user", "And a dog?")]
    assert msg.model_extra["persona_trace"]["id"]


def test_sdk_stream_event_sequence(mw: Any) -> None:
    seen: list[dict[str, Any]] = []
    client = sdk_client(mw, seen)
    with client.messages.stream(model="m", max_tokens=64, metadata={"user_id": "ana"},
                                messages=[{"role": "user", "content": "Tell me about ships."}]) as stream:
        parsed = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert final.content[0].text == "Tell me about ships." and final.stop_reason == "end_turn"
    assert "content_block_delta" in parsed and parsed[-1] == "message_stop"
    # the frames on the wire, in Anthropic's order; each data line names its event's type
    frames = seen[-1]["frames"].split("\n\n")[:-1]
    raw = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert all(json.loads(f.split("\n")[1].removeprefix("data: "))["type"] == t for f, t in zip(frames, raw))
    assert raw[:3] == ["message_start", "content_block_start", "ping"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[3:-3]) == {"content_block_delta"}
    events = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    from pydantic import TypeAdapter

    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for ev in events:  # every event but ping (a keep-alive the SDK skips) is the SDK's RawMessageStreamEvent
        if ev["type"] != "ping":
            assert adapter.validate_python(ev).type == ev["type"]


def test_sdk_bad_requests_name_the_field(mw: Any) -> None:
    client = sdk_client(mw, [])
    with pytest.raises(anthropic.BadRequestError, match="metadata.user_id"):
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.0\.type"):
        client.messages.create(model="m", max_tokens=8, metadata={"user_id": "ana"}, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "AA=="}}]}])
    for body, field in [({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
                        ({"max_tokens": 5, "messages": []}, "messages"),
                        ({"max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
                        ({"max_tokens": 5, "metadata": {"user_id": "a b"},
                          "messages": [{"role": "user", "content": "x"}]}, "user")]:
        with pytest.raises(RequestError) as info:
            to_chat_request(body, {"X-Persona-User": "ana"})
        assert info.value.field == field and field in str(info.value), (body, info.value)


def test_header_user_and_context() -> None:
    req = to_chat_request({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
                          {"x-persona-user": "ben", "x-persona-context": "coding"})
    assert (req.user, req.context, req.params.max_tokens) == ("ben", "coding", 5)
