"""Soak phases of issue #17 (used by ``soak.py`` and the tests at a small size):

- ``forget_race``: ``turns`` chat turns in flight at once over HTTP (half JSON, half SSE), each user
  deleted while their turn is generating; afterwards no user may exist again (resurrected users).
- ``ingest_crashes``: SIGKILL-during-ingestion cycles (``crash_ingest``); no duplicate memory, no job
  left for an operator.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from persona_mw.testing import ScriptedBackend
from persona_mw.types import Candidate, Message

from tests.conftest import store_bytes

CONFIG = """
pipeline:
  - use: stated
  - use: memory
    embedder: false
    mode: bm25
    store_turns: true
"""


class SignallingBackend(ScriptedBackend):
    """A scripted backend that says when it started generating for a user (tag ``[uN]``) and then
    generates until the test releases that user (after their DELETE was answered), at least ``delay``
    seconds: every forget lands while its user's turn is generating, whatever the load."""

    def __init__(self, delay: float, hold_s: float = 60.0) -> None:
        super().__init__(delay=0.0)
        self.slow, self.hold_s = delay, hold_s
        self.started: dict[str, threading.Event] = {}
        self.released: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def event(self, user: str, table: str = "started") -> threading.Event:
        with self._lock:
            return getattr(self, table).setdefault(user, threading.Event())

    async def generate(self, messages: list[Message], **kwargs: Any) -> list[Candidate]:
        last = next((m.text for m in reversed(messages) if m.role == "user"), "")
        tag = last.split("[", 1)[1].split("]", 1)[0] if "[" in last else ""
        self.event(tag).set()
        await asyncio.sleep(self.slow)
        release, deadline = self.event(tag, "released"), time.monotonic() + self.hold_s
        while tag and not release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await super().generate(messages, **kwargs)


def forget_race(root: Path, turns: int = 200, delay: float = 0.2, url: str | None = None) -> dict[str, Any]:
    """The race on the store at ``url`` (default: a SQLite file in ``root``)."""
    import httpx

    from persona_mw import Middleware, parse_config
    from persona_mw.server import create_app, serve_in_thread

    cfg = parse_config(CONFIG)
    cfg.store.path = url = url or str(root / "forget_race.db")
    backend = SignallingBackend(delay)
    mw = Middleware(cfg, backend=backend, autoload=False)
    users = [f"u{i}" for i in range(turns)]
    for u in users:
        mw.feedback(kind="stated", user=u, text=f"{u} secret preference qx{u}zz")
    bad: list[str] = []
    unscrubbed = 0
    raced = 0  # DELETE answered while the user's turn was still generating: the race really happened

    async def one(client: httpx.AsyncClient, url: str, i: int, user: str) -> None:
        nonlocal unscrubbed, raced
        body = {"model": "m", "user": user, "stream": i % 2 == 1,
                "messages": [{"role": "user", "content": f"[{user}] tell me about qx{user}zz"}]}

        async def chat() -> int:
            if body["stream"]:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_text():
                        pass
                    return r.status_code
            return (await client.post(f"{url}/v1/chat/completions", json=body)).status_code

        task = asyncio.create_task(chat())
        ev = backend.event(user)
        while not ev.is_set() and not task.done():
            await asyncio.sleep(0.005)
        r = await client.delete(f"{url}/v1/users/{user}")
        raced += not task.done()
        backend.event(user, "released").set()  # the turn finishes only now, after the forget
        if r.status_code != 200:
            bad.append(f"DELETE {user}: {r.status_code} {r.text[:200]}")
        elif not r.json().get("scrubbed"):
            unscrubbed += 1
        status = await task
        if status != 200:
            bad.append(f"chat {user}: {status}")

    async def run_all(url: str) -> None:
        limits = httpx.Limits(max_connections=turns * 2 + 10)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(one(client, url, i, u) for i, u in enumerate(users)))

    t0 = time.perf_counter()
    with serve_in_thread(create_app(mw)) as url:
        asyncio.run(run_all(url))
    mw.drain(120)
    resurrected = [u for u in users if mw.store.has_user(u)]
    deadline = time.monotonic() + 10
    pending_scrub = getattr(mw.store, "pending_scrub", lambda: -1)  # -1: a store that cannot tell
    while pending_scrub() > 0 and time.monotonic() < deadline:  # the background retries
        time.sleep(0.1)
    pending = pending_scrub()
    mw.close()
    raw = store_bytes(url)
    leftover = [u for u in users if f"qx{u}zz".encode() in raw]
    return {"turns": turns, "json": (turns + 1) // 2, "sse": turns // 2, "deleted_during_generation": raced,
            "resurrected": len(resurrected),
            "resurrected_examples": resurrected[:5], "errors": bad[:10], "error_count": len(bad),
            "unscrubbed_at_delete": unscrubbed, "pending_scrub_after": pending,
            "secrets_left_in_files": len(leftover), "seconds": round(time.perf_counter() - t0, 1)}


def ingest_crashes(root: Path, cycles: int = 20, seed: int = 0) -> dict[str, Any]:
    from .crash_ingest import ingest_crash_cycle

    runs = [ingest_crash_cycle(root / "ingest_crash.db", seed=seed + c) for c in range(cycles)]
    return {"cycles": len(runs), "duplicate_memories": sum(r["duplicate_memories"] for r in runs),
            "cycles_with_duplicates": sum(r["duplicate_memories"] > 0 for r in runs),
            "operator_needed": sum(r["operator_needed"] for r in runs),
            "jobs_left": sum(r["jobs_left"] for r in runs), "pending_at_kill": sum(r["pending_at_kill"] for r in runs),
            "max_resume_s": max((r["resumed_within_s"] for r in runs), default=0.0),
            "raw_turns_per_cycle": sorted({r["raw_turns"] for r in runs})}
