"""5xx answers never name the upstream (issue #17): a failing litellm backend's api_base, host, port and
api key stay in the server log, out of the 502/504 bodies clients see (JSON and SSE alike)."""

from __future__ import annotations

import logging
import socket
from typing import Any, Iterator

import httpx
import pytest

from persona_mw import Middleware, parse_config
from persona_mw.server import create_app, serve_in_thread

from .faulty_llm import faulty_app

pytest.importorskip("litellm")

KEY = "sk-test-4f9a1c2e7b"


@pytest.fixture(scope="module")
def faulty() -> Iterator[str]:
    with serve_in_thread(faulty_app()) as url:
        yield url + "/v1"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mw(store_url: Any, api: str, model: str, policy: str = "{retries: 0}") -> Middleware:
    cfg = parse_config(f"""
backend: {{type: litellm, model: openai/{model}, api_base: "{api}", api_key: {KEY}, timeout: 10}}
resilience:
  backend: {policy}
""")
    cfg.store.path = store_url()
    return Middleware(cfg, autoload=False)


@pytest.mark.parametrize("model,api,status", [
    ("e500", None, 502), ("e503", None, 502), ("malformed", None, 502), ("slow", None, 504),
    ("ok", "refused", 502),
])
def test_5xx_bodies_do_not_name_the_upstream(store_url: Any, faulty: str, caplog: Any, model: str,
                                             api: str | None, status: int) -> None:
    base = faulty if api is None else f"http://127.0.0.1:{_closed_port()}/v1"
    host_port = base.split("//", 1)[1].split("/", 1)[0]
    policy = "{retries: 0, timeout_s: 0.5}" if model == "slow" else "{retries: 0}"
    with _mw(store_url, base, model, policy) as mw, serve_in_thread(create_app(mw)) as url, \
            httpx.Client(timeout=30) as client, caplog.at_level(logging.WARNING):
        for stream in (False, True):
            r = client.post(url + "/v1/chat/completions", json={
                "user": "ana", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            if stream and model == "malformed":  # litellm reads the non-SSE body as an empty stream
                assert r.status_code == 200 and "[DONE]" in r.text
            else:
                assert r.status_code == status, (stream, r.status_code, r.text[:300])
                assert r.json()["error"]["message"] and "Traceback" not in r.text
            for secret in (base, host_port, KEY, "127.0.0.1"):
                assert secret not in r.text, (stream, secret, r.text[:400])
    # The operator still sees where it failed: the full error goes to the server log.
    if model != "slow":
        assert any(host_port in rec.getMessage() for rec in caplog.records), [r.getMessage() for r in caplog.records]


def test_scrub_removes_urls_keys_and_configured_values() -> None:
    from persona_mw.openai_wire import scrub

    text = ("litellm backend model='openai/x' api_base=https://llm.internal.example:8443/v1 failed "
            "(APIError: Bearer sk-abc123 rejected at llm.internal.example:8443; api_key=sk-zzz)")
    out = scrub(text, ["llm.internal.example:8443", "llm.internal.example"])
    assert "internal" not in out and "sk-abc123" not in out and "sk-zzz" not in out and "8443" not in out
    assert out.startswith("litellm backend model='openai/x' api_base=<redacted>")
