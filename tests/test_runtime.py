"""The Middleware's private event loop: what ``shutdown`` does with work still on it."""

from __future__ import annotations

import asyncio
import threading
import time

from persona_mw.runtime import Runtime


def _job(started: threading.Event, cancelled: threading.Event, stubborn: bool = False):
    async def job() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            if not stubborn:
                raise
            await asyncio.sleep(30)  # ignores the cancellation

    return job()


def test_shutdown_cancels_pending_jobs_and_closes_the_loop():
    rt = Runtime()
    started, cancelled = threading.Event(), threading.Event()
    rt.background(_job(started, cancelled))
    assert started.wait(5)
    rt.shutdown()
    assert cancelled.is_set()  # its finally/except blocks ran on the loop, not at interpreter exit
    assert rt._loop is not None and rt._loop.loop.is_closed()
    assert not rt._loop.thread.is_alive()
    assert rt._jobs == set()


def test_shutdown_leaves_open_a_loop_whose_task_will_not_unwind():
    rt = Runtime()
    started, cancelled = threading.Event(), threading.Event()
    rt.background(_job(started, cancelled, stubborn=True))
    assert started.wait(5)
    began = time.monotonic()
    rt.shutdown()
    assert time.monotonic() - began < 10  # bounded: 2 s for the tasks, then the loop stops
    assert cancelled.is_set()
    assert rt._loop is not None and not rt._loop.loop.is_closed()  # a pending task is never destroyed


def test_shutdown_of_an_idle_runtime_twice():
    rt = Runtime()
    assert rt.run(asyncio.sleep(0, result=3)) == 3
    rt.shutdown()
    rt.shutdown()
    assert rt._loop is not None and rt._loop.loop.is_closed()
