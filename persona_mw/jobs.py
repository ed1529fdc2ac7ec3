"""``AfterTurnJobs``: what happens once a turn's answer is out.

The trace is stored (bounded, timings coarsened, redacted), and ``persona_after_turn`` is
scheduled on the background loop. The job is first recorded in the store (``jobs`` table,
request and answers redacted), so a crash before it finishes leaves it for ``resume``; it is
deleted once it succeeded, failed ones are retried up to ``limits.job_attempts``. Forget epochs
(``EPOCH``) make sure work that started before a forget never writes the user back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from persona_mw.budget import AuxBudget
from persona_mw.errors import ForgottenError, PersonaError
from persona_mw.limits import bound_trace
from persona_mw.store import write_guard
from persona_mw.types import Candidate, ChatRequest, ChatResponse, StashKey, Trace, Turn

if TYPE_CHECKING:
    from persona_mw.config import Config
    from persona_mw.graph import PreferenceGraph
    from persona_mw.pipeline import Pipeline
    from persona_mw.privacy import Redactor
    from persona_mw.runtime import Runtime
    from persona_mw.store import Store

log = logging.getLogger("persona_mw")
# Request fields a background-job record keeps as sent (ids and flags); the rest is redacted.
_JOB_KEEP = frozenset({"user", "context", "groups", "n", "stream"})
# The user's forget epoch when the turn started: its writes are refused once a forget moved it on.
EPOCH: StashKey[int | None] = StashKey("persona_mw.forget_epoch")
FORGOTTEN_FLAG = "forgotten: the user was forgotten while this work ran; nothing of it was stored"
AFTER_TURN = "persona_after_turn"


def epoch_of(store: Any, user: str) -> int | None:
    """The user's forget epoch (every store keeps one: ``UserDataStore.user_epoch``)."""
    return int(store.user_epoch(user))


def guard(turn: Turn) -> Any:
    """A context manager: the store refuses writes for the turn's user once a forget moved the epoch on."""
    return write_guard(turn.request.user, turn.stash.get(EPOCH, None))


