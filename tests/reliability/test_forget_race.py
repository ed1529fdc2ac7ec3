"""Forget racing in-flight work (issue #17): ``DELETE /v1/users/U`` while U's chat is generating (JSON
and SSE), while an after-turn job runs, or while a feedback event is being applied. Nothing of U may be
written again by work that started before the forget, and export answers 404 until U sends something
new. Real SQLite file, real HTTP server on loopback; a slow scripted backend (and, once, the real local
model) makes the generation last long enough to forget during it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict

from persona_mw import hookimpl
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Memory

from tests.conftest import store_cells

SECRET = "qxforgetmezz"
CONFIG = """
pipeline:
  - use: stated
  - use: memory
    embedder: false
    mode: bm25
    store_turns: true
"""


def cells_naming(url: str, needle: str, user: bool = True) -> list[str]:
    """Every cell of every table of the store that holds ``needle`` (or, with ``user``, names ana)."""
    return [f"{t}: {v[:100]}" for t, v in store_cells(url)
            if needle in v or (user and (v == "ana" or v.startswith("user:ana")))]


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def state_secret(url: str) -> None:
    r = httpx.post(f"{url}/v1/feedback", json={"kind": "stated", "user": "ana", "text": f"I like {SECRET} style"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_forget_during_generation_resurrects_nothing(make_mw: Any, tmp_path: Path, stream: bool, store_url) -> None:
    db = store_url()
    backend = ScriptedBackend(delay=1.0)
    mw = make_mw(CONFIG, backend=backend, db=db)
    with serve_in_thread(create_app(mw)) as url:
        state_secret(url)
        out: dict[str, Any] = {}

        def chat() -> None:
            body = {"model": "m", "user": "ana", "stream": stream,
                    "messages": [{"role": "user", "content": f"I love {SECRET} and my dog is called Rex"}]}
            with httpx.Client(timeout=30) as c:
                if stream:
                    with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                        out["status"] = r.status_code
                        out["body"] = "".join(r.iter_text())
                else:
                    r = c.post(f"{url}/v1/chat/completions", json=body)
                    out["status"], out["body"] = r.status_code, r.text

        t = threading.Thread(target=chat)
        t.start()
        wait_for(lambda: len(backend.calls) == 1)  # generating now: the prompt quoted the stated preference
        assert SECRET in json.dumps([m.text for m in backend.calls[0]])
        r = httpx.delete(f"{url}/v1/users/ana", timeout=30)
        assert r.status_code == 200 and r.json()["deleted"] is True
        t.join(30)
        assert out["status"] == 200, out  # the caller still gets its answer
        mw.drain()
        assert httpx.get(f"{url}/v1/users/ana").status_code == 404
        assert cells_naming(db, SECRET) == []
        assert mw.store.list_jobs() == []
        assert "forgotten" in out["body"]  # and its trace says nothing of it was stored

        # Work that starts after the forget is the user coming back: stored normally, old data gone.
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "user": "ana",
                                                             "messages": [{"role": "user", "content": "hello again"}]})
        assert r.status_code == 200
        mw.drain()
        exported = httpx.get(f"{url}/v1/users/ana")
        assert exported.status_code == 200 and SECRET not in exported.text and "hello again" in exported.text


class SlowAfterTurn:
    """An after-turn plugin that takes a while, then writes a memory and a profile about the user."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Any = None, name: str = "slow") -> None:
        self.name = name
        self.started = threading.Event()

    @hookimpl
    async def persona_after_turn(self, turn: Any, store: Any) -> None:
        self.started.set()
        await asyncio.sleep(1.5)
        store.add_memory(Memory(owner=f"user:{turn.request.user}", text=f"after-turn saw {SECRET}"))


