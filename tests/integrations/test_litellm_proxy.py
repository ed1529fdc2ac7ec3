"""The real LiteLLM proxy (`litellm --config examples/litellm_proxy/config.yaml`, a process on loopback)
with persona-mw's callback, in front of an OpenAI-compatible upstream on loopback that records every
request, and the openai SDK as the client: run as the example's header documents, offline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from persona_mw import Middleware, parse_config
from persona_mw.server import serve_in_thread
from persona_mw.testing import tool_calling_llm

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "litellm_proxy"
KEY = "sk-persona-test-" + "0123456789abcdef" * 2
PREF = "Answer like a pirate."
LITELLM = shutil.which("litellm", path=str(Path(sys.executable).parent)) or shutil.which("litellm")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(LITELLM is None, reason="the litellm proxy CLI is not installed ([proxy] extra)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, session_store_url: Any) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("proxy")
    # The example's pipeline keeps its store in persona.db where the proxy runs; the test's copy of it
    # names the test store instead (a SQLite file, or a Postgres schema): seed ana's preference there.
    store = session_store_url()
    example = (EXAMPLE / "pipeline.yaml").read_text()
    pipeline = example.replace("store:\n  path: persona.db", f"store:\n  path: {json.dumps(store)}")
    assert pipeline != example
    (tmp / "pipeline.yaml").write_text(pipeline)
    cfg = parse_config(pipeline)
    assert cfg.store.path == store
    with Middleware(cfg, autoload=False) as mw:
        mw.feedback(kind="stated", user="ana", text=PREF)
    app = tool_calling_llm()
    with serve_in_thread(app) as upstream:
        port = free_port()
        env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "UPSTREAM_API_BASE": upstream + "/v1",
               "UPSTREAM_API_KEY": "none", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "PERSONA_MW_CONFIG": str(tmp / "pipeline.yaml"), "PYTHONPATH": str(ROOT)}
        env.pop("PERSONA_MW_REQUIRE_USER", None)
        log = (tmp / "proxy.log").open("w")
        started = time.monotonic()
        proc = subprocess.Popen([LITELLM, "--config", str(EXAMPLE / "config.yaml"), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() - started > 180:
                    raise RuntimeError("litellm proxy did not start:\n" + (tmp / "proxy.log").read_text()[-4000:])
                time.sleep(0.3)
            yield {"url": url, "requests": app.state.requests, "headers": app.state.headers, "store": store,
                   "startup_s": time.monotonic() - started, "log": tmp / "proxy.log"}
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


def client(proxy: dict[str, Any], key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def stored_trace(proxy: dict[str, Any], trace_id: str) -> dict[str, Any] | None:
    cfg = parse_config((EXAMPLE / "pipeline.yaml").read_text())
    cfg.store.path = proxy["store"]
    with Middleware(cfg, autoload=False) as mw:
        for _ in range(100):  # the post-call stages store it after the answer
            try:
                return mw.trace(trace_id)
            except Exception:
                time.sleep(0.1)
    return None


def test_user_field_personalizes_and_the_client_sees_persona_mws_trace(proxy: dict[str, Any]) -> None:
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "hi there"}], user="ana")
    r = raw.parse()
    sent = proxy["requests"][-1]
    # user_suffix: the preference follows the user's own words in the prompt the upstream got.
    assert sent["messages"][-1]["role"] == "user"
    assert sent["messages"][-1]["content"].startswith("hi there\n\n(") and PREF in sent["messages"][-1]["content"]
    assert proxy["headers"][-1]["x-persona-user"] == "ana"  # a persona-mw server upstream needs a user
    assert r.choices[0].message.content == sent["messages"][-1]["content"]  # the stand-in echoes its prompt
    trace_id = raw.headers["x-persona-trace-id"]
    body = r.model_dump()
    assert body["persona_trace"]["id"] == trace_id and body["persona_trace"]["user"] == "ana"
    assert any(s["plugin"] == "stated" and s["changed"] for s in body["persona_trace"]["steps"])
    stored = stored_trace(proxy, trace_id)
    assert stored is not None and stored["user"] == "ana"


def test_header_user_and_streaming(proxy: dict[str, Any]) -> None:
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "stream me"}], stream=True,
        extra_headers={"X-Persona-User": "ana"})
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    sent = proxy["requests"][-1]
    assert PREF in sent["messages"][-1]["content"] and sent["stream"] is True
    assert proxy["headers"][-1]["x-persona-user"] == "ana"
    assert text == sent["messages"][-1]["content"]
    assert raw.headers["x-persona-trace-id"]


def test_no_user_is_a_clear_400_and_nothing_reaches_the_upstream(proxy: dict[str, Any]) -> None:
    before = len(proxy["requests"])
    with pytest.raises(openai.BadRequestError) as err:
        client(proxy).chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}])
    assert "no end user to personalize for" in str(err.value) and "'user' field" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # an invalid user id names the field
        client(proxy).chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}],
                                              user="bad id with spaces")
    assert "user" in str(err.value)
    assert len(proxy["requests"]) == before
    assert "Traceback" not in str(err.value)


def test_the_master_key_is_required(proxy: dict[str, Any]) -> None:
    before = len(proxy["requests"])
    with pytest.raises(openai.APIStatusError) as err:  # no DB: litellm answers 400 "No connected db" for other keys
        client(proxy, key="sk-wrong").chat.completions.create(
            model="local", messages=[{"role": "user", "content": "hi"}], user="ana")
    assert err.value.status_code in (400, 401) and len(proxy["requests"]) == before
