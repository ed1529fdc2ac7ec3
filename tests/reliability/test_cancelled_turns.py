"""What a cancelled turn keeps (issue #17), fast, on the scripted backend over real loopback HTTP: the
trace with a ``cancelled`` flag; no after-turn job, no memory. (Generation stopping on the real local
model is in test_abandoned_work.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend

MEMORY = "pipeline:\n  - use: memory\n    embedder: false\n    mode: bm25\n    store_turns: true\n"
SAY = [{"role": "user", "content": "I live in Lisbon and my dog is called Zorblax."}]


def _kept_only_the_flagged_trace(mw: Any, user: str) -> None:
    mw.drain()
    exported = mw.export_user(user)
    flags = [f for t in exported["traces"] for f in t.get("flags") or []]
    assert any(f.startswith("cancelled:") for f in flags), flags
    assert not any("Zorblax" in m["text"] for m in exported["memories"]), exported["memories"]
    assert mw.store.list_jobs() == []


def test_json_client_that_gives_up_cancels_the_turn(make_mw: Any) -> None:
    backend = ScriptedBackend(delay=3.0)
    mw = make_mw(MEMORY, backend=backend)
    with serve_in_thread(create_app(mw)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json={"user": "ana", "messages": SAY}, timeout=1.0)
        time.sleep(3.5)  # past the backend's answer: it must not have been finished and learned from
    assert len(backend.calls) == 1
    _kept_only_the_flagged_trace(mw, "ana")


def test_python_api_cancel_and_early_close(make_mw: Any) -> None:
    mw = make_mw(MEMORY, backend=ScriptedBackend(delay=2.0))

    async def cancel_chat() -> None:
        task = asyncio.ensure_future(mw.achat(user="ana", messages=SAY))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_chat())
    _kept_only_the_flagged_trace(mw, "ana")

    mw2 = make_mw(MEMORY, backend=ScriptedBackend())

    async def close_stream() -> None:
        stream = mw2.astream(user="bob", messages=SAY)
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(close_stream())
    _kept_only_the_flagged_trace(mw2, "bob")
