"""One conversation through the entry points (HTTP server: chat completions, Anthropic Messages and OpenAI
Responses; litellm callback, wrapped OpenAI client, LangChain model) reaches the LLM as the same personalized prompt, with the same trace explanation, and
the post-call stages run after streamed answers on every path; the MCP server's personalized_prompt
tool hands an MCP client that same prompt. Then the same with the real local model."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import httpx
import openai
import pytest

import persona_mw
from persona_mw.adapters.litellm import import_litellm
from persona_mw.integrations.langchain import PersonaChatModel
from persona_mw.integrations.litellm import PersonaCallback
from persona_mw.server import create_app, explain_trace, serve_in_thread

from .conftest import last_prompt, make_personal
from .test_litellm import remove_callback

litellm = import_litellm()
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is a good name for a cat?"},
    {"role": "assistant", "content": "Whiskers."},
    {"role": "user", "content": "And one for a dog?"},
]


def run_all(mw: Any, llm_url: str, stream: bool, wait: Callable[[], None]) -> dict[str, tuple[str, str]]:
    """Ask through each entry point; returns {entry: (answer, trace id)}."""
    out: dict[str, tuple[str, str]] = {}
    with serve_in_thread(create_app(mw)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        if stream:
            chunks = list(c.chat.completions.create(model="m", messages=CONVERSATION, user="ana", stream=True))
            out["http"] = ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                           chunks[-1].model_extra["persona_trace"]["id"])
        else:
            r = c.chat.completions.create(model="m", messages=CONVERSATION, user="ana")
            out["http"] = (r.choices[0].message.content, r.model_extra["persona_trace"]["id"])
        explained = httpx.get(f"{url}/v1/traces/{out['http'][1]}").json()
        assert explained["changed_by"] and explained["items_used"]
        wait()
        out["messages"] = ask_messages(url, stream)
        wait()
        out["responses"] = ask_responses(url, stream)
    wait()

    cb = PersonaCallback(mw)
    litellm.callbacks = [cb]
    try:
        kw = dict(model="openai/m", api_base=llm_url + "/v1", api_key="x", max_retries=0, timeout=300, user="ana")
        r = litellm.completion(messages=CONVERSATION, stream=stream, **kw)
        text = "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content
        for _ in range(200):
            if cb.completed:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert cb.completed == 1
        out["litellm"] = (text, "")
    finally:
        remove_callback(cb)
    wait()

    client = persona_mw.wrap(openai.OpenAI(base_url=llm_url + "/v1", api_key="x", max_retries=0, timeout=300), mw)
    r = client.chat.completions.create(model="m", messages=CONVERSATION, user="ana", stream=stream)
    if stream:
        out["openai"] = ("".join(ch.choices[0].delta.content or "" for ch in r if ch.choices), r.persona_trace_id)
    else:
        out["openai"] = (r.choices[0].message.content, r.persona_trace_id)
    wait()

    model = PersonaChatModel(middleware=mw, user="ana")
    if stream:
        chunks = list(model.stream(CONVERSATION))
        tid = next(ch.response_metadata["persona_trace_id"] for ch in chunks
                   if "persona_trace_id" in ch.response_metadata)
        out["langchain"] = ("".join(str(ch.content) for ch in chunks), tid)
    else:
        msg = model.invoke(CONVERSATION)
        out["langchain"] = (str(msg.content), msg.response_metadata["persona_trace_id"])
    wait()
    return out


def ask_messages(url: str, stream: bool) -> tuple[str, str]:
    """The conversation through ``POST /v1/messages`` with the anthropic SDK (the system prompt as ``system``)."""
    import anthropic

    c = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=300)
    kw: dict[str, Any] = dict(model="m", max_tokens=64, system=CONVERSATION[0]["content"],
                              messages=CONVERSATION[1:], metadata={"user_id": "ana"})
    if stream:
        with c.messages.stream(**kw) as s:
            text = "".join(s.text_stream)
            return text, s.response.headers["x-persona-trace-id"]
    r = c.messages.create(**kw)
    return r.content[0].text, r.model_extra["persona_trace"]["id"]  # type: ignore[union-attr,index]


def ask_responses(url: str, stream: bool) -> tuple[str, str]:
    """The conversation through ``POST /v1/responses`` with the openai SDK."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    if stream:
        events = list(c.responses.create(model="m", input=CONVERSATION, user="ana", stream=True))  # type: ignore[arg-type]
        done = events[-1].response  # type: ignore[union-attr]
        return done.output_text, done.model_extra["persona_trace"]["id"]
    r = c.responses.create(model="m", input=CONVERSATION, user="ana")  # type: ignore[arg-type]
    return r.output_text, r.model_extra["persona_trace"]["id"]


