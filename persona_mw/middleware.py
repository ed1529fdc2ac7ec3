"""``Middleware``: the public entry point that ties config, plugins, store, graph and backend.

Async first (``achat``, ``astream``, ``afeedback``); the sync methods run the same coroutines
on a private event loop in a daemon thread, which also hosts the background jobs
(``persona_after_turn``) so that they outlive the call that scheduled them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator, TypeVar

from pydantic import TypeAdapter, ValidationError

from persona_mw.config import Config, StatedItem, load_config, parse_config
from persona_mw.errors import BackendError, ConfigError, PersonaError, RequestError, UnknownUserError
from persona_mw.graph import GLOBAL, PreferenceGraph, user_context_node, user_node
from persona_mw.limits import check_request, check_values, trim_prompt
from persona_mw.privacy import Redactor
from persona_mw.pipeline import Pipeline
from persona_mw.manager import PluginHost
from persona_mw.store import Edge, Store, open_store
from persona_mw.types import (
    Candidate,
    ChatRequest,
    ChatResponse,
    Feedback,
    Message,
    Profile,
    StatedFeedback,
    StatedPreference,
    StashKey,
    StreamChunk,
    TraceStep,
    Turn,
)

log = logging.getLogger("persona_mw")
T = TypeVar("T")
_feedback_adapter: TypeAdapter[Any] = TypeAdapter(Feedback)
_STARTED: StashKey[float] = StashKey("persona_mw.started")


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
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class Middleware:
    """Personalizes chat requests for known users through the configured pipeline.

    ``Middleware()`` uses the embedded defaults (the local SmolLM2 model, a SQLite file under
    the user data dir, no plugins). Pass ``store=`` / ``backend=`` objects to override the
    config's, and ``plugins={"name": PluginClass}`` to make your own plugin classes usable in
    the ``pipeline:`` list without an entry point; ``Middleware.from_yaml(path)`` reads a file.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: Store | str | None = None,
        backend: Any = None,
        autoload: bool | None = None,
        plugins: dict[str, type] | None = None,
    ) -> None:
        self.config = config or Config()
        self._role_backends: dict[str, Any] = {}
        self.host = PluginHost(autoload=self.config.autoload_plugins if autoload is None else autoload,
                               plugin_types=plugins)
        if isinstance(store, str):
            store = open_store(store)
        self.store: Store = store or open_store(self.config.store.path)
        if hasattr(self.store, "max_memories_per_owner"):
            self.store.max_memories_per_owner = self.config.limits.max_memories_per_user
        self.redactor = Redactor.from_config(self.config.privacy, self.host.detectors,
                                             where=self.config.source.where(("privacy", "redact")))
        if self.redactor and hasattr(self.store, "redact_text"):
            self.store.redact_text = self.redactor.redact  # memories written by any plugin
        self.backend = backend if backend is not None else self.make_backend("backend")
        if "backend" in self.config.resilience and not hasattr(self.backend, "policy"):  # tenants share a wrapped one
            self.backend = self._resilient("backend", self.backend)
        self.graph = PreferenceGraph(self.store, prior_strength=self.config.graph.prior_strength)
        self.host.build_pipeline(self.config)
        self.pipeline = Pipeline(self.host)
        self._apply_declared_graph()
        self._loop: _Loop | None = None
        self._jobs: set[concurrent.futures.Future[Any]] = set()
        self._jobs_lock = threading.Lock()
        self._profile_locks: dict[str, threading.Lock] = {}
        self._closed = False
        self._ready = False
        self._memory: Any = None  # persona_mw.memory.MemoryManager, created on first use
        try:
            self.host.pm.hook.persona_startup(middleware=self)
        except BaseException:
            self._shutdown()
            raise
        # After-turn jobs a crashed process left behind (claimed longer ago than any live job runs).
        if self.pipeline.has_impls("persona_after_turn") and getattr(self.store, "claim_jobs", None):
            self._background(self.aresume_jobs(stale_after_s=300.0))

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Middleware:
        return cls(load_config(path), **overrides)

    @classmethod
    def from_yaml_string(cls, text: str, **overrides: Any) -> Middleware:
        return cls(parse_config(text), **overrides)

    def make_backend(self, role: str = "backend") -> Any:
        """The backend of a role (``backend`` is the main one; other roles default to it).

        A role's backend is built once and shared by every plugin asking for it; ``close()``
        closes it with the main one.
        """
        section = self.config.backend if role == "backend" else self.config.roles.get(role)
        if section is None:
            return self.backend
        if role != "backend":
            if role not in self._role_backends:
                built = self._build_backend(role, section)
                self._role_backends[role] = self._resilient(role, built) if role in self.config.resilience else built
            return self._role_backends[role]
        return self._build_backend(role, section)

    def _resilient(self, role: str, backend: Any) -> Any:
        """``backend`` under the role's ``resilience:`` policy, its fallback roles built as well."""
        from persona_mw.resilience import ResilientBackend

        policy = self.config.resilience[role]
        fallbacks = []
        for fb in policy.fallback:
            if fb == role or (fb != "backend" and fb not in self.config.roles):
                raise ConfigError(f"{self.config.source.where(('resilience', role))}: resilience.{role}.fallback: "
                                  f"{fb!r} is not another role (roles: {', '.join(sorted(self.config.roles)) or 'none'})")
            fb_backend = self.backend if fb == "backend" else self.make_backend(fb)
            fallbacks.append((fb, getattr(fb_backend, "inner", fb_backend)))
        return ResilientBackend(backend, policy, role=role, fallbacks=fallbacks)

    def _build_backend(self, role: str, section: Any) -> Any:
        factory = self.host.backend_types.get(section.type)
        where = self.config.source.where((role,) if role == "backend" else ("roles", role))
        if factory is None:
            known = ", ".join(sorted(self.host.backend_types))
            raise ConfigError(f"{where}: unknown backend type {section.type!r} (known: {known})")
        try:
            return factory(**section.settings)
        except ConfigError as exc:
            raise ConfigError(f"{where}: backend {section.type!r}: {exc.message}", hint=exc.hint) from None
        except TypeError as exc:
            raise ConfigError(f"{where}: invalid settings for backend {section.type!r}: {exc}") from None

    def _apply_declared_graph(self) -> None:
        """Write the config's declared groups/contexts/global preferences into the store."""
        g = self.config.graph
        for kind, table in (("group", g.groups), ("context", g.contexts)):
            for gid, gc in table.items():
                self._set_declared(f"{kind}:{gid}", gc.stated)
                for member in gc.members:
                    self.store.ensure_node(user_node(member))
                    self.store.add_edge(Edge(src=user_node(member), dst=f"{kind}:{gid}", kind="member"))
        if g.global_.stated:
            self._set_declared(GLOBAL, g.global_.stated)

    def _set_declared(self, node: str, stated: list[StatedItem | str]) -> None:
        items = [StatedItem(text=s) if isinstance(s, str) else s for s in stated]
        self.store.ensure_node(node)
        prof = self.store.get_profile(node) or Profile(node=node)
        kept = [p for p in prof.stated if p.source_event != "config"]
        prof.stated = kept + [StatedPreference(text=i.text, polarity=i.polarity, source_event="config") for i in items]
        # Declared preferences are evidence about the node, as a member's stated one is.
        prof.evidence = max(prof.evidence, len(prof.stated))
        self.store.put_profile(prof)

    @property
    def model_name(self) -> str:
        return str(getattr(self.backend, "name", "persona-mw"))

    # -- chat --------------------------------------------------------------------------------

    @staticmethod
    def _request(request: ChatRequest | dict[str, Any] | None, kwargs: dict[str, Any]) -> ChatRequest:
        if isinstance(request, ChatRequest) and not kwargs:
            return request
        data = dict(request.model_dump() if isinstance(request, ChatRequest) else (request or {}))
        data.update(kwargs)
        msgs = data.get("messages")
        if isinstance(msgs, str):
            data["messages"] = [{"role": "user", "content": msgs}]
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise RequestError(f"invalid chat request: {field}: {first['msg']}", field=field) from None

    def _checked(self, request: ChatRequest | dict[str, Any] | None, kwargs: dict[str, Any]) -> ChatRequest:
        depth = self.config.limits.max_json_depth
        if isinstance(request, dict):  # named as sent, before pydantic reads (and maybe coerces) it
            check_values(request, max_depth=depth)
        check_values(kwargs, max_depth=depth)
        req = self._request(request, kwargs)
        check_request(req, self.config.limits)
        return req

    async def _backend_ready(self, turn: Turn) -> None:
        """Load a lazy backend once, off the event loop, before any plugin counts tokens with it.

        Otherwise the first turn would load the model inside whichever plugin first asked the
        tokenizer (blocking the loop, and charging the load to that plugin in the trace).
        """
        if self._ready:
            return
        loader = getattr(self.backend, "load", None)
        if loader is not None:
            t = time.perf_counter()
            await loader()
            turn.trace.timings_ms["backend_load"] = (time.perf_counter() - t) * 1000
        self._ready = True

    def _token_cap(self) -> int | None:
        """The configured bound on generated tokens (the backend's ``max_new_tokens``), if it has one."""
        cap = getattr(self.backend, "max_new_tokens", None)
        return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None

    def _new_turn(self, req: ChatRequest) -> Turn:
        # The config's cap bounds what a client asks: fewer is honoured, more is clamped (flagged).
        cap, asked = self._token_cap(), req.params.max_tokens
        clamped = cap is not None and asked is not None and asked > cap
        if clamped:
            req = req.model_copy(update={"params": req.params.model_copy(update={"max_tokens": cap})})
        turn = Turn(request=req, messages=list(req.messages))
        if clamped:
            turn.trace.flags.append(f"clamped: max_tokens {asked} -> {cap} (backend max_new_tokens)")
        turn.trace.user = req.user
        turn._counter = getattr(self.backend, "count_tokens", None)
        from persona_mw.budget import BUDGET_LIMITS_KEY

        # ``budget:`` is the one home of these (``limits.aux_*`` of older configs were moved there).
        lim = self.config.budget
        turn.stash[BUDGET_LIMITS_KEY] = (lim.aux_calls_per_request, lim.aux_seconds_per_request)
        return turn

    def job_budget(self) -> Any:
        """A fresh budget for one background job (``budget.aux_calls_per_job``), for plugins."""
        from persona_mw.budget import job_budget

        return job_budget(self.config.budget.aux_calls_per_job)

    def _policy(self) -> Any:
        return self.config.resilience.get("backend")

    async def _prepare_guarded(self, turn: Turn, run: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
        """Run the pre-call stages; with ``on_failure: unpersonalized`` a failure there (store,
        plugin, auxiliary backend) serves the request as sent, flagged in the trace."""
        try:
            return await run()
        except PersonaError as exc:
            policy = self._policy()
            # A bad request stays the caller's problem; only a failure of ours is degraded.
            if isinstance(exc, RequestError) or policy is None or policy.on_failure != "unpersonalized":
                raise
            log.warning("personalization failed, serving unpersonalized: %s", exc)
            turn.messages = list(turn.request.messages)
            turn.items = []
            turn.trace.flags.append(f"degraded: unpersonalized ({type(exc).__name__}: {exc})")
            return None

    async def _generate_guarded(self, turn: Turn, decoding: Any) -> None:
        from persona_mw.resilience import collect_notes

        with collect_notes() as notes:
            try:
                await self.pipeline.generate(turn, self.backend, decoding)
            except BackendError as exc:
                policy = self._policy()
                original = list(turn.request.messages)
                if policy is None or policy.on_failure != "unpersonalized" or turn.messages == original:
                    raise
                turn.trace.flags.append(f"degraded: unpersonalized ({type(exc).__name__}: {exc.message})")
                turn.messages = original
                await self.pipeline.generate(turn, self.backend, [])
            finally:
                turn.trace.flags.extend(n for n in notes if n not in turn.trace.flags)

    def _cancelled(self, turn: Turn, t0: float, detail: str) -> None:
        """A turn abandoned by its caller (a client that disconnected; a cancelled task): the trace is
        kept, flagged ``cancelled``, so the turn is accounted for; no answer is recorded and no
        after-turn learning is scheduled, since the user never saw the answer."""
        turn.trace.flags.append(f"cancelled: {detail}; after-turn learning not scheduled")
        turn.trace.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        try:
            # Only under a stored user (cancelled before the pipeline created it: nothing to keep),
            # so that forgetting the user deletes it too.
            if self.store.has_user(turn.request.user):
                self._save_trace(turn.trace)
        except Exception as exc:  # the caller is gone; nothing to report the failure to but the log
            log.warning("could not save the trace of cancelled turn %s: %s", turn.trace.id, exc)

    async def achat(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> ChatResponse:
        """Run one turn. ``kwargs`` are ChatRequest fields (``user=``, ``messages=`` ...).

        Cancelling the task (the server does when the client disconnects) stops the local model's
        generation at its next step; the turn's trace is kept with a ``cancelled`` flag and nothing
        is learned from it.
        """
        req = self._checked(request, kwargs)
        t0 = time.perf_counter()
        turn = self._new_turn(req)
        try:
            await self._backend_ready(turn)
            decoding = await self._prepare_guarded(
                turn, lambda: self.pipeline.prepare(turn, graph=self.graph, store=self.store, backend=self.backend))
            trim_prompt(turn, self.config.limits)
            await self._generate_guarded(turn, decoding or [])
        except asyncio.CancelledError:
            self._cancelled(turn, t0, "the caller went away before the answer was ready")
            raise
        response = self.pipeline.response(turn, self.backend)
        turn.trace.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        self._finish(turn, response)
        return response

    def chat(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> ChatResponse:
        return self._portal().run(self.achat(request, **kwargs))

    async def astream(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> AsyncIterator[StreamChunk]:
        """Run one turn, yielding the answer in pieces; the last chunk carries the trace.

        Closing the iterator early (a client that disconnected) stops generation at the next token;
        the trace is kept with a ``cancelled`` flag and nothing is learned from the turn.
        """
        req = self._checked(request, kwargs)
        t0 = time.perf_counter()
        turn = self._new_turn(req)
        sent = 0
        try:
            await self._backend_ready(turn)
            decoding = await self._prepare_guarded(
                turn, lambda: self.pipeline.prepare(turn, graph=self.graph, store=self.store, backend=self.backend))
            trim_prompt(turn, self.config.limits)
            async with contextlib.aclosing(self.pipeline.stream_candidate(turn, self.backend, decoding or [])) as it:
                async for chunk in it:
                    chunk.trace_id = turn.trace.id
                    yield chunk
                    sent += 1
        except (GeneratorExit, asyncio.CancelledError):
            self._cancelled(turn, t0, f"the stream was abandoned after {sent} chunk(s)")
            raise
        response = self.pipeline.response(turn, self.backend)
        turn.trace.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        self._finish(turn, response)
        yield StreamChunk(done=True, finish_reason=response.choices[0].finish_reason, trace=turn.trace,
                          trace_id=turn.trace.id)

    def stream(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> Iterator[StreamChunk]:
        """Sync streaming: iterate over chunks as they arrive."""
        portal = self._portal()
        agen = self.astream(request, **kwargs)
        try:
            while True:
                try:
                    yield portal.run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            portal.run(agen.aclose())

    # -- split turns, for integrations whose LLM call happens elsewhere (litellm, openai, langchain)

    async def aprepare(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> Turn:
        """Run the pre-call stages (scope, gather, rewrite); ``turn.messages`` is the prompt to send.

        The caller makes the LLM call itself, then hands the answer to ``acomplete`` so the
        post-call stages run. Decoding contributions are not collected: the LLM is remote.
        """
        turn = self._new_turn(self._checked(request, kwargs))
        turn.stash[_STARTED] = time.perf_counter()
        await self._backend_ready(turn)
        await self._prepare_guarded(turn, lambda: self.pipeline.prepare_messages(turn, graph=self.graph,
                                                                                 store=self.store))
        trim_prompt(turn, self.config.limits)
        return turn

    async def acomplete(self, turn: Turn, text: str | list[str], *, finish_reason: str | None = "stop") -> ChatResponse:
        """Finish a turn from ``aprepare`` with the answer(s) the LLM gave: trace saved, after-turn scheduled."""
        texts = [text] if isinstance(text, str) else list(text) or [""]
        turn.candidates = [Candidate(text=t, index=i, finish_reason=finish_reason) for i, t in enumerate(texts)]
        turn.selected = 0
        response = self.pipeline.response(turn, self.backend)
        turn.trace.timings_ms["total"] = (time.perf_counter() - turn.stash.get(_STARTED, time.perf_counter())) * 1000
        self._finish(turn, response)
        return response

    def prepare(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> Turn:
        return self._portal().run(self.aprepare(request, **kwargs))

    def complete(self, turn: Turn, text: str | list[str], *, finish_reason: str | None = "stop") -> ChatResponse:
        return self._portal().run(self.acomplete(turn, text, finish_reason=finish_reason))

    def _save_trace(self, trace: Any) -> None:
        if self.config.trace.store:
            self.store.save_trace(self.redactor.redact_model(trace))

    def _finish(self, turn: Turn, response: ChatResponse) -> None:
        """Store the trace and schedule ``persona_after_turn`` off the request path.

        The job is first recorded in the store (``jobs`` table, when the store has one), so a crash
        before it finishes leaves it for ``resume_jobs``; it is deleted once it succeeded.
        """
        from persona_mw.budget import BUDGET_KEY

        if BUDGET_KEY in turn.stash:  # the request's auxiliary calls, for the user to see
            turn.trace.aux_calls = turn.stash[BUDGET_KEY].as_list()
        self._save_trace(turn.trace)
        if self.pipeline.has_impls("persona_after_turn"):
            job_id = self._record_job(turn, response)
            self._background(self._after_turn(turn, response, job_id))

    def _record_job(self, turn: Turn, response: ChatResponse) -> str | None:
        add_job = getattr(self.store, "add_job", None)
        if add_job is None:
            return None
        request = turn.request.model_dump(mode="json")
        request["messages"] = self.redactor.redact_data(request["messages"])
        payload = {
            "request": request,
            "answers": self.redactor.redact_data([c.text for c in turn.candidates]),
            "selected": turn.selected,
            "finish_reason": response.choices[0].finish_reason if response.choices else "stop",
            "trace_id": turn.trace.id,
        }
        job_id = f"job-{turn.trace.id}"
        add_job(job_id, turn.request.user, "after_turn", payload)
        return job_id

    async def _after_turn(self, turn: Turn, response: ChatResponse, job_id: str | None = None) -> None:
        before = len(turn.trace.steps)
        t = time.perf_counter()
        failed: str | None = None
        try:
            await self.pipeline.collect("persona_after_turn", turn, response=response, store=self.store)
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
        if job_id is not None:
            if failed is None:
                self.store.finish_job(job_id)  # type: ignore[attr-defined]
            else:
                attempts = self.store.fail_job(job_id, failed)  # type: ignore[attr-defined]
                if attempts < self.config.limits.job_attempts:
                    turn.trace.flags.append(f"after_turn_retry_pending: attempt {attempts} failed")
        if len(turn.trace.steps) > before or failed:
            self._save_trace(turn.trace)

    async def aresume_jobs(self, stale_after_s: float = 60.0) -> int:
        """Re-run pending after-turn jobs (left by a crash, or failed fewer than ``limits.job_attempts``
        times) whose claim is older than ``stale_after_s``; returns how many were started."""
        claim = getattr(self.store, "claim_jobs", None)
        if claim is None or not self.pipeline.has_impls("persona_after_turn"):
            return 0
        jobs = claim(stale_after_s, self.config.limits.job_attempts)
        started = 0
        for job in jobs:
            try:
                p = job["payload"]
                req = ChatRequest.model_validate(p["request"])
                turn = self._new_turn(req)
                turn.scope, turn.profiles = self.graph.resolve(req)
                turn.candidates = [Candidate(text=t, index=i, finish_reason=p.get("finish_reason") or "stop")
                                   for i, t in enumerate(p["answers"] or [""])]
                turn.selected = int(p.get("selected") or 0)
                turn.trace = self.store.get_trace(p["trace_id"]) or turn.trace
                turn.trace.flags.append(f"after_turn_resumed: attempt {job['attempts'] + 1}")
                response = self.pipeline.response(turn, self.backend)
            except Exception as exc:  # a record that cannot be replayed is kept with its error, not lost
                log.error("after-turn job %s cannot be resumed: %s", job["id"], exc)
                self.store.fail_job(job["id"], f"cannot resume: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
                continue
            self._background(self._after_turn(turn, response, job["id"]))
            started += 1
        return started

    def resume_jobs(self, stale_after_s: float = 60.0) -> int:
        return self._portal().run(self.aresume_jobs(stale_after_s))

    # -- background jobs ---------------------------------------------------------------------

    def _portal(self) -> _Loop:
        if self._closed:
            raise PersonaError("this Middleware is closed")
        if self._loop is None:
            with self._jobs_lock:  # threads racing on the first sync call must share one loop
                if self._loop is None:
                    self._loop = _Loop()
        return self._loop

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        fut = self._portal().submit(coro)
        with self._jobs_lock:
            self._jobs.add(fut)
        fut.add_done_callback(self._job_done)

    def schedule(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` off the request path, on the background loop; ``drain()`` waits for it.

        For plugins (profile refits, persona inference): the coroutine logs its own failures.
        """
        self._background(coro)

    def _job_done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._jobs_lock:
            self._jobs.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("background job failed: %s", fut.exception())

    def drain(self, timeout: float | None = 30.0) -> None:
        """Wait for background jobs (memory extraction, refits) scheduled so far."""
        with self._jobs_lock:
            jobs = list(self._jobs)
        concurrent.futures.wait(jobs, timeout=timeout)

    async def adrain(self, timeout: float | None = 30.0) -> None:
        await asyncio.to_thread(self.drain, timeout)

    # -- feedback ----------------------------------------------------------------------------

    @staticmethod
    def parse_feedback(event: Feedback | dict[str, Any]) -> Feedback:
        if not isinstance(event, dict):
            return event
        try:
            return _feedback_adapter.validate_python(event)  # type: ignore[no-any-return]
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(p) for p in first["loc"]]
            if loc and loc[0] in ("choice", "rating", "edit", "stated"):  # the union's tag, not a field
                loc = loc[1:]
            field = ".".join(loc) or "kind"
            raise RequestError(f"invalid feedback: {field}: {first['msg']}", field=field) from None

    async def afeedback(self, event: Feedback | dict[str, Any] | None = None, /, **kwargs: Any) -> str:
        """Record a feedback event (append-only), update the profile, run ``persona_feedback``.

        Returns the event id. Raises ``RequestError`` naming the field for a malformed event,
        in which case nothing is stored.
        """
        if event is None or kwargs:
            data = dict(event.model_dump() if event is not None and not isinstance(event, dict) else (event or {}))
            data.update(kwargs)
            event = data
        depth = self.config.limits.max_json_depth
        if isinstance(event, dict):
            check_values(event, max_depth=depth)
        parsed = self.parse_feedback(event)
        check_values(parsed, max_depth=depth)  # before anything is stored: no half-created user
        ev = self.redactor.redact_model(parsed)
        self.store.ensure_node(user_node(ev.user))
        self.store.append_feedback(ev)
        self._apply_to_profile(ev)
        steps = await self.pipeline.feedback(ev, store=self.store, graph=self.graph)
        for s in steps:
            if s.error:
                log.warning("feedback plugin %s: %s", s.plugin, s.error)
        return ev.id

    def feedback(self, event: Feedback | dict[str, Any] | None = None, /, **kwargs: Any) -> str:
        return self._portal().run(self.afeedback(event, **kwargs))

    def state(self, text: str, polarity: str = "like", *, user: str | None = None,
              group: str | None = None, context: str | None = None) -> str | None:
        """State a preference for a user (recorded as feedback) or for a whole group."""
        if (user is None) == (group is None):
            raise RequestError("give exactly one of user= or group=", field="user")
        if user is not None:
            return self.feedback(StatedFeedback(user=user, context=context, text=text, polarity=polarity))  # type: ignore[arg-type]
        node = f"group:{group}"
        self.store.ensure_node(node)
        with self._lock_for(node):
            prof = self.store.get_profile(node) or Profile(node=node)
            prof.stated.append(StatedPreference(text=text, polarity=polarity))  # type: ignore[arg-type]
            prof.evidence += 1
            prof.updated_at = time.time()
            self.store.put_profile(prof)
        return None

    def update_profile(self, node: str, change: Callable[[Profile], None]) -> Profile:
        """Read-modify-write one node's profile under its lock (created if missing); for plugins."""
        self.store.ensure_node(node)
        with self._lock_for(node):
            prof = self.store.get_profile(node) or Profile(node=node)
            change(prof)
            prof.updated_at = time.time()
            self.store.put_profile(prof)
        return prof

    def profile_lock(self, node: str) -> threading.Lock:
        """The lock every read-modify-write of ``node``'s profile holds (core and plugins alike)."""
        return self._lock_for(node)

    def _lock_for(self, node: str) -> threading.Lock:
        with self._jobs_lock:
            return self._profile_locks.setdefault(node, threading.Lock())

    def _apply_to_profile(self, ev: Feedback) -> None:
        """The core's own reading of an event: evidence counts and stated preferences."""
        node = user_context_node(ev.user, ev.context) if ev.context else user_node(ev.user)
        if ev.context:
            self.store.ensure_node(node)
        with self._lock_for(node):
            prof = self.store.get_profile(node) or Profile(node=node)
            prof.evidence += 1
            if isinstance(ev, StatedFeedback):
                prof.stated = [p for p in prof.stated if p.text.strip().lower() != ev.text.strip().lower()]
                prof.stated.append(StatedPreference(text=ev.text, polarity=ev.polarity, source_event=ev.id,
                                                    created_at=ev.created_at))
                cap = self.config.limits.max_stated_per_user
                if len(prof.stated) > cap:  # the newest are kept; the events stay in the log
                    prof.stated = sorted(prof.stated, key=lambda p: p.created_at)[-cap:]
            prof.updated_at = time.time()
            self.store.put_profile(prof)

    async def arebuild(self, user: str) -> dict[str, Any]:
        """Rebuild a user's profiles from their append-only events."""
        self._require_user(user)
        nodes = [n.id for n in self.store.list_nodes("user_context", limit=100000) if n.id.startswith(f"user:{user}@")]
        for node in [user_node(user), *nodes]:
            with self._lock_for(node):
                old = self.store.get_profile(node)
                self.store.put_profile(Profile(node=node, prompt=old.prompt if old else None))
        events = self.store.list_feedback(user=user)
        for ev in events:
            self._apply_to_profile(ev)
            await self.pipeline.feedback(ev, store=self.store, graph=self.graph)
        return {"user": user, "events": len(events)}

    def rebuild(self, user: str) -> dict[str, Any]:
        return self._portal().run(self.arebuild(user))

    # -- profiles, export, forget ------------------------------------------------------------

    def _require_user(self, user: str) -> None:
        if not self.store.has_user(user):
            raise UnknownUserError(f"unknown user {user!r}", field="user",
                                   hint="the user appears after their first chat or feedback")

    def profile(self, user: str, context: str | None = None) -> dict[str, Any]:
        """The user's profile, the groups they inherit from and the resolved scope."""
        self._require_user(user)
        req = ChatRequest(user=user, context=context, messages=[Message(role="user", content="-")])
        scope, profiles = self.graph.resolve(req)
        return {
            "user": user,
            "scope": scope.model_dump(),
            "profiles": {n: p.model_dump() for n, p in profiles.items()},
        }

    def export_user(self, user: str) -> dict[str, Any]:
        self._require_user(user)
        return self.store.export_user(user)

    def forget(self, user: str) -> dict[str, int]:
        """Delete everything stored about and derived from ``user``.

        Rows go in one store transaction (events, memories, profiles, nodes, edges, traces, jobs);
        then ``persona_forget`` lets plugins recompute what they pooled from the user (the groups
        they belonged to) and drop anything they keep elsewhere.
        """
        self._require_user(user)
        self.drain()
        own = [user_node(user)] + [n.id for n in self.store.list_nodes("user_context", limit=100000)
                                   if n.id.startswith(f"user:{user}@")]
        linked = sorted({e.dst for n in own for e in self.store.edges_from(n)} - set(own))
        counts = self.store.forget_user(user)
        self.graph.forget_cached(user)
        if self._memory is not None:  # the in-memory index holds vectors of the rows just deleted
            self._memory.drop_user(user)
        self.host.pm.hook.persona_forget(user=user, nodes=linked, store=self.store, graph=self.graph)
        return counts

    @property
    def memory(self) -> Any:
        """Long-term memory (``persona_mw.memory.MemoryManager``): ingest, search, pinned, list, forget.

        The ``memory`` plugin configures it at startup; without the plugin it is created on first use
        with the defaults (packaged MiniLM when installed, BM25 otherwise).
        """
        if self._memory is None:
            from persona_mw.memory import MemoryManager

            self._memory = MemoryManager(self.store, graph=self.graph)
        return self._memory

    @memory.setter
    def memory(self, manager: Any) -> None:
        self._memory = manager

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        t = self.store.get_trace(trace_id)
        return t.model_dump() if t else None

    # -- lifecycle ---------------------------------------------------------------------------

    def _backends(self) -> list[Any]:
        """The main backend and every role backend built, each once."""
        out: list[Any] = []
        for b in [self.backend, *self._role_backends.values()]:
            if all(b is not o for o in out):
                out.append(b)
        return out

    async def aclose(self) -> None:
        await self.adrain()
        for backend in self._backends():
            closer = getattr(backend, "aclose", None)
            if closer is not None:
                await closer()
        self._shutdown()

    def close(self) -> None:
        if self._closed:
            return
        self.drain()
        for backend in self._backends():
            closer = getattr(backend, "aclose", None)
            if closer is not None:
                self._portal().run(closer())
        self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        if self._loop is not None:
            self._loop.stop()
        self.store.close()

    def __enter__(self) -> Middleware:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Middleware", "TraceStep"]
