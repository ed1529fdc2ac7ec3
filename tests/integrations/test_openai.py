"""``persona_mw.wrap(openai_client)``: sync and async clients, plain and streamed, against a loopback server."""

from __future__ import annotations

import asyncio
from typing import Any

import openai

import persona_mw

from .conftest import SYSTEM_BLOCK, last_prompt

HI = [{"role": "user", "content": "hi there"}]
SYSTEM = ("system", SYSTEM_BLOCK)


def test_wrap_is_lazy_and_exported() -> None:
    from persona_mw.integrations.openai import wrap

    assert persona_mw.wrap is wrap and "wrap" in persona_mw.__all__


def test_sync_client(upstream: Any, personal: Any) -> None:
    mw, rec = personal
    url, backend = upstream
    client = persona_mw.wrap(openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), mw)
    r = client.chat.completions.create(model="m", messages=HI, user="ana")
    assert r.choices[0].message.content == "hi there"
    assert last_prompt(backend)[0] == SYSTEM
    mw.drain()
    assert rec.seen[-1] == ("ana", "hi there", r.persona_trace_id)
    assert mw.trace(r.persona_trace_id)["granularity"]

    stream = client.chat.completions.create(model="m", messages=HI, user="ana", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hi there"
    mw.drain()
    assert rec.seen[-1][:2] == ("ana", "hi there") and len(rec.seen) == 2

    r = client.chat.completions.create(model="m", messages=HI, user="ana", n=2)
    assert len(r.choices) == 2

    # no user: untouched
    client.chat.completions.create(model="m", messages=HI)
    assert last_prompt(backend) == [("user", "hi there")]
    assert client.models is not None  # everything else is the client's own


def test_stream_abandoned_early_still_runs_post_call(upstream: Any, personal: Any) -> None:
    mw, rec = personal
    client = persona_mw.wrap(openai.OpenAI(base_url=upstream[0] + "/v1", api_key="x", max_retries=0), mw)
    long = [{"role": "user", "content": "one two three four"}]
    with client.chat.completions.create(model="m", messages=long, user="ana", stream=True) as stream:
        for chunk in stream:
            break
    mw.drain()
    assert rec.seen and rec.seen[-1][0] == "ana"
    assert "stream_incomplete" in mw.trace(stream.persona_trace_id)["flags"]


def test_async_client(upstream: Any, personal: Any) -> None:
    mw, rec = personal
    url, backend = upstream

    async def main() -> tuple[str, str]:
        client = persona_mw.wrap(openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0), mw)
        r = await client.chat.completions.create(model="m", messages=HI, user="ana")
        stream = await client.chat.completions.create(model="m", messages=HI, user="ana", stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return r.choices[0].message.content, text

    assert asyncio.run(main()) == ("hi there", "hi there")
    assert last_prompt(backend)[0] == SYSTEM
    mw.drain()
    assert [s[:2] for s in rec.seen] == [("ana", "hi there")] * 2


def test_wrap_import_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, persona_mw; persona_mw.wrap; import persona_mw.server, persona_mw.tenancy; "
            "bad = [m for m in ('openai', 'litellm', 'fastapi', 'torch', 'langchain_core') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
