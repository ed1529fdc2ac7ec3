"""The litellm backend as a real client of a real persona-mw server on loopback (which itself runs
a scripted backend): generation, n candidates, streaming, and the mapping of failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from persona_mw import BackendError, BackendTimeout, BackendUnavailable, ConfigError, Middleware
from persona_mw.adapters.base import Backend
from persona_mw.adapters.litellm import LiteLLMBackend, create
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Candidate, Decoding, GenerationParams, Message

REPO = Path(__file__).resolve().parents[2]
ASK = [Message(role="user", content="tell me about green tea")]
RELAY = {"X-Persona-User": "relay"}


@dataclass
class OneChoiceBackend(ScriptedBackend):
    """A provider that ignores ``n`` and always answers with one choice."""

    async def generate(self, messages: list[Message], *, n: int = 1, params: GenerationParams | None = None,
                       decoding: list[Decoding] | None = None) -> list[Candidate]:
        (cand,) = await super().generate(messages, n=1, params=params, decoding=decoding)
        return [cand.model_copy(update={"text": f"{cand.text} #{len(self.calls)}"})]


@contextlib.contextmanager
def inner_server(store: str, backend: Any) -> Iterator[str]:
    """A persona-mw server on loopback answering with ``backend``; yields its ``/v1`` base URL."""
    mw = Middleware(store=store, backend=backend, autoload=False)
    try:
        with serve_in_thread(create_app(mw)) as url:
            yield url + "/v1"
    finally:
        mw.close()


@pytest.fixture(scope="module")
def api_base(session_store_url: Any) -> Iterator[str]:
    with inner_server(session_store_url(), ScriptedBackend()) as base:
        yield base


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(backend: LiteLLMBackend, messages: list[Message]) -> list[str]:
    return [piece async for piece in backend.stream(messages)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_is_a_black_box_backend(api_base: str) -> None:
    backend = LiteLLMBackend("openai/inner", api_base=api_base, api_key="x", max_context=8192)
    assert isinstance(backend, Backend)
    assert backend.capabilities.white_box is False and backend.capabilities.max_context == 8192
    assert backend.count_tokens("four score and seven") > 0


def test_generate_through_a_persona_server(api_base: str) -> None:
    backend = LiteLLMBackend("openai/inner", api_base=api_base, api_key="x", extra_headers=RELAY)
    (cand,) = run(backend.generate(ASK, params=GenerationParams(max_tokens=20, temperature=0.2, stop=["\n"])))
    assert cand.text == "tell me about green tea" and cand.index == 0 and cand.finish_reason == "stop"
    # The user can travel in the body instead of a header.
    by_body = LiteLLMBackend("openai/inner", api_base=api_base, api_key="x", extra_body={"user": "relay"})
    assert run(by_body.generate(ASK))[0].text == "tell me about green tea"


def test_n_candidates_in_one_call(api_base: str) -> None:
    backend = LiteLLMBackend("openai/inner", api_base=api_base, api_key="x", extra_headers=RELAY)
    cands = run(backend.generate(ASK, n=3))
    assert [c.index for c in cands] == [0, 1, 2]
    assert len({c.text for c in cands}) == 3
    assert len({c.meta["response_id"] for c in cands}) == 1


def test_missing_choices_are_filled_by_further_calls(store_url: Any) -> None:
    provider = OneChoiceBackend()
    with inner_server(store_url(), provider) as base:
        backend = LiteLLMBackend("openai/inner", api_base=base, api_key="x", extra_headers=RELAY)
        cands = run(backend.generate(ASK, n=3))
    assert [c.index for c in cands] == [0, 1, 2]
    assert len({c.text for c in cands}) == 3
    assert len(provider.calls) == 3


def test_stream(api_base: str) -> None:
    backend = LiteLLMBackend("openai/inner", api_base=api_base, api_key="x", extra_headers=RELAY)
    pieces = run(collect(backend, ASK))
    assert len(pieces) > 1 and "".join(pieces) == "tell me about green tea"


def test_middleware_over_litellm_over_persona_server(api_base: str, store_url: Any) -> None:
    """An outer Middleware (configured in YAML) whose backend is litellm talking to an inner server."""
    yaml_text = f"""
backend:
  type: litellm
  model: openai/inner
  api_base: {api_base}
  api_key: x
  timeout: 30
  extra_headers: {{X-Persona-User: relay}}
store: {{path: {json.dumps(store_url())}}}
autoload_plugins: false
"""
    mw = Middleware.from_yaml_string(yaml_text)
    try:
        assert isinstance(mw.backend, LiteLLMBackend)
        resp = mw.chat(user="ana", messages=[{"role": "user", "content": "hello from outside"}])
        assert resp.text == "hello from outside"
        chunks = list(mw.stream(user="ana", messages=[{"role": "user", "content": "streamed from outside"}]))
        assert "".join(c.delta for c in chunks) == "streamed from outside"
        assert chunks[-1].done and chunks[-1].trace is not None
        assert sum(1 for c in chunks if c.delta) > 1
    finally:
        mw.close()


# --------------------------------------------------------------------------- failures


def test_closed_port_is_unavailable_quickly() -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    backend = LiteLLMBackend("openai/nobody", api_base=base, api_key="x", timeout=20)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        run(backend.generate(ASK))
    assert time.monotonic() - t0 < 10
    assert "openai/nobody" in str(info.value) and base in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(BackendUnavailable):
        run(collect(backend, ASK))


def test_slow_server_times_out(store_url: Any) -> None:
    with inner_server(store_url(), ScriptedBackend(delay=1.5)) as base:
        backend = LiteLLMBackend("openai/inner", api_base=base, api_key="x", timeout=0.3, extra_headers=RELAY)
        with pytest.raises(BackendTimeout) as info:
            run(backend.generate(ASK))
    assert "openai/inner" in str(info.value) and info.value.__cause__ is not None


def test_server_errors_are_unavailable(store_url: Any) -> None:
    with inner_server(store_url(), ScriptedBackend(fail=BackendUnavailable("upstream down"))) as base:
        backend = LiteLLMBackend("openai/inner", api_base=base, api_key="x", extra_headers=RELAY)
        with pytest.raises(BackendUnavailable, match="upstream down"):
            run(backend.generate(ASK))
        with pytest.raises(BackendUnavailable):
            run(collect(backend, ASK))


def test_rejected_request_is_a_backend_error(api_base: str) -> None:
    # No user header: the inner server answers 400, which is neither a timeout nor an outage.
    backend = LiteLLMBackend("openai/inner", api_base=api_base, api_key="x")
    with pytest.raises(BackendError) as info:
        run(backend.generate(ASK))
    assert type(info.value) is BackendError
    assert "missing user" in str(info.value) and api_base in str(info.value)


def test_create_validates_settings() -> None:
    backend = create(model="openai/x", api_base="http://127.0.0.1:1/v1", timeout=5)
    assert isinstance(backend, LiteLLMBackend) and backend.timeout == 5
    with pytest.raises(ConfigError, match="api_bas") as info:
        create(model="openai/x", api_bas="http://127.0.0.1:1/v1")
    assert "api_base" in str(info.value)
    with pytest.raises(ConfigError, match="model"):
        create(api_base="http://127.0.0.1:1/v1")


def test_importing_the_adapter_does_not_import_litellm() -> None:
    code = ("import sys, persona_mw.adapters.litellm as a; "
            "a.create(model='openai/x'); "
            "assert 'litellm' not in sys.modules, 'litellm imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
