"""Valid-looking JSON that used to end in a 5xx (issue #17): deep nesting, lone surrogates, NaN, a seed
outside int64. Each gets a 4xx naming the field over HTTP (a RequestError through the Python API),
with the memory plugin's after-turn jobs on, and nothing stored: no user, no event, no job."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from persona_mw import RequestError
from persona_mw.server import create_app, serve_in_thread

MEMORY = "pipeline:\n  - use: memory\n    embedder: false\n    mode: bm25\n    store_turns: true\n"
HI = [{"role": "user", "content": "hi"}]


def deep(n: int) -> Any:
    v: Any = "x"
    for _ in range(n):
        v = {"a": v}
    return v


# (case, body, the field the error must name)
CHAT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("deep-metadata", {"metadata": deep(256)}, "metadata"),
    ("deep-tools", {"tools": [deep(256)]}, "tools.0.a"),
    ("deep-extra-field", {"messages": [{"role": "user", "content": "hi", "x_extra": deep(256)}]}, "messages.0.x_extra"),
    ("deep-content-part", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                                        "x": deep(256)}]}]}, "messages.0.content.0.x"),
    ("surrogate-content", {"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages.0.content"),
    ("surrogate-part", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    ("surrogate-metadata", {"metadata": {"k": "\ud83d"}}, "metadata.k"),
    ("surrogate-key", {"metadata": {"\ud800": 1}}, "metadata"),
    ("surrogate-tools", {"tools": [{"type": "function", "function": {"name": "\ud800"}}]}, "tools.0.function.name"),
    ("surrogate-model", {"model": "m\ud800"}, "model"),
    ("nan-temperature", {"temperature": float("nan")}, "temperature"),
    ("inf-metadata", {"metadata": {"x": float("inf")}}, "metadata.x"),
    ("seed-over-int64", {"seed": 2**63}, "seed"),
    ("seed-under-int64", {"seed": -(2**63) - 1}, "seed"),
]


def _chat_body(user: str, extra: dict[str, Any], stream: bool = False) -> bytes:
    body = {"model": "m", "user": user, "messages": HI, **extra}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()  # json.dumps writes NaN / \ud800 escapes: valid-looking JSON


@pytest.mark.parametrize("stream", [False, True])
def test_http_chat_refuses_with_the_field_named_and_stores_nothing(make_mw: Any, stream: bool) -> None:
    mw = make_mw(MEMORY)
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        for i, (case, extra, field) in enumerate(CHAT_CASES):
            user = f"u{i}"
            r = client.post(url + "/v1/chat/completions", content=_chat_body(user, extra, stream),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (case, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["param"] == field, (case, err)
            assert field in err["message"] and "Traceback" not in r.text
            assert client.get(f"{url}/v1/users/{user}").status_code == 404, case  # no half-created user
        # The server still serves, and an honest request still learns (after-turn job ran and finished).
        ok = client.post(url + "/v1/chat/completions", json={"user": "ana", "messages": [
            {"role": "user", "content": "I live in Lisbon and my dog is called Rex."}], "stream": stream})
        assert ok.status_code == 200
        if stream:
            assert "[DONE]" in ok.text
        mw.drain()
        export = client.get(f"{url}/v1/users/ana")
        assert export.status_code == 200, export.text[:300]
    assert mw.backend.calls and all("\ud800" not in m.text for call in mw.backend.calls for m in call)
    assert len(mw.backend.calls) == 1  # no refused request reached the backend
    assert mw.store.claim_jobs(0.0, 99) == []  # no after-turn job left pending (none recorded for refusals)


FEEDBACK_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("nan-created_at", {"kind": "stated", "text": "brief", "created_at": float("nan")}, "created_at"),
    ("inf-created_at", {"kind": "stated", "text": "brief", "created_at": float("inf")}, "created_at"),
    ("surrogate-text", {"kind": "stated", "text": "brief \udc00"}, "text"),
    ("surrogate-id", {"kind": "stated", "text": "brief", "id": "fb-\ud800"}, "id"),
    ("surrogate-trace-id", {"kind": "rating", "prompt": "p", "response": "r", "rating": 1, "trace_id": "\ud800"},
     "trace_id"),
    ("surrogate-rejected", {"kind": "choice", "prompt": "p", "chosen": "a", "rejected": ["\ud800"]}, "rejected.0"),
]


def test_http_feedback_refuses_with_the_field_named_and_creates_no_user(make_mw: Any) -> None:
    mw = make_mw(MEMORY)
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        for i, (case, body, field) in enumerate(FEEDBACK_CASES):
            user = f"f{i}"
            r = client.post(url + "/v1/feedback", content=json.dumps({**body, "user": user}).encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (case, r.status_code, r.text[:300])
            assert r.json()["error"]["param"] == field, (case, r.text)
            assert client.get(f"{url}/v1/users/{user}").status_code == 404, case
            assert mw.store.list_feedback(user=user) == []


def test_python_api_raises_request_error_and_stores_nothing(make_mw: Any) -> None:
    mw = make_mw(MEMORY)
    for i, (case, extra, field) in enumerate(CHAT_CASES):
        user = f"p{i}"
        with pytest.raises(RequestError) as info:
            mw.chat({"user": user, "messages": HI, **{k: v for k, v in extra.items() if k != "seed"},
                     **({"params": {"seed": extra["seed"]}} if "seed" in extra else {})})
        assert info.value.field == ("params.seed" if field == "seed" else field), (case, info.value.field)
        assert not mw.store.has_user(user), case
    for i, (case, body, field) in enumerate(FEEDBACK_CASES):
        user = f"q{i}"
        with pytest.raises(RequestError) as info:
            mw.feedback({**body, "user": user})
        assert info.value.field == field, (case, info.value.field)
        assert not mw.store.has_user(user), case
        with pytest.raises(RequestError):  # keyword form too
            mw.feedback(**{**body, "user": user})
        assert not mw.store.has_user(user), case
    mw.drain()
    assert mw.backend.calls == []
