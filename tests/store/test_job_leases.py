"""Job leases (issue #17): a job's claim names the process holding it; a claim is taken over when the
holder is dead (its pid is gone on this host, or it has not beaten for the lease), never while it lives.

SQLite on purpose under any PERSONA_MW_TEST_STORE: it writes the SQLite store's workers table itself
(``_tx``); the same rules on both stores are in tests/store/contract/."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persona_mw.errors import ForgottenError
from persona_mw.store import write_guard
from persona_mw.store.sqlite import LEASE_S, SQLiteStore, process_id


def _holder(store: SQLiteStore, job: str, holder: str, host: str, pid: int, beat: float) -> None:
    with store._tx() as cur:
        cur.execute("INSERT OR REPLACE INTO workers (id, host, pid, heartbeat) VALUES (?, ?, ?, ?)",
                    (holder, host, pid, beat))
        cur.execute("UPDATE jobs SET claimed_by = ? WHERE id = ?", (holder, job))


def test_claims_of_dead_holders_are_taken_live_ones_kept(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "jobs.db"))
    for j in ("mine", "gone_pid", "silent_host", "live_host", "old_self"):
        store.add_job(j, "ana", "after_turn", {"request": {}})
    assert {r["claimed_by"] for r in store.list_jobs()} == {process_id()}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that ran on this host and is gone
    now = time.time()
    host = socket.gethostname()
    _holder(store, "gone_pid", f"{host}:{dead.pid}:aa", host, dead.pid, now)
    _holder(store, "silent_host", "elsewhere:1:bb", "elsewhere", 1, now - LEASE_S - 1)
    _holder(store, "live_host", "elsewhere:2:cc", "elsewhere", 2, now)
    _holder(store, "old_self", f"{host}:{os.getpid()}:dd", host, os.getpid(), now)

    taken = {j["id"] for j in store.claim_jobs(300, 3, dead_only=True)}
    assert taken == {"gone_pid", "silent_host", "old_self"}  # not ours, not a live holder elsewhere
    assert {j["id"] for j in store.claim_jobs(300, 3, dead_only=True)} == set()  # now held by us
    # a plain resume with stale_after_s=0 takes everything not excluded (what an operator asks for)
    assert {j["id"] for j in store.claim_jobs(0, 3, exclude={"mine"})} == {
        "gone_pid", "silent_host", "live_host", "old_self"}
    store.close()


def test_guarded_writes_refused_after_forget_in_another_connection(tmp_path: Path) -> None:
    """The epoch lives in the file: a forget by another process stops this one's in-flight work."""
    a = SQLiteStore(str(tmp_path / "two.db"))
    b = SQLiteStore(str(tmp_path / "two.db"))
    a.ensure_node("user:ana")
    epoch = a.user_epoch("ana")
    b.forget_user("ana")
    with write_guard("ana", epoch), pytest.raises(ForgottenError):
        a.ensure_node("user:ana")
    with write_guard("ana", a.user_epoch("ana")):  # work started after the forget
        a.ensure_node("user:ana")
    with write_guard("ana", epoch):
        a.ensure_node("user:bob")  # other users are not affected
    assert a.has_user("ana") and a.has_user("bob")
    a.close()
    b.close()
