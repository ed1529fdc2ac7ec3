"""``PersonaChatModel``: a LangChain chat model over the middleware, in a chain, sync/async/streaming."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from persona_mw import RequestError
from persona_mw.integrations.langchain import PersonaChatModel

from .conftest import PREF


def test_chain_turn_sync_async_and_streaming(personal: Any) -> None:
    mw, rec = personal
    model = PersonaChatModel(middleware=mw, user="ana")
    chain = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")]) | model \
        | StrOutputParser()
    assert chain.invoke({"question": "hi there"}) == "hi there"
    prompt = mw.backend.calls[-1]
    assert prompt[0].role == "system" and PREF in prompt[0].text and "Be brief." in prompt[0].text
    assert "".join(chain.stream({"question": "one two three"})) == "one two three"

    async def amain() -> tuple[str, str]:
        a = await chain.ainvoke({"question": "async hi"})
        b = "".join([p async for p in chain.astream({"question": "async stream"})])
        return a, b

    assert asyncio.run(amain()) == ("async hi", "async stream")
    mw.drain()
    assert [s[1] for s in rec.seen] == ["hi there", "one two three", "async hi", "async stream"]


def test_user_per_call_and_trace_metadata(personal: Any) -> None:
    mw, _ = personal
    model = PersonaChatModel(middleware=mw)
    with pytest.raises(RequestError, match="needs a user"):
        model.invoke("hi")
    msg = model.invoke("hi", config={"metadata": {"persona_user": "ana"}})
    assert mw.trace(msg.response_metadata["persona_trace_id"])["user"] == "ana"
    msg = model.invoke("hi", user="ben")
    assert mw.trace(msg.response_metadata["persona_trace_id"])["user"] == "ben"
    chunks = list(model.stream("a b", user="ana"))
    ids = [c.response_metadata["persona_trace_id"] for c in chunks if "persona_trace_id" in c.response_metadata]
    assert len(ids) == 1 and mw.trace(ids[0])["user"] == "ana"


@pytest.fixture(scope="module")
def tool_llm() -> Any:
    """A real tool-calling OpenAI-compatible server on loopback (deterministic, see ``tool_calling_llm``)."""
    from persona_mw.server import serve_in_thread
    from persona_mw.testing import tool_calling_llm

    app = tool_calling_llm()
    with serve_in_thread(app) as url:
        yield url + "/v1", app.state.requests


def litellm_mw(store_url: Any, base: str) -> Any:
    from persona_mw import Middleware, parse_config

    cfg = parse_config(f"backend: {{type: litellm, model: openai/tool-llm, api_base: '{base}', api_key: x, "
                       "max_retries: 0}\npipeline:\n  - use: stated\n    placement: system\n")
    cfg.store.path = store_url()
    mw = Middleware(cfg, autoload=False)
    mw.feedback(kind="stated", user="ana", text=PREF)
    return mw


def test_bind_tools_calls_the_backends_tool_calling(store_url: Any, tool_llm: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    base, requests = tool_llm
    with litellm_mw(store_url, base) as mw:
        model = PersonaChatModel(middleware=mw, user="ana").bind_tools([get_weather], tool_choice="get_weather")
        msg = model.invoke("What's the weather in Lisbon?")
        assert msg.tool_calls == [{"name": "get_weather", "args": {"city": "Lisbon"}, "id": msg.tool_calls[0]["id"],
                                   "type": "tool_call"}]
        sent = requests[-1]
        assert sent["tools"][0]["function"]["name"] == "get_weather"
        assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        assert sent["messages"][0]["role"] == "system" and PREF in sent["messages"][0]["content"]
        assert mw.trace(msg.response_metadata["persona_trace_id"])["user"] == "ana"
        # The tool result goes back (assistant tool_calls + tool message pass through the pipeline).
        call = msg.tool_calls[0]
        done = model.invoke([HumanMessage("What's the weather in Lisbon?"), msg,
                             ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])])
        assert done.content == "get_weather says: sunny in Lisbon" and not done.tool_calls
        assert [m["role"] for m in requests[-1]["messages"]] == ["system", "user", "assistant", "tool"]
        assert requests[-1]["messages"][2]["tool_calls"][0]["id"] == call["id"]
        # Streaming with tools bound: the whole answer, tool call included, in one chunk (LangChain adds
        # an empty closing one).
        chunks = list(model.stream("Weather in Porto?"))
        assert [len(c.tool_call_chunks) for c in chunks] == [1, 0][:len(chunks)]
        merged = chunks[0]
        for c in chunks[1:]:
            merged += c
        assert merged.tool_calls[0]["args"] == {"city": "Porto"}
        assert asyncio.run(model.ainvoke("Weather in Faro?")).tool_calls[0]["args"] == {"city": "Faro"}


def test_with_structured_output_through_a_forced_tool_call(store_url: Any, tool_llm: Any) -> None:
    from pydantic import BaseModel

    class Trip(BaseModel):
        destination: str
        days: int

    base, requests = tool_llm
    with litellm_mw(store_url, base) as mw:
        trip = PersonaChatModel(middleware=mw, user="ana").with_structured_output(Trip).invoke("Three days in Porto")
        assert trip == Trip(destination="Porto", days=4)  # the stand-in fills ints with the word count
        assert requests[-1]["tool_choice"] == "required" and requests[-1]["tools"][0]["function"]["name"] == "Trip"
        raw = PersonaChatModel(middleware=mw, user="ana").with_structured_output(Trip, include_raw=True).invoke("Go")
        assert raw["parsing_error"] is None and raw["raw"].response_metadata["persona_trace_id"]


def test_backend_without_tool_calling_refuses_clearly(personal: Any) -> None:
    from persona_mw import ConfigError

    mw, _ = personal  # a backend whose capabilities say no tools (as the local transformers model's)
    model = PersonaChatModel(middleware=mw, user="ana")
    with pytest.raises(ConfigError, match="bind_tools: the middleware's backend .* has no tool calling"):
        model.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(ConfigError, match="with_structured_output: .* has no tool calling"):
        model.with_structured_output({"title": "T", "type": "object", "properties": {}})
    assert model.invoke("hi").content == "hi"  # the plain model still works
