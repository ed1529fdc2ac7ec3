"""``Runtime``: the background side of one Middleware.

A private event loop in a daemon thread (the sync API runs the async one on it, and background
jobs run there so they outlive the call that scheduled them), the set of jobs ``drain`` waits
for, and the maintenance thread (pending forget scrubs; with after-turn jobs, the lease
heartbeat and the sweep that takes over jobs of dead holders). ``sync_verb`` turns an async
verb into its sync twin in one place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

from persona_mw.errors import PersonaError

log = logging.getLogger("persona_mw")
T = TypeVar("T")
P = ParamSpec("P")


class _Loop:
    """A private event loop in a daemon thread: sync API calls and background jobs run here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="persona-mw-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("sync persona-mw API called from its own event loop; use the async API")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Cancel what still runs on the loop (waiting up to 2 s for it to unwind), stop it, and close
        it once nothing is pending.

        Closed here, not by the loop's ``__del__`` at interpreter exit: there its self-pipe may already be
        gone, and a CLI command ended with "Exception ignored in BaseEventLoop.__del__ ... Bad file
        descriptor" on stderr. A loop with tasks still pending is left open (closing it would destroy
        them, and their finalizers would then run at arbitrary points in the process)."""
        if self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:  # from a task on the loop: it cannot wait for itself
            self.loop.call_soon(self.loop.stop)
            return

        async def unwind() -> bool:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            await self.loop.shutdown_asyncgens()
            return all(t.done() for t in tasks)

        unwound = False
        if self.thread.is_alive():
            try:
                unwound = asyncio.run_coroutine_threadsafe(unwind(), self.loop).result(timeout=5)
            except Exception as exc:  # a task that would not unwind: leave the loop open
                log.debug("event loop did not unwind: %s", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if unwound and not self.thread.is_alive():
            self.loop.close()


class Runtime:
    """The loop, the background jobs and the maintenance thread of one Middleware."""

    def __init__(self) -> None:
        self._loop: _Loop | None = None
        self._jobs: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._maintenance: threading.Thread | None = None
        self._stop = threading.Event()
        self.scrub_wanted = threading.Event()
        self.maintenance_interval_s = 1.0  # pending-scrub retries; heartbeat/sweep every 10th tick
        self.closed = False

    # -- the loop ------------------------------------------------------------------------------

    def portal(self) -> _Loop:
        if self.closed:
            raise PersonaError("this Middleware is closed")
        if self._loop is None:
            with self._lock:  # threads racing on the first sync call must share one loop
                if self._loop is None:
                    self._loop = _Loop()
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (the sync API)."""
        return self.portal().run(coro)

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` off the request path, on the loop; ``drain()`` waits for it."""
        fut = self.portal().submit(coro)
        with self._lock:
            self._jobs.add(fut)
        fut.add_done_callback(self._job_done)

    def _job_done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._jobs.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("background job failed: %s", fut.exception())

    def drain(self, timeout: float | None = 30.0) -> None:
        """Wait for the background jobs scheduled so far."""
        with self._lock:
            jobs = list(self._jobs)
        concurrent.futures.wait(jobs, timeout=timeout)

    async def adrain(self, timeout: float | None = 30.0) -> None:
        """``drain`` in a worker thread."""
        await asyncio.to_thread(self.drain, timeout)

    def iterate(self, agen: AsyncGenerator[T, None]) -> Iterator[T]:
        """A sync iterator over an async generator, each step run on the loop (closed when abandoned)."""

        async def step() -> T:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield self.run(step())
                except StopAsyncIteration:
                    return
        finally:
            self.run(agen.aclose())

    # -- maintenance ---------------------------------------------------------------------------

    def start_maintenance(self, store: Any, *, jobs: bool, sweep: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """A daemon thread: retries pending forget scrubs; with after-turn ``jobs``, renews this process's
        job lease (heartbeat) and runs ``sweep`` to take over the jobs of holders that died."""
        if store.pending_scrub():
            self.scrub_wanted.set()
        self._maintenance = threading.Thread(target=self._maintain, args=(store, jobs, sweep),
                                             name="persona-mw-maintenance", daemon=True)
        self._maintenance.start()

    def _maintain(self, store: Any, jobs: bool, sweep: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        tick = 0
        while not self._stop.wait(self.maintenance_interval_s):
            try:
                if self.scrub_wanted.is_set() and store.scrub():
                    self.scrub_wanted.clear()
                    if store.pending_scrub():  # a forget meanwhile
                        self.scrub_wanted.set()
                    else:
                        log.info("pending forget scrub finished: the deleted text is gone from the files")
                if jobs and tick % 10 == 0:
                    store.heartbeat()
                    if tick:
                        self.background(sweep())
            except Exception as exc:  # a store hiccup: the next tick tries again
                if self._stop.is_set():
                    return
                log.warning("maintenance (scrub/heartbeat) failed: %s", exc)
            tick += 1

    def shutdown(self) -> None:
        """Stop the maintenance thread and the loop (jobs not drained are cancelled)."""
        self.closed = True
        self._stop.set()
        if self._maintenance is not None and self._maintenance is not threading.current_thread():
            self._maintenance.join(timeout=5)
        if self._loop is not None:
            self._loop.stop()


def sync_verb(averb: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """The sync twin of an async Middleware verb: the same coroutine, run on the Middleware's loop.

    ``chat = sync_verb(achat)`` in the class body; the first argument is the Middleware.
    """

    @functools.wraps(averb)
    def verb(*args: P.args, **kwargs: P.kwargs) -> T:
        runtime: Runtime = args[0].runtime  # type: ignore[attr-defined]
        return runtime.run(averb(*args, **kwargs))  # type: ignore[arg-type]

    verb.__name__ = averb.__name__.removeprefix("a")
    verb.__qualname__ = averb.__qualname__.replace(averb.__name__, verb.__name__)
    return verb


def forward(path: str, doc_from: Callable[..., Any] | None = None) -> Any:
    """A facade verb that calls ``self.<owner>.<method>`` (``path`` = ``"owner.method"``): the Middleware
    lists its public verbs once and each owner keeps the code. The owner's docstring is the verb's."""
    owner, method = path.split(".")

    def verb(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(getattr(self, owner), method)(*args, **kwargs)

    verb.__name__ = method
    verb.__doc__ = (doc_from.__doc__ if doc_from is not None else None) or f"See ``{path}``."
    if doc_from is not None:
        verb.__wrapped__ = doc_from  # type: ignore[attr-defined]  # inspect.signature shows the owner's
    return verb


__all__ = ["Runtime", "forward", "sync_verb"]