class AfterTurnJobs:
    """Stores traces and runs, records and resumes the ``persona_after_turn`` jobs of one Middleware."""

    def __init__(self, *, config: Config, store: Store, graph: PreferenceGraph, redactor: Redactor,
                 pipeline: Pipeline, runtime: Runtime, cache_scope: Callable[[str], Any]) -> None:
        self.config = config
        self.store = store
        self.graph = graph
        self.redactor = redactor
        self.pipeline = pipeline
        self.runtime = runtime
        self.cache_scope = cache_scope
        self._running: set[str] = set()  # job ids this process runs now (never re-claimed)
        # False (``persona-mw serve --no-jobs``): jobs are recorded unclaimed and left to
        # ``persona-mw worker`` processes; this process neither runs nor resumes them.
        self.run_here = True
        self.resumed = 0  # jobs this process claimed from the store and started (``persona-mw worker`` reports it)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.pipeline.has_impls(AFTER_TURN)

    def job_budget(self) -> AuxBudget:
        """A fresh budget for one background job (``budget.aux_calls_per_job``), for plugins."""
        from persona_mw.budget import job_budget

        return job_budget(self.config.budget.aux_calls_per_job)

    def save_trace(self, trace: Trace) -> None:
        bound_trace(trace, self.config.limits)
        res = self.config.trace.timing_resolution_ms
        if res:  # coarser timings: less for a caller to read into (trace.timing_resolution_ms)
            for step in trace.steps:
                step.ms = round(step.ms / res) * res
            trace.timings_ms = {k: round(v / res) * res for k, v in trace.timings_ms.items()}
        if self.config.trace.store:
            self.store.save_trace(self.redactor.redact_model(trace))

    def finish(self, turn: Turn, response: ChatResponse) -> None:
        """Store the trace and schedule ``persona_after_turn`` off the request path (a store write:
        called in a worker thread)."""
        try:
            with guard(turn):
                self.save_trace(turn.trace)
                if self.enabled:
                    job_id = self._record(turn, response)
                    if self.run_here:
                        self._start(turn, response, job_id)
        except ForgottenError:
            # DELETE /v1/users/U answered while this turn ran: its trace and job would bring U back.
            log.info("user %r was forgotten during turn %s: trace and after-turn job dropped",
                     turn.request.user, turn.trace.id)
            if FORGOTTEN_FLAG not in turn.trace.flags:
                turn.trace.flags.append(FORGOTTEN_FLAG)

    def _start(self, turn: Turn, response: ChatResponse, job_id: str | None) -> None:
        if job_id is not None:
            with self._lock:
                self._running.add(job_id)
        self.runtime.background(self._run(turn, response, job_id))

    def _record(self, turn: Turn, response: ChatResponse) -> str | None:
        add_job = self.store.add_job
        # Every free-text field of the request (messages, metadata, stop, tools, model ...) is
        # redacted; only the keys that find the job's rows (user, context, groups) stay as sent.
        request = {k: v if k in _JOB_KEEP else self.redactor.redact_data(v, keys=True)
                   for k, v in turn.request.model_dump(mode="json").items()}
        payload = {
            "request": request,
            "answers": self.redactor.redact_data([c.text for c in turn.candidates]),
            "selected": turn.selected,
            "finish_reason": response.choices[0].finish_reason if response.choices else "stop",
            "trace_id": turn.trace.id,
            "epoch": turn.stash.get(EPOCH, None),
        }
        job_id = f"job-{turn.trace.id}"
        add_job(job_id, turn.request.user, "after_turn", payload, claim=self.run_here)
        return job_id

    async def _run(self, turn: Turn, response: ChatResponse, job_id: str | None = None) -> None:
        try:
            with self.cache_scope(turn.request.user), guard(turn):
                await self._run_guarded(turn, response, job_id)
        except ForgottenError:
            log.info("user %r was forgotten during after-turn job of trace %s: its writes were dropped",
                     turn.request.user, turn.trace.id)
        finally:
            if job_id is not None:
                with self._lock:
                    self._running.discard(job_id)

    async def _run_guarded(self, turn: Turn, response: ChatResponse, job_id: str | None) -> None:
        before = len(turn.trace.steps)
        t = time.perf_counter()
        failed: str | None = None
        try:
            await self.pipeline.broadcast(AFTER_TURN, turn, response=response, store=self.store)
        except PersonaError as exc:
            # 'fail' policy off the request path: the caller has its answer; record and log.
            log.error("after-turn job failed for trace %s: %s", turn.trace.id, exc)
            turn.trace.flags.append(f"after_turn_failed: {exc}")
            failed = str(exc)
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}"
            log.error("after-turn job crashed for trace %s: %s", turn.trace.id, failed)
            turn.trace.flags.append(f"after_turn_failed: {failed}")
        turn.trace.timings_ms["after_turn"] = (time.perf_counter() - t) * 1000
        epoch = turn.stash.get(EPOCH, None)
        if failed is not None and epoch is not None and epoch_of(self.store, turn.request.user) != epoch:
            # forget deleted the job row too; failing it or saving the trace would only be refused
            log.info("after-turn job of trace %s stopped: user %r was forgotten meanwhile",
                     turn.trace.id, turn.request.user)
            return
        if job_id is not None:
            if failed is None:
                self.store.finish_job(job_id)
            else:
                attempts = self.store.fail_job(job_id, failed)
                if attempts < self.config.limits.job_attempts:
                    turn.trace.flags.append(f"after_turn_retry_pending: attempt {attempts} failed")
        if len(turn.trace.steps) > before or failed:
            self.save_trace(turn.trace)

    async def aresume_jobs(self, stale_after_s: float = 60.0, *, dead_only: bool = False) -> int:
        """Re-run pending after-turn jobs (left by a crash, or failed fewer than ``limits.job_attempts``
        times) whose claim is older than ``stale_after_s`` or whose holder process is dead (gone,
        or no heartbeat within the lease); returns how many were started. Jobs this process is
        running are never taken twice. ``dead_only``: only those of dead holders (the sweep)."""
        claim = self.store.claim_jobs
        if not self.run_here:
            return 0
        with self._lock:
            running = set(self._running)
        kwargs: dict[str, Any] = {"exclude": running, "dead_only": True} if dead_only else {"exclude": running}
        # Feedback jobs always (their effects are the core's too); after-turn ones only with plugins to run them.
        kwargs["kinds"] = ["feedback", "after_turn"] if self.enabled else ["feedback"]
        started = 0
        for job in claim(stale_after_s, self.config.limits.job_attempts, **kwargs):
            if job["kind"] == "feedback":
                with self._lock:
                    self._running.add(job["id"])
                self.runtime.background(self._replay_feedback(job))
                started += 1
                continue
            replayed = self._replay(job)
            if replayed is not None:
                self._start(*replayed, job["id"])
                started += 1
        self.resumed += started
        return started

    async def _replay_feedback(self, job: dict[str, Any]) -> None:
        """Apply a stored feedback event again for a process that died before its effects were all in
        (each profile write already made is recognized by its mark and skipped)."""
        user, seq = job["user"], int(job["payload"]["seq"])
        try:
            # The epoch first: a forget after this read refuses the writes; one before it deleted the event.
            epoch = await asyncio.to_thread(epoch_of, self.store, user)
            found = await asyncio.to_thread(self.store.feedback_log, user, seq - 1, 1)
            if found and found[0][0] == seq:
                with self.cache_scope(user), write_guard(user, epoch):
                    for step in await self.pipeline.apply_feedback(found[0][1], seq):
                        if step.error:
                            log.warning("feedback plugin %s (replay of event %s): %s", step.plugin, seq, step.error)
            await asyncio.to_thread(self.store.finish_job, job["id"])
        except ForgottenError:
            log.info("user %r was forgotten while feedback event %s was replayed: its writes were dropped", user, seq)
        except Exception as exc:
            log.error("replay of feedback event %s failed: %s: %s", seq, type(exc).__name__, exc)
            await asyncio.to_thread(self.store.fail_job, job["id"], f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._running.discard(job["id"])

    def _replay(self, job: dict[str, Any]) -> tuple[Turn, ChatResponse] | None:
        """The turn and response of a recorded job, or None (the user was forgotten since; a record
        that cannot be replayed is kept with its error, not lost)."""
        try:
            p = job["payload"]
            req = ChatRequest.model_validate(p["request"])
            turn = self.pipeline.new_turn(req)
            if "epoch" in p:  # the epoch the turn saw: a forget since then drops the job's writes
                turn.stash[EPOCH] = p["epoch"]
            with guard(turn):
                turn.scope, turn.profiles = self.graph.resolve(req)
            turn.candidates = [Candidate(text=t, index=i, finish_reason=p.get("finish_reason") or "stop")
                               for i, t in enumerate(p["answers"] or [""])]
            turn.selected = int(p.get("selected") or 0)
            stored = self.store.get_trace(p["trace_id"])
            if stored is None:  # trace.store off: keep the id, so the job's message ids match the first run's
                turn.trace.id = p["trace_id"]
            else:
                turn.trace = stored
            turn.trace.flags.append(f"after_turn_resumed: attempt {job['attempts'] + 1}")
            return turn, self.pipeline.response(turn)
        except ForgottenError:
            return None  # forget deleted the job row as well
        except Exception as exc:
            log.error("after-turn job %s cannot be resumed: %s", job["id"], exc)
            self.store.fail_job(job["id"], f"cannot resume: {type(exc).__name__}: {exc}")
            return None


__all__ = ["EPOCH", "FORGOTTEN_FLAG", "AfterTurnJobs", "epoch_of", "guard"]
