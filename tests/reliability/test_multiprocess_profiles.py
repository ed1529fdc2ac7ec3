"""Profile updates across OS processes: two processes on one store (one SQLite file, one Postgres
schema) record stated preferences and choices for overlapping users at the same time; no update is
lost (the profile's row version turns every read-modify-write into a compare-and-set), and every
profile equals a rebuild from its events."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest

USERS = [f"u{i}" for i in range(4)]
EACH = 100
CONFIG = "pipeline: [{use: stated}, {use: profile}]\n"


def _writer(url: str, proc: int, start: Any, kind: str) -> None:
    from persona_mw import Middleware, parse_config
    from persona_mw.testing import ScriptedBackend

    mw = Middleware(parse_config(CONFIG), store=url, backend=ScriptedBackend(), autoload=False)
    try:
        start.wait(60)
        for i in range(EACH):
            user = USERS[i % len(USERS)]
            if kind == "stated":
                mw.feedback(kind="stated", user=user, text=f"p{proc} likes topic {i}")
            else:
                mw.feedback(kind="choice", user=user, prompt=f"q{proc}-{i}",
                            chosen=f"short answer {proc} {i}", rejected=[f"a much longer answer number {i} " * 3])
    finally:
        mw.close()


def _run_two(url: str, kind: str) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, p, start, kind)) for p in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]


def _check(url: str, kind: str) -> None:
    from persona_mw import Middleware, parse_config
    from persona_mw.nodes import user_node
    from persona_mw.testing import ScriptedBackend

    mw = Middleware(parse_config(CONFIG), store=url, backend=ScriptedBackend(), autoload=False)
    try:
        before: dict[str, Any] = {}
        for user in USERS:
            prof = mw.store.get_profile(user_node(user))
            assert prof is not None
            per_user = 2 * EACH // len(USERS)
            assert mw.store.count_feedback(user) == per_user
            assert prof.evidence == per_user, (user, prof.evidence)
            if kind == "stated":
                want = {f"p{p} likes topic {i}" for p in range(2) for i in range(EACH) if USERS[i % len(USERS)] == user}
                assert {s.text for s in prof.stated} == want
            else:
                assert prof.extra["profile"]["pairs"] == per_user, prof.extra["profile"]
            before[user] = prof
        for user in USERS:
            mw.rebuild(user)
            after = mw.store.get_profile(user_node(user))
            assert after is not None
            assert after.evidence == before[user].evidence
            assert sorted(s.text for s in after.stated) == sorted(s.text for s in before[user].stated)
            if kind == "choice":
                assert after.extra["profile"]["pairs"] == before[user].extra["profile"]["pairs"]
    finally:
        mw.close()


@pytest.mark.parametrize("kind", ["stated", "choice"])
def test_two_processes_on_one_sqlite_file_lose_no_update(tmp_path: Any, kind: str) -> None:
    url = str(tmp_path / "shared.db")
    _run_two(url, kind)
    _check(url, kind)


@pytest.mark.parametrize("kind", ["stated", "choice"])
def test_two_processes_on_one_postgres_lose_no_update(pg_server: str, kind: str) -> None:
    from tests.conftest import fresh_pg_url

    url = fresh_pg_url(pg_server)
    _run_two(url, kind)
    _check(url, kind)
