"""SIGKILL during after-turn ingestion of a long conversation, then restart (shared by the tests and
the soak run). The worker sends one chat turn of ``MESSAGES`` user messages to a Middleware with the
memory plugin (raw turns and extracted preferences); its store writes each memory slowly and says so,
and the parent kills it in the middle. The restarted Middleware must resume the pending job by itself
(no ``resume_jobs`` call: a restart within 5 minutes) and leave no duplicate memory.

Run as ``python -m tests.reliability.crash_ingest DB SEED`` it is the worker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from persona_mw import Middleware, parse_config
from persona_mw.testing import ScriptedBackend

from tests.conftest import store_tables

REPO = Path(__file__).resolve().parents[2]
MESSAGES = 120
CONFIG = """
pipeline:
  - use: memory
    embedder: false
    mode: bm25
    store_turns: true
    extract: true
"""
_SYL = ["ka", "lo", "mi", "ru", "te", "zo", "pa", "ni", "ve", "su", "do", "fe", "gi", "ho", "ju", "bo"]


def conversation(seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_SYL) for _ in range(3))

    return [{"role": "user", "content": f"I really like {word()} {word()} with {word()}"} for _ in range(MESSAGES)]


def make(db: str) -> Middleware:
    cfg = parse_config(CONFIG)
    cfg.store.path = db
    return Middleware(cfg, backend=ScriptedBackend(script=lambda m: "noted"), autoload=False)


def worker(db: str, seed: int) -> None:
    mw = make(db)
    add = mw.store.add_memory

    def slow_add(memory: Any) -> Any:  # each write takes a moment and is announced once committed
        time.sleep(0.004)
        out = add(memory)
        sys.stdout.write("mem\n")
        sys.stdout.flush()
        return out

    mw.store.add_memory = slow_add  # type: ignore[method-assign]
    mw.chat(user=f"u{seed}", messages=conversation(seed))
    sys.stdout.write("chat\n")
    sys.stdout.flush()
    time.sleep(3600)


def duplicates(db: str) -> tuple[int, int]:
    """(duplicate memories, raw turns stored): the same owner/kind/text/provenance more than once, and
    the same active owner/kind/text more than once, counted beyond the first."""
    rows = [(m["owner"], m["kind"], m["text"], m["provenance"], m["superseded_by"], m["meta"])
            for m in store_tables(db)["memories"]]
    exact = Counter((o, k, t, p) for o, k, t, p, _, _ in rows)
    active = Counter((o, k, t) for o, k, t, _, s, _ in rows if s is None)
    dup = sum(n - 1 for n in exact.values() if n > 1) + sum(n - 1 for n in active.values() if n > 1)
    raw = sum(1 for *_, m in rows if json.loads(m).get("raw"))
    return dup, raw


def ingest_crash_cycle(db: Path | str, seed: int, wait_s: float = 20.0) -> dict[str, Any]:
    """One worker killed mid-ingestion; the restart must finish the job alone, with no duplicates.
    ``db``: a SQLite file, or any store URL (a Postgres schema)."""
    db = str(db)
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.crash_ingest", str(db), str(seed)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    kill_after = random.Random(seed).randint(20, 2 * MESSAGES - 40)  # raw turns, then extracted memories
    writes = 0
    deadline = time.monotonic() + 120
    while writes < kill_after and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        writes += line.strip() == "mem"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read()[-2000:] if proc.stderr else ""
    proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()
    if writes < kill_after:
        raise RuntimeError(f"worker wrote only {writes} memories: {err}")
    pending_at_kill = len(store_tables(db)["jobs"])

    t0 = time.monotonic()
    mw = make(db)  # the restart, seconds after the crash: no operator, no resume_jobs call
    operator_needed = False
    try:
        while mw.store.list_jobs() and time.monotonic() - t0 < wait_s:
            time.sleep(0.05)
        resumed_s = time.monotonic() - t0
        if mw.store.list_jobs():
            operator_needed = True
            mw.resume_jobs(stale_after_s=0)  # what an operator had to do
        mw.drain(60)
        left = len(mw.store.list_jobs())
    finally:
        mw.close()
    dup, raw = duplicates(db)
    return {"writes_before_kill": writes, "pending_at_kill": pending_at_kill, "operator_needed": operator_needed,
            "resumed_within_s": round(resumed_s, 2), "jobs_left": left, "duplicate_memories": dup,
            "raw_turns": raw}


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
