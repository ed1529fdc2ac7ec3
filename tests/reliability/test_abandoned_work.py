"""The model cap is a cap, and abandoned work stops (issue #17), with the real local model on loopback.

- ``backend.max_new_tokens`` bounds a client's ``max_tokens`` / ``max_completion_tokens`` (clamped,
  flagged ``clamped`` in the trace).
- A client that disconnects (SSE after its first chunk, or a JSON request it gave up on) stops the
  generation at the next step: the next user is served promptly. The abandoned turn's trace is kept
  with a ``cancelled`` flag and nothing is learned from it (no after-turn job, no memory).

Generation steps are counted with a forward hook on the real model: one forward per generated token.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from persona_mw.adapters.transformers import TransformersBackend
from persona_mw.server import create_app, serve_in_thread

pytestmark = pytest.mark.slow

MEMORY = "pipeline:\n  - use: memory\n    embedder: false\n    mode: bm25\n    store_turns: true\n"
LONG = [{"role": "user", "content": "Write a very long story about a dragon named Zorblax and a knight, "
                                    "with many details about every place they visit."}]
CAP = 160


@pytest.fixture(scope="module")
def backend() -> TransformersBackend:
    b = TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=CAP)
    b.model  # noqa: B018 - load now, not inside a timed request
    return b


@pytest.fixture
def forwards(backend: TransformersBackend) -> Iterator[list[int]]:
    count = [0]
    handle = backend.model.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    yield count
    handle.remove()


def _served_promptly(client: httpx.Client, url: str) -> float:
    t = time.perf_counter()
    r = client.post(url + "/v1/chat/completions",
                    json={"user": "bob", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text[:300]
    return time.perf_counter() - t


def _settled(count: list[int]) -> int:
    """The forward count once nothing runs any more (it must not keep climbing)."""
    seen = count[0]
    time.sleep(1.0)
    assert count[0] == seen, f"the model is still generating: {seen} -> {count[0]} forwards"
    return seen


def _abandoned_turn(mw: Any, user: str) -> None:
    mw.drain()
    exported = mw.export_user(user)
    flags = [f for t in exported["traces"] for f in t.get("flags") or []]
    assert any(f.startswith("cancelled:") for f in flags), flags  # the trace is kept, flagged
    assert not any("Zorblax" in m["text"] for m in exported["memories"]), exported["memories"]  # nothing learned
    assert mw.store.claim_jobs(0.0, 99) == []


def test_the_config_cap_bounds_what_a_client_asks(make_mw: Any, backend: TransformersBackend) -> None:
    small = TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=16)
    mw = make_mw(backend=small)
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=300) as client:
        for field in ("max_tokens", "max_completion_tokens"):
            r = client.post(url + "/v1/chat/completions", json={"user": "ana", "messages": LONG, field: 120})
            assert r.status_code == 200, r.text[:300]
            body = r.json()
            assert body["usage"]["completion_tokens"] <= 16, (field, body["usage"])
            assert body["choices"][0]["finish_reason"] == "length"
            assert "clamped: max_tokens 120 -> 16 (backend max_new_tokens)" in body["persona_trace"]["flags"]
        fewer = client.post(url + "/v1/chat/completions", json={"user": "ana", "messages": LONG, "max_tokens": 5})
        print(f"cap 16, asked 120: {body['usage']['completion_tokens']} tokens")
        assert fewer.json()["usage"]["completion_tokens"] <= 5  # asking fewer is honoured
        assert not any(f.startswith("clamped") for f in fewer.json()["persona_trace"]["flags"])


def test_sse_disconnect_stops_generation(make_mw: Any, backend: TransformersBackend, forwards: list[int]) -> None:
    mw = make_mw(MEMORY, backend=backend)
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=300) as client:
        _served_promptly(client, url)  # warm: prompt formatting, tokenizer, pipeline
        start = _settled(forwards)
        body = {"user": "ana", "messages": LONG, "stream": True, "max_tokens": CAP}
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                    break  # the first chunk with text: leave
        at_disconnect = forwards[0]
        waited = _served_promptly(client, url)
        end = _settled(forwards)
    print(f"sse: {end - at_disconnect} forwards after the disconnect, next request {waited:.1f}s")
    # The abandoned answer stopped within a few steps of the disconnect (not at CAP), and bob's 4
    # tokens (+ prefill) did not wait for it.
    assert end - at_disconnect <= 20, (start, at_disconnect, end)
    assert waited < 30, waited
    _abandoned_turn(mw, "ana")


def test_json_client_that_gives_up_stops_generation(make_mw: Any, backend: TransformersBackend,
                                                    forwards: list[int]) -> None:
    mw = make_mw(MEMORY, backend=backend)
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=300) as client:
        _served_promptly(client, url)
        start = _settled(forwards)
        parts = urlsplit(url)
        payload = json.dumps({"user": "ana", "messages": LONG, "max_tokens": CAP}).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            deadline = time.monotonic() + 120
            while forwards[0] < start + 4 and time.monotonic() < deadline:  # generating
                time.sleep(0.05)
            assert forwards[0] >= start + 4, "generation never started"
        at_disconnect = forwards[0]
        waited = _served_promptly(client, url)
        end = _settled(forwards)
    print(f"json: {end - at_disconnect} forwards after the disconnect, next request {waited:.1f}s")
    assert end - at_disconnect <= 20, (start, at_disconnect, end)
    assert waited < 30, waited
    _abandoned_turn(mw, "ana")
