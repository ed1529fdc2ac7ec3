"""A feedback event's effects land exactly once, even when the process applying them dies half-way.

An event's effects are several profile writes (the core's evidence and stated list, then each feedback
plugin's). The event is stored with a ``feedback`` job held by the process; a process SIGKILLed after
some of those writes leaves the job, the next process takes it over and applies the event again, and
the writes already in are recognized by their marks (``Profile.applied``) and skipped. Before this, the
event stayed in the log with only part of its effects, so the profile differed from a rebuild.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from persona_mw import Middleware, hookimpl, parse_config
from persona_mw.nodes import user_node
from persona_mw.store import open_store
from persona_mw.testing import ScriptedBackend

REPO = Path(__file__).resolve().parents[2]
CONFIG = "pipeline: [{use: stated}, {use: profile}, {use: tally}]\n"


class Tally:
    """Counts the feedback events it saw in the user's profile (a plugin write the test can count). With
    ``TALLY_HANG`` set, it stops (sleeps) before its write for an event whose prompt says HANG."""

    def __init__(self, config: Any = None, name: str = "tally") -> None:
        self.name = name

    @hookimpl
    def persona_startup(self, ctx: Any) -> None:
        self._update = ctx.update_profile

    @hookimpl
    def persona_feedback(self, event: Any) -> None:
        if os.environ.get("TALLY_HANG") and "HANG" in str(getattr(event, "prompt", "")):
            print("hanging", flush=True)
            time.sleep(600)

        def bump(prof: Any) -> None:
            prof.extra["tally"] = int(prof.extra.get("tally", 0)) + 1

        self._update(user_node(event.user), bump)


def make(url: str) -> Middleware:
    return Middleware(parse_config(CONFIG), store=url, backend=ScriptedBackend(), autoload=False,
                      plugins={"tally": Tally})


WRITER = textwrap.dedent("""
    import sys
    from tests.reliability.test_feedback_replay import make
    mw = make(sys.argv[1])
    mw.feedback(user="ana", kind="choice", prompt="q1", chosen="short", rejected=["a much longer answer"])
    print("first done", flush=True)
    mw.feedback(user="ana", kind="choice", prompt="HANG q2", chosen="brief", rejected=["a long long answer"])
""")


def _url(kind: str, tmp_path: Path, request: Any) -> str:
    if kind == "sqlite":
        return str(tmp_path / "fb.db")
    from tests.conftest import fresh_pg_url

    return fresh_pg_url(request.getfixturevalue("pg_server"))


def _key(prof: Any) -> tuple[Any, ...]:
    return (prof.evidence, prof.extra["profile"]["pairs"], prof.extra.get("tally"))


def test_an_event_applied_twice_counts_once(store_url: Any) -> None:
    """A replay of an event whose writes are all in changes nothing; each write is marked per writer."""
    mw = make(store_url())
    try:
        mw.feedback(user="ana", kind="choice", prompt="q", chosen="short", rejected=["a much longer answer"])
        ((seq, ev),) = mw.store.feedback_log("ana")
        before = mw.store.get_profile(user_node("ana"))
        assert before is not None and _key(before) == (1, 1, 1)
        assert before.applied == {"core": [str(seq)], "profile": [str(seq)], "tally": [str(seq)]}
        mw.runtime.run(mw.pipeline.apply_feedback(ev, seq))
        after = mw.store.get_profile(user_node("ana"))
        assert after is not None and _key(after) == (1, 1, 1)
        assert after.weights == before.weights
        assert mw.store.list_jobs() == []  # the job that owed the effects was finished by the request
    finally:
        mw.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_process_killed_between_two_writes_of_an_event_leaves_the_rest_to_the_next(
        kind: str, tmp_path: Path, request: Any) -> None:
    url = _url(kind, tmp_path, request)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TALLY_HANG": "1"})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "first done", proc.stderr.read() if proc.stderr else ""
        assert proc.stdout.readline().strip() == "hanging"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    store = open_store(url)
    try:
        # The second event is stored, the core and the profile plugin wrote it, the tally did not.
        prof = store.get_profile(user_node("ana"))
        assert prof is not None and _key(prof) == (2, 2, 1)
        (job,) = store.list_jobs("ana")
        assert job["kind"] == "feedback"
    finally:
        store.close()
    mw = make(url)  # the next process takes over the dead holder's job at start; only the missing write is made
    try:
        deadline = time.monotonic() + 60
        while mw.store.list_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        mw.drain()
        assert mw.store.list_jobs() == []
        prof = mw.store.get_profile(user_node("ana"))
        assert prof is not None and _key(prof) == (2, 2, 2)
        mw.rebuild("ana")
        rebuilt = mw.store.get_profile(user_node("ana"))
        assert rebuilt is not None and _key(rebuilt) == _key(prof)
        assert rebuilt.weights == pytest.approx(prof.weights)
    finally:
        mw.close()


def test_a_failing_plugin_releases_the_job_for_a_retry(store_url: Any) -> None:
    """A plugin that raises under ``on_error: fail``: the request fails, the event stays stored, and its
    job is released (not held by a live process forever), so a later resume finishes the effects."""
    calls = {"n": 0}

    class Flaky(Tally):
        @hookimpl
        def persona_feedback(self, event: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("store of the plugin is down")
            super().persona_feedback(event)

    cfg = parse_config("pipeline: [{use: stated}, {use: profile}, {use: tally, on_error: fail}]\n")
    mw = Middleware(cfg, store=store_url(), backend=ScriptedBackend(), autoload=False,
                    plugins={"tally": Flaky})
    try:
        with pytest.raises(Exception, match="store of the plugin is down"):
            mw.feedback(user="ana", kind="choice", prompt="q", chosen="short", rejected=["a much longer answer"])
        (job,) = mw.store.list_jobs("ana")
        assert job["claimed_by"] is None and job["attempts"] == 1
        assert mw.resume_jobs(stale_after_s=0) == 1
        mw.drain()
        prof = mw.store.get_profile(user_node("ana"))
        assert prof is not None and _key(prof) == (1, 1, 1)
        assert mw.store.list_jobs() == []
    finally:
        mw.close()
