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