def test_after_turn_job_running_during_forget_writes_nothing(make_mw: Any, tmp_path: Path, store_url) -> None:
    db = store_url()
    mw = make_mw("pipeline: [{use: stated}, {use: slow}]\n", db=db, plugins={"slow": SlowAfterTurn})
    mw.feedback(kind="stated", user="ana", text=f"I like {SECRET}")
    with serve_in_thread(create_app(mw)) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={"model": "m", "user": "ana", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        plugin = next(p for p in mw.host.pm.get_plugins() if isinstance(p, SlowAfterTurn))
        assert plugin.started.wait(5)
        t0 = time.monotonic()
        r = httpx.delete(f"{url}/v1/users/ana", timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 200
        # forget does not wait for the job (it used to drain every job of every user, up to 30 s) ...
        assert took < 1.0, took
        mw.drain()
        # ... and the job, finishing after it, wrote nothing back
        assert httpx.get(f"{url}/v1/users/ana").status_code == 404
    assert cells_naming(db, SECRET) == []


class SlowFeedback:
    """A learning plugin that takes a while on each stated preference, then writes it to the profile."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Any = None, name: str = "slowfb") -> None:
        self.name = name
        self.started = threading.Event()
        self.mw: Any = None

    @hookimpl
    def persona_startup(self, middleware: Any) -> None:
        self.mw = middleware

    @hookimpl
    async def persona_feedback(self, event: Any, store: Any) -> None:
        self.started.set()
        await asyncio.sleep(1.0)
        self.mw.update_profile(f"user:{event.user}", lambda p: p.extra.update({"slowfb": event.text}))
        store.add_memory(Memory(owner=f"user:{event.user}", text=f"feedback said {event.text}"))


def test_feedback_racing_forget_writes_nothing(make_mw: Any, tmp_path: Path, store_url) -> None:
    db = store_url()
    mw = make_mw("pipeline: [{use: stated}, {use: slowfb}]\n", db=db, plugins={"slowfb": SlowFeedback})
    plugin = next(p for p in mw.host.pm.get_plugins() if isinstance(p, SlowFeedback))
    with serve_in_thread(create_app(mw)) as url:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(r=httpx.post(
            f"{url}/v1/feedback", json={"kind": "stated", "user": "ana", "text": f"I like {SECRET}"}, timeout=30)))
        t.start()
        assert plugin.started.wait(5)  # the event is stored, the plugin is still working on it
        assert httpx.get(f"{url}/v1/users/ana").status_code == 200
        r = httpx.delete(f"{url}/v1/users/ana", timeout=30)
        assert r.status_code == 200
        t.join(30)
        assert out["r"].status_code == 201  # recorded, then forgotten: not an error for the caller
        assert httpx.get(f"{url}/v1/users/ana").status_code == 404
        # feedback sent after the forget is new: recorded normally
        r = httpx.post(f"{url}/v1/feedback", json={"kind": "stated", "user": "ana", "text": "Be brief."}, timeout=30)
        assert r.status_code == 201
        exported = httpx.get(f"{url}/v1/users/ana").json()
        assert [f["text"] for f in exported["feedback"]] == ["Be brief."]
        assert SECRET not in json.dumps(exported)
    assert cells_naming(db, SECRET, user=False) == []


def test_forget_during_real_model_generation(make_mw: Any, tmp_path: Path, local_backend: Any, store_url) -> None:
    """The same race with the real local model generating (a few seconds on CPU)."""
    db = store_url()
    mw = make_mw(CONFIG, backend=local_backend, db=db)
    asyncio.run(local_backend.load())
    with serve_in_thread(create_app(mw)) as url:
        state_secret(url)
        out: dict[str, Any] = {}
        body = {"model": "m", "user": "ana", "max_tokens": 160,
                "messages": [{"role": "user", "content": f"Write a long, detailed story about {SECRET}."}]}
        t = threading.Thread(target=lambda: out.update(r=httpx.post(f"{url}/v1/chat/completions", json=body,
                                                                    timeout=120)))
        t.start()
        sched = local_backend.scheduler
        deadline = time.monotonic() + 30
        while not sched.active and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the answer is decoding (the lean step makes 24 tokens take < 1 s)
        assert t.is_alive() and sched.active, "the generation ended before the forget; the race was not exercised"
        r = httpx.delete(f"{url}/v1/users/ana", timeout=30)
        assert r.status_code == 200
        t.join(120)
        assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["message"]["content"]
        mw.drain()
        assert httpx.get(f"{url}/v1/users/ana").status_code == 404
        assert cells_naming(db, SECRET) == []
        assert "forgotten" in json.dumps(out["r"].json().get("persona_trace", {}))
