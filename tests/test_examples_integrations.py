"""Every integration example runs against the embedded local model, on loopback: the openai SDK and
litellm as clients of a real `persona-mw serve` process (with an API key), the litellm callback
in-process, a LangChain chain turn, and a LangGraph tool-using agent (against a tool-calling server on
loopback). The LiteLLM proxy example runs as a real proxy process in tests/integrations/test_litellm_proxy.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
KEY = "example-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, session_store_url) -> Iterator[str]:
    """`persona-mw serve` as a real process, with a config file, a tenant key and the local model."""
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "pipeline.yaml"
    config.write_text("backend:\n  type: transformers\n  max_new_tokens: 16\n"
                      "pipeline:\n  - use: stated\n    placement: user_suffix\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona_mw.cli", "serve", "--config", str(config), "--store", session_store_url(),
         "--port", str(port), "--api-key", f"acme={KEY}", "--max-body-bytes", "65536"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"persona-mw serve did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def run(script: str, *args: str) -> str:
    # the in-process examples (litellm_callback, langchain_agent, langgraph_agent) take no --store: they
    # keep the embedded default, a SQLite file in a temp folder, under any PERSONA_MW_TEST_STORE
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_openai_sdk_example_against_serve(served: str) -> None:
    assert httpx.get(served + "/v1/models").status_code == 401  # the key is required
    out = run("openai_sdk_client.py", "--base-url", served, "--api-key", KEY)
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["answer"].strip() and lines["streamed"].strip()
    assert "stated" in lines["granularity"]  # "... | changed by: ['stated']"


@pytest.mark.slow
def test_litellm_client_example_against_serve(served: str) -> None:
    out = run("litellm_client.py", "--base-url", served, "--api-key", KEY)  # litellm sends it as a bearer key
    assert out.split("answer:", 1)[1].split("\n", 1)[0].strip()
    assert out.split("streamed:", 1)[1].strip()


@pytest.mark.slow
def test_litellm_callback_example() -> None:
    out = run("litellm_callback.py", "--max-new-tokens", "16")
    assert "post-call stages run: 2" in out
    assert out.split("sync:", 1)[1].split("\n", 1)[0].strip()


@pytest.mark.slow
def test_langchain_example() -> None:
    out = run("langchain_agent.py", "--max-new-tokens", "16")
    assert out.split("answer:", 1)[1].split("\n", 1)[0].strip()


def test_langgraph_agent_example() -> None:
    """A real LangGraph agent (StateGraph + ToolNode) over PersonaChatModel, its litellm backend calling a
    tool-capable OpenAI-compatible server on loopback: the tool is called, its result answered, every
    model call carried the user's preference, and structured output parses."""
    out = run("langgraph_agent.py")
    assert "ai:  get_weather({'city': 'Lisbon'})" in out
    assert "tool: 18 degrees C and sunny in Lisbon" in out
    assert "answer: get_weather says: 18 degrees C and sunny in Lisbon" in out
    assert 'structured: {"destination":"Porto","days":5}' in out
    assert "model calls: 3, with the preference in the system prompt: 3" in out