def mcp_prompt(mw: Any, conversation: list[dict[str, str]], user: str = "ana") -> list[tuple[str, str]]:
    """The messages the MCP ``personalized_prompt`` tool returns, asked with the SDK's client over HTTP."""
    pytest.importorskip("mcp", reason="the [mcp] extra is not installed")
    from mcp import Client

    from persona_mw.mcp_server import McpAccess, mcp_http_app

    async def ask(url: str) -> list[tuple[str, str]]:
        async with Client(url + "/mcp") as c:
            r = await c.call_tool("personalized_prompt", {"user": user, "messages": conversation})
            assert not r.is_error, r.content
            return [(m["role"], m["content"]) for m in r.structured_content["messages"]]

    with serve_in_thread(mcp_http_app(McpAccess(mw))) as url:
        return asyncio.run(ask(url))


def explanation(mw: Any, trace_id: str) -> dict[str, Any]:
    e = explain_trace(mw.trace(trace_id))
    return {"granularity": e["granularity"], "items_used": e["items_used"],
            "changed_by": [(s["plugin"], s["hook"]) for s in e["changed_by"]]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_four_entry_points_same_prompt(store_url: Any, upstream: Any, stream: bool) -> None:
    from .conftest import AfterTurnRecorder
    from persona_mw.testing import registered

    mw = make_personal(store_url)
    rec = AfterTurnRecorder()
    llm_url, llm = upstream
    prompts: dict[str, Any] = {}

    def wait() -> None:
        mw.drain()

    try:
        with registered(mw, rec, name="rec"):
            # capture each prompt right after its call
            calls_before = {"mw": len(mw.backend.calls), "llm": len(llm.calls)}
            out = run_all(mw, llm_url, stream, wait)
        prompts["http"] = [(m.role, m.text) for m in mw.backend.calls[calls_before["mw"]]]
        prompts["messages"] = [(m.role, m.text) for m in mw.backend.calls[calls_before["mw"] + 1]]
        prompts["responses"] = [(m.role, m.text) for m in mw.backend.calls[calls_before["mw"] + 2]]
        prompts["langchain"] = [(m.role, m.text) for m in mw.backend.calls[-1]]
        prompts["litellm"] = [(m.role, m.text) for m in llm.calls[calls_before["llm"]]]
        prompts["openai"] = last_prompt(llm)
        first = prompts["http"]
        assert "Answer like a pirate." in first[0][1] and first[-1] == ("user", "And one for a dog?")
        prompts["mcp"] = mcp_prompt(mw, CONVERSATION)
        assert all(p == first for p in prompts.values()), prompts
        # every answer reached the post-call stage, streamed or not
        assert [s[1] for s in rec.seen] == [a for a, _ in out.values()]
        assert all(a == "And one for a dog?" for a, _ in out.values())  # the echo backend
        # and the traces explain them identically
        traces = [s[2] for s in rec.seen]
        explained = [explanation(mw, t) for t in traces]
        assert all(e == explained[0] for e in explained) and explained[0]["changed_by"]
    finally:
        mw.close()


@pytest.mark.slow
def test_four_entry_points_with_the_local_model(store_url: Any, local_backend: Any) -> None:
    """The real SmolLM2 behind each entry point (the LLM server for litellm/openai serves it too)."""
    from persona_mw import Middleware, parse_config

    mw = make_personal(store_url, backend=local_backend)
    plain_cfg = parse_config("{}")
    plain_cfg.store.path = store_url()
    llm_mw = Middleware(plain_cfg, backend=local_backend, autoload=False)
    try:
        with serve_in_thread(create_app(llm_mw)) as llm_url:
            # the plain server needs a user: the header reaches it through both clients
            # streamed: the harder path (post-call after the last chunk); plain calls use the same code
            out = run_all_local(mw, llm_url, True)
            assert all(text.strip() for text in out.values()), out
    finally:
        mw.close()
        llm_mw.close()


def run_all_local(mw: Any, llm_url: str, stream: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    msgs = [{"role": "user", "content": "Name a fruit."}]
    with serve_in_thread(create_app(mw)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="m", messages=msgs, user="ana", stream=stream, max_tokens=8)
        out["http"] = ("".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) if stream
                       else r.choices[0].message.content)
    hdr = {"X-Persona-User": "llm-client"}
    cb = PersonaCallback(mw)
    litellm.callbacks = [cb]
    try:
        r = litellm.completion(model="openai/m", api_base=llm_url + "/v1", api_key="x", messages=msgs, user="ana",
                               extra_headers=hdr, stream=stream, max_tokens=8, timeout=300)
        out["litellm"] = ("".join(ch.choices[0].delta.content or "" for ch in r) if stream
                          else r.choices[0].message.content)
        for _ in range(200):
            if cb.completed:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert cb.completed == 1
    finally:
        remove_callback(cb)
    client = persona_mw.wrap(openai.OpenAI(base_url=llm_url + "/v1", api_key="x", max_retries=0, timeout=300), mw)
    r = client.chat.completions.create(model="m", messages=msgs, user="ana", stream=stream, max_tokens=8,
                                       extra_headers=hdr)
    out["openai"] = ("".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) if stream
                     else r.choices[0].message.content)
    model = PersonaChatModel(middleware=mw, user="ana", max_tokens=8)
    out["langchain"] = ("".join(str(ch.content) for ch in model.stream(msgs)) if stream
                        else str(model.invoke(msgs).content))
    mw.drain()
    return out
