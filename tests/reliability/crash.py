"""Crash-recovery cycles (shared by the tests and the soak run): a worker process writes feedback
and chat turns from several threads, is killed with SIGKILL mid-write, and the database must pass
``PRAGMA integrity_check``, reopen, hold every acknowledged write, rebuild profiles from the events,
and finish the after-turn jobs the dead process left pending.

Run as ``python -m tests.reliability.crash DB SEED`` it is the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from persona_mw import Middleware, hookimpl, parse_config
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Memory

REPO = Path(__file__).resolve().parents[2]
USERS = [f"u{i}" for i in range(5)]


class MarkAfterTurn:
    """A slow after-turn plugin whose effect is visible: one memory per finished turn (idempotent)."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Any = None, name: str = "mark") -> None:
        self.name = name

    @hookimpl
    async def persona_after_turn(self, turn: Any, store: Any) -> None:
        await asyncio.sleep(0.03)
        mem_id = f"mem-{turn.trace.id}"
        if store.get_memory(mem_id) is None:
            store.add_memory(Memory(id=mem_id, owner=f"user:{turn.request.user}", text=f"after {turn.trace.id}"))


def make(db: str) -> Middleware:
    cfg = parse_config("pipeline: [{use: stated}, {use: mark}]\n")
    cfg.store.path = db
    return Middleware(cfg, backend=ScriptedBackend(), autoload=False, plugins={"mark": MarkAfterTurn})


def worker(db: str, seed: int) -> None:
    mw = make(db)
    out = sys.stdout
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    def run(t: int) -> None:
        i = 0
        while True:
            user = USERS[(seed + t + i) % len(USERS)]
            if i % 3 == 2:
                r = mw.chat(user=user, messages=f"turn {seed}-{t}-{i}")
                say(f"turn {r.trace.id}")
            else:
                kind = {"kind": "stated", "text": f"pref {seed}-{t}-{i}"} if i % 3 == 0 else {
                    "kind": "choice", "prompt": "q", "chosen": f"short {i}", "rejected": [f"a long answer {i}"]}
                say(f"event {mw.feedback(user=user, **kind)}")
            i += 1

    for t in range(4):
        threading.Thread(target=run, args=(t,), daemon=True).start()
    time.sleep(3600)


def crash_cycle(db: Path, seed: int, kill_after: int = 60) -> dict[str, Any]:
    """One worker run killed after ~``kill_after`` acknowledged writes; returns what recovery found."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.crash", str(db), str(seed)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    acked: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(acked) < kill_after and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if len(acked) < kill_after:
        raise RuntimeError(f"worker wrote only {len(acked)} lines: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()

    conn = sqlite3.connect(db)
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    pending_before = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    conn.close()

    mw = make(str(db))
    try:
        events = {e.id for e in mw.store.list_feedback()}
        acked_events = [a.split()[1] for a in acked if a.startswith("event ")]
        acked_turns = [a.split()[1] for a in acked if a.startswith("turn ")]
        lost = [e for e in acked_events if e not in events]
        mw.resume_jobs(stale_after_s=0)  # the restart itself already took the dead worker's jobs, mostly
        mw.drain()
        missing_effects = [t for t in acked_turns if mw.store.get_memory(f"mem-{t}") is None]
        left = len(mw.store.list_jobs())
        resumed = pending_before - left  # by the startup or by the call above (never twice)
        rebuilt_ok = True
        for user in USERS:
            if mw.store.has_user(user):
                mw.rebuild(user)
                prof = mw.store.get_profile(f"user:{user}")
                rebuilt_ok &= prof is not None and prof.evidence == mw.store.count_feedback(user)
    finally:
        mw.close()
    return {"acked_events": len(acked_events), "lost_events": len(lost), "acked_turns": len(acked_turns),
            "integrity": integrity, "pending_jobs": pending_before, "resumed_jobs": resumed,
            "missing_after_turn": len(missing_effects), "jobs_left": left, "rebuilt_ok": rebuilt_ok}


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
