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

from persona_mw.config import Config, StatedItem, default_config, load_config, parse_config
from persona_mw.embeddings import cache_scope
from persona_mw.errors import (
    BackendError,
    ConfigError,
    ForgottenError,
    PersonaError,
    RequestError,
    UnknownUserError,
)
from persona_mw.graph import GLOBAL, PreferenceGraph, user_context_node, user_node
from persona_mw.limits import bound_trace, check_request, check_values, trim_prompt
from persona_mw.nodes import context_node, group_node, is_user_node_of, kind_of, parse
from persona_mw.privacy import Redactor
from persona_mw.pipeline import Pipeline
from persona_mw.manager import PluginHost
from persona_mw.store import Edge, Store, open_store, write_guard
from persona_mw.types import (
    Candidate,
    ChatRequest,
    ChatResponse,
    Feedback,
    GenerationParams,
    Message,
    Profile,
    StatedFeedback,
    StatedPreference,
    StashKey,
    StreamChunk,
    TraceStep,
    Turn,
    validation_message,
)

log = logging.getLogger("persona_mw")
T = TypeVar("T")
_feedback_adapter: TypeAdapter[Any] = TypeAdapter(Feedback)
_STARTED: StashKey[float] = StashKey("persona_mw.started")
# Request fields a background-job record keeps as sent (ids and flags); the rest is redacted.
_JOB_KEEP = frozenset({"user", "context", "groups", "n", "stream"})
# The user's forget epoch when the turn started: its writes are refused once a forget moved it on.
_EPOCH: StashKey[int | None] = StashKey("persona_mw.forget_epoch")
FORGOTTEN_FLAG = "forgotten: the user was forgotten while this work ran; nothing of it was stored"
_PARAM_FIELDS = tuple(GenerationParams.model_fields)


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

    ``Middleware()`` uses the embedded default (``persona_mw/default.yaml``, the same one the CLI
    uses: the local SmolLM2 model, a SQLite file under the user data dir, the ``stated`` and
    ``memory`` plugins); ``Middleware(Config())`` is the bare core with no plugins. Pass
    ``store=`` / ``backend=`` objects to override the config's, and ``plugins={"name": PluginClass}`` to make your own plugin classes usable in
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
        self.config = config if config is not None else default_config()
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
        if self.redactor and hasattr(self.store, "redactor"):
            self.store.redactor = self.redactor  # memories written by any plugin
        self.backend = backend if backend is not None else self.make_backend("backend")
        if "backend" in self.config.resilience and not hasattr(self.backend, "policy"):  # tenants share a wrapped one
            self.backend = self._resilient("backend", self.backend)
        self.graph = PreferenceGraph(self.store, prior_strength=self.config.graph.prior_strength,
                                     max_groups_per_user=self.config.limits.max_groups_per_user)
        # The tenant this Middleware serves (set by persona_mw.tenancy); with the user it scopes the
        # in-process caches of user content (embeddings), so no party's cache hit is another's.
        self.tenant: str | None = None
        self.graph.request_groups_permanent = self.config.graph.request_groups == "permanent"
        self.host.build_pipeline(self.config)
        self.pipeline = Pipeline(self.host)
        self.feedback_used = self._feedback_used()
        self._apply_declared_graph()
        self._loop: _Loop | None = None
        self._jobs: set[concurrent.futures.Future[Any]] = set()
        self._jobs_lock = threading.Lock()
        self._profile_locks: dict[str, threading.Lock] = {}
        self._running_jobs: set[str] = set()  # after-turn job ids this process runs now (never re-claimed)
        self._maintenance: threading.Thread | None = None
        self._stop = threading.Event()
        self._scrub_wanted = threading.Event()
        self.maintenance_interval_s = 1.0  # pending-scrub retries; heartbeat/sweep every 10th tick
        self._closed = False
        self._ready = False
        self._memory: Any = None  # persona_mw.memory.MemoryManager, created on first use
        try:
            self.pipeline.run_blocking("persona_startup", self._run_on_loop, middleware=self)
        except BaseException:
            self._shutdown()
            raise
        # After-turn jobs a crashed process left behind: held by a process that is gone (or silent
        # longer than the lease), or claimed longer ago than any live job runs.
        if self.pipeline.has_impls("persona_after_turn") and getattr(self.store, "claim_jobs", None):
            self._background(self.aresume_jobs(stale_after_s=300.0))
        self._start_maintenance()

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

    def _feedback_used(self) -> frozenset[str] | None:
        """The feedback kinds some configured plugin uses (``feedback_kinds`` of each plugin class);
        None when a plugin does not declare them (then nothing is called unused)."""
        used: set[str] = set()
        for p in self.host.pipeline:
            kinds = getattr(p.instance, "feedback_kinds", None)
            if kinds is None:
                return None
            used.update(kinds)
        return frozenset(used)

    def unused_feedback_warning(self, kind: str) -> str | None:
        """Why a recorded ``kind`` event changes no answer, or None when a configured plugin uses it."""
        if self.feedback_used is None or kind in self.feedback_used:
            return None
        plugins = ", ".join(p.name for p in self.host.pipeline) or "none"
        hint = {"stated": "add `- use: stated` (or memory)", "choice": "add `- use: profile` (or fermi)",
                "edit": "add `- use: profile` (or fermi)", "rating": "add `- use: profile`"}.get(kind, "")
        return (f"'{kind}' feedback is recorded but no configured plugin uses it (pipeline: {plugins})"
                + (f"; {hint}" if hint else ""))

    def _flag_unused_feedback(self, turn: Turn) -> None:
        """Flag in the trace the user's own feedback that no configured plugin turns into anything."""
        if self.feedback_used is None or turn.scope is None:
            return
        me = user_node(turn.request.user)
        own = [p for n, p in turn.profiles.items() if n == me or n.startswith(me + "@")]
        stated = sum(len(p.stated) for p in own)
        other = sum(max(p.evidence - len(p.stated), 0) for p in own)
        unused = []
        if stated and "stated" not in self.feedback_used:
            unused.append(f"{stated} stated preference(s)")
        if other and not self.feedback_used & {"choice", "edit", "rating"}:
            unused.append(f"{other} choice/edit/rating event(s)")
        if unused:
            turn.trace.flags.append("unused_feedback: " + " and ".join(unused) + " recorded, but no configured plugin "
                                    "uses them")

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
        # Generation parameters are accepted at the top level too (``mw.chat(max_tokens=30)``), as the
        # OpenAI API takes them; they go into ``params``. Given in both places, ``params`` must agree.
        top = {k: data.pop(k) for k in _PARAM_FIELDS if k in data}
        if top:
            params = data.get("params")
            if params is None:
                params = {}
            elif isinstance(params, GenerationParams):
                params = params.model_dump(exclude_unset=True)
            elif not isinstance(params, dict):
                raise RequestError("invalid chat request: params: must be a mapping of generation parameters",
                                   field="params")
            for k, v in top.items():
                if k in params and params[k] != v:
                    raise RequestError(f"invalid chat request: {k}: given as {k}={v!r} and as params.{k}="
                                       f"{params[k]!r}; give it once", field=k)
            data["params"] = {**params, **top}
        msgs = data.get("messages")
        if isinstance(msgs, str):
            data["messages"] = [{"role": "user", "content": msgs}]
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise RequestError(f"invalid chat request: {field}: {validation_message(first)}", field=field) from None

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
        turn._specials = getattr(self.backend, "special_tokens", None)
        from persona_mw.budget import BUDGET_LIMITS_KEY

        # ``budget:`` is the one home of these (``limits.aux_*`` of older configs were moved there).
        lim = self.config.budget
        turn.stash[BUDGET_LIMITS_KEY] = (lim.aux_calls_per_request, lim.aux_seconds_per_request)
        turn.stash[_EPOCH] = self._epoch(req.user)
        return turn

    # -- forget epochs: work that started before a forget never writes the user back -----------

    def _epoch(self, user: str) -> int | None:
        reader = getattr(self.store, "user_epoch", None)
        return None if reader is None else int(reader(user))

    def _guard(self, turn: Turn) -> Any:
        return write_guard(turn.request.user, turn.stash.get(_EPOCH, None))

    def _forgotten_since(self, user: str, epoch: int | None) -> bool:
        return epoch is not None and self._epoch(user) != epoch

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
        except ForgottenError:
            # Forgotten while this turn was being prepared: answer the request as sent, store nothing.
            turn.messages = list(turn.request.messages)
            turn.items = []
            turn.trace.flags.append(FORGOTTEN_FLAG)
            return None
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
        with self.cache_scope(req.user), self._guard(turn):
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
            await asyncio.to_thread(self._finish, turn, response)  # store writes off the event loop
            return response

    def cache_scope(self, user: str) -> Any:
        """A context manager: caches of user content filled inside belong to this tenant's ``user``."""
        return cache_scope(f"{self.tenant or f'mw{id(self):x}'}/{user}")

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
            # The scopes are entered around each stretch without a yield: a context variable set before a
            # yield cannot be reset after it when another task resumes the generator (SSE responses).
            with self.cache_scope(req.user), self._guard(turn):
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
            with self._guard(turn):
                self._cancelled(turn, t0, f"the stream was abandoned after {sent} chunk(s)")
            raise
        with self._guard(turn):
            response = self.pipeline.response(turn, self.backend)
            turn.trace.timings_ms["total"] = (time.perf_counter() - t0) * 1000
            await asyncio.to_thread(self._finish, turn, response)
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
        with self.cache_scope(turn.request.user), self._guard(turn):
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
        with self._guard(turn):
            response = self.pipeline.response(turn, self.backend)
            turn.trace.timings_ms["total"] = (time.perf_counter() - turn.stash.get(_STARTED, time.perf_counter())) * 1000
            await asyncio.to_thread(self._finish, turn, response)
        return response

    def prepare(self, request: ChatRequest | dict[str, Any] | None = None, /, **kwargs: Any) -> Turn:
        return self._portal().run(self.aprepare(request, **kwargs))

    def complete(self, turn: Turn, text: str | list[str], *, finish_reason: str | None = "stop") -> ChatResponse:
        return self._portal().run(self.acomplete(turn, text, finish_reason=finish_reason))

    def _save_trace(self, trace: Any) -> None:
        bound_trace(trace, self.config.limits)
        res = self.config.trace.timing_resolution_ms
        if res:  # coarser timings: less for a caller to read into (trace.timing_resolution_ms)
            for step in trace.steps:
                step.ms = round(step.ms / res) * res
            trace.timings_ms = {k: round(v / res) * res for k, v in trace.timings_ms.items()}
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
        cut = [c.index for c in response.choices if c.finish_reason == "length"]
        if cut:  # the answer hit the token cap: say so rather than serve a sentence cut in half silently
            limit = turn.request.params.max_tokens or getattr(self.backend, "max_new_tokens", None)
            turn.trace.flags.append("truncated: finish_reason=length" + (f" (max_tokens={limit})" if limit else "")
                                    + (f", choices {cut}" if len(response.choices) > 1 else ""))
        self._flag_unused_feedback(turn)
        try:
            with self._guard(turn):
                self._save_trace(turn.trace)
                if self.pipeline.has_impls("persona_after_turn"):
                    job_id = self._record_job(turn, response)
                    with self._jobs_lock:
                        if job_id is not None:
                            self._running_jobs.add(job_id)
                    self._background(self._after_turn(turn, response, job_id))
        except ForgottenError:
            # DELETE /v1/users/U answered while this turn ran: its trace and job would bring U back.
            log.info("user %r was forgotten during turn %s: trace and after-turn job dropped",
                     turn.request.user, turn.trace.id)
            if FORGOTTEN_FLAG not in turn.trace.flags:
                turn.trace.flags.append(FORGOTTEN_FLAG)

    def _record_job(self, turn: Turn, response: ChatResponse) -> str | None:
        add_job = getattr(self.store, "add_job", None)
        if add_job is None:
            return None
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
            "epoch": turn.stash.get(_EPOCH, None),
        }
        job_id = f"job-{turn.trace.id}"
        add_job(job_id, turn.request.user, "after_turn", payload)
        return job_id

    async def _after_turn(self, turn: Turn, response: ChatResponse, job_id: str | None = None) -> None:
        try:
            with self.cache_scope(turn.request.user), self._guard(turn):
                await self._after_turn_guarded(turn, response, job_id)
        except ForgottenError:
            log.info("user %r was forgotten during after-turn job of trace %s: its writes were dropped",
                     turn.request.user, turn.trace.id)
        finally:
            if job_id is not None:
                with self._jobs_lock:
                    self._running_jobs.discard(job_id)

    async def _after_turn_guarded(self, turn: Turn, response: ChatResponse, job_id: str | None) -> None:
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
        if failed is not None and self._forgotten_since(turn.request.user, turn.stash.get(_EPOCH, None)):
            # forget deleted the job row too; failing it or saving the trace would only be refused
            log.info("after-turn job of trace %s stopped: user %r was forgotten meanwhile",
                     turn.trace.id, turn.request.user)
            return
        if job_id is not None:
            if failed is None:
                self.store.finish_job(job_id)  # type: ignore[attr-defined]
            else:
                attempts = self.store.fail_job(job_id, failed)  # type: ignore[attr-defined]
                if attempts < self.config.limits.job_attempts:
                    turn.trace.flags.append(f"after_turn_retry_pending: attempt {attempts} failed")
        if len(turn.trace.steps) > before or failed:
            self._save_trace(turn.trace)

    async def aresume_jobs(self, stale_after_s: float = 60.0, *, dead_only: bool = False) -> int:
        """Re-run pending after-turn jobs (left by a crash, or failed fewer than ``limits.job_attempts``
        times) whose claim is older than ``stale_after_s`` or whose holder process is dead (gone,
        or no heartbeat within the lease); returns how many were started. Jobs this process is
        running are never taken twice. ``dead_only``: only those of dead holders (the sweep)."""
        claim = getattr(self.store, "claim_jobs", None)
        if claim is None or not self.pipeline.has_impls("persona_after_turn"):
            return 0
        with self._jobs_lock:
            running = set(self._running_jobs)
        kwargs: dict[str, Any] = {"exclude": running, "dead_only": True} if dead_only else {"exclude": running}
        jobs = claim(stale_after_s, self.config.limits.job_attempts, **kwargs)
        started = 0
        for job in jobs:
            try:
                p = job["payload"]
                req = ChatRequest.model_validate(p["request"])
                turn = self._new_turn(req)
                if "epoch" in p:  # the epoch the turn saw: a forget since then drops the job's writes
                    turn.stash[_EPOCH] = p["epoch"]
                with self._guard(turn):
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
                response = self.pipeline.response(turn, self.backend)
            except ForgottenError:
                continue  # the user was forgotten since (forget deleted the job row as well)
            except Exception as exc:  # a record that cannot be replayed is kept with its error, not lost
                log.error("after-turn job %s cannot be resumed: %s", job["id"], exc)
                self.store.fail_job(job["id"], f"cannot resume: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
                continue
            with self._jobs_lock:
                self._running_jobs.add(job["id"])
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

    def _run_on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._portal().run(coro)

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
            raise RequestError(f"invalid feedback: {field}: {validation_message(first)}", field=field) from None

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
        ev = self.parse_feedback(event)
        check_values(ev, max_depth=depth)  # before anything is stored: no half-created user
        for field in ("id", "trace_id"):  # keys are stored as sent: one carrying PII is refused, not rewritten
            value = getattr(ev, field)
            found = self.redactor.kinds_in(value) if value else []
            if found:
                raise RequestError(f"invalid feedback: {field}: the id contains PII ({found[0]}); "
                                   "use an opaque id", field=field)
        ev = self.redactor.redact_model(ev)
        epoch = await asyncio.to_thread(self._epoch, ev.user)
        try:
            with write_guard(ev.user, epoch), self.cache_scope(ev.user):  # a forget from now on drops its writes
                await asyncio.to_thread(self._record_feedback, ev)  # store work off the event loop
                steps = await self.pipeline.feedback(ev, store=self.store, graph=self.graph)
        except ForgottenError:
            log.info("user %r was forgotten while feedback %s was applied: its writes were dropped", ev.user, ev.id)
            return ev.id
        for s in steps:
            if s.error:
                log.warning("feedback plugin %s: %s", s.plugin, s.error)
        unused = self.unused_feedback_warning(ev.kind)
        if unused:
            log.warning("feedback %s of user %r: %s", ev.id, ev.user, unused)
        return ev.id

    def _record_feedback(self, ev: Feedback) -> None:
        """The event's own writes, off the event loop (a store waiting on another process must not stall it)."""
        if ev.context:
            self._check_context_bound(ev.user, ev.context)
        self.store.ensure_node(user_node(ev.user))
        self.store.append_feedback(ev)
        self._apply_to_profile(ev)

    def _user_nodes(self, user: str) -> list[str]:
        """The user's own nodes (user and user@context), matched exactly (``persona_mw.nodes``)."""
        lister = getattr(self.store, "list_user_nodes", None)
        if lister is not None:
            return list(lister(user))
        return [n.id for n in self.store.list_nodes("user_context", limit=100000) if is_user_node_of(n.id, user)] + (
            [user_node(user)] if self.store.get_node(user_node(user)) else [])

    def _check_context_bound(self, user: str, context: str) -> None:
        node = user_context_node(user, context)
        if self.store.get_node(node) is not None:
            return
        have = sum(1 for n in self._user_nodes(user) if kind_of(n) == "user_context")
        cap = self.config.limits.max_contexts_per_user
        if have >= cap:
            raise RequestError(f"user {user!r} already has feedback in {have} contexts (limit {cap})",
                               field="context", hint="raise limits.max_contexts_per_user")

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
            cap = self.config.limits.max_stated_per_group
            if len(prof.stated) > cap:  # the newest are kept
                prof.stated = sorted(prof.stated, key=lambda p: p.created_at)[-cap:]
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
        nodes = [n for n in self._user_nodes(user) if n != user_node(user)]
        for node in [user_node(user), *nodes]:
            with self._lock_for(node):
                old = self.store.get_profile(node)
                self.store.put_profile(Profile(node=node, prompt=old.prompt if old else None))
        events = self.store.list_feedback(user=user)
        with self.cache_scope(user):
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

    def forget(self, user: str) -> dict[str, Any]:
        """Delete everything stored about and derived from ``user``.

        Rows go in one store transaction (events, memories, profiles, nodes, edges, traces, jobs),
        which also moves the user's forget epoch on: work for the user that started before (a turn
        generating, an after-turn job, a feedback event) can no longer write anything of them.
        Then ``persona_forget`` lets plugins recompute what they pooled from the user (the groups
        they belonged to) and drop anything they keep elsewhere. Returns the rows deleted per table,
        ``scrubbed`` (the deleted text is gone from the database and WAL files: False while another
        connection holds an older snapshot; retried in the background) and ``pending_scrub``.
        """
        self._require_user(user)
        own = self._user_nodes(user)
        if user_node(user) not in own:
            own.insert(0, user_node(user))
        linked = sorted({e.dst for n in own for e in self.store.edges_from(n)} - set(own))
        # The contexts the user's nodes name: their context nodes may exist only because of this user.
        contexts = {context_node(parse(n).name or "") for n in own if kind_of(n) == "user_context"}
        counts = self.store.forget_user(user)
        self.graph.forget_cached(user)
        if self._memory is not None:  # the in-memory index holds vectors of the rows just deleted
            self._memory.drop_user(user)
        self.pipeline.run_blocking("persona_forget", self._run_on_loop, user=user, nodes=linked, store=self.store,
                                   graph=self.graph)
        counts["orphan_nodes"] = self._prune_orphans(sorted(set(linked) | contexts))
        scrub = getattr(self.store, "scrub", None)
        scrubbed = True if scrub is None else bool(scrub())
        pending = int(self.store.pending_scrub()) if hasattr(self.store, "pending_scrub") else 0
        if not scrubbed:
            log.warning("forget of %r: rows deleted, but the checkpoint was busy (another connection holds an "
                        "older snapshot, or writes right now), so the text stays in the database/WAL files "
                        "until it succeeds; retrying in the background", user)
            self._scrub_wanted.set()
        return {**counts, "scrubbed": scrubbed, "pending_scrub": pending}

    async def aforget(self, user: str) -> dict[str, Any]:
        """``forget`` in a worker thread: the event loop keeps serving other requests meanwhile."""
        return await asyncio.to_thread(self.forget, user)

    def _prune_orphans(self, nodes: list[str]) -> int:
        """Delete the group/context nodes among ``nodes`` that nothing holds: not declared in the
        config, no member or edge left, no memory, no stated preference of their own."""
        prune = getattr(self.store, "prune_node", None)
        if prune is None:
            return 0
        g = self.config.graph
        declared = {group_node(x) for x in g.groups} | {context_node(x) for x in g.contexts}
        return sum(1 for n in nodes
                   if n not in declared and kind_of(n) in ("group", "context") and prune(n))

    # -- memberships -------------------------------------------------------------------------

    def _valid_ids(self, user: str, group: str) -> None:
        import re

        from persona_mw.types import ID_PATTERN

        for field, value in (("user", user), ("group", group)):
            if not isinstance(value, str) or not re.match(ID_PATTERN, value):
                raise RequestError(f"invalid {field} id {value!r}: expected {ID_PATTERN}", field=field)

    def join(self, user: str, group: str) -> dict[str, Any]:
        """Make ``user`` a permanent member of ``group`` (request ``groups`` last one request only).

        Refused past ``limits.max_groups_per_user`` memberships (``RequestError`` naming ``group``).
        """
        self._valid_ids(user, group)
        with self._lock_for(user_node(user)):
            added = self.graph.join(user, group)
        self.graph.forget_cached(user)
        return {"user": user, "group": group, "member": True, "changed": added,
                "groups": sorted(self.graph.groups_of(user))}

    def leave(self, user: str, group: str) -> dict[str, Any]:
        """End ``user``'s membership of ``group``; a group node nothing else holds is deleted.

        A membership declared in the config (``graph.groups.<g>.members``) comes back at the next start.
        """
        self._valid_ids(user, group)
        self._require_user(user)
        with self._lock_for(user_node(user)):
            removed = self.graph.leave(user, group)
        if removed:
            self._prune_orphans([group_node(group)])
        return {"user": user, "group": group, "member": False, "changed": removed,
                "groups": sorted(self.graph.groups_of(user))}

    async def ajoin(self, user: str, group: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.join, user, group)

    async def aleave(self, user: str, group: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.leave, user, group)

    def groups(self, user: str) -> list[str]:
        """The groups ``user`` is a permanent member of."""
        self._require_user(user)
        return sorted(self.graph.groups_of(user))

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

    def _start_maintenance(self) -> None:
        """A daemon thread: retries pending forget scrubs; with after-turn jobs, renews this process's
        job lease (heartbeat) and takes over the jobs of holders that died."""
        jobs = self.pipeline.has_impls("persona_after_turn") and hasattr(self.store, "heartbeat")
        if not jobs and not hasattr(self.store, "scrub"):
            return
        if getattr(self.store, "pending_scrub", lambda: 0)():
            self._scrub_wanted.set()
        self._maintenance = threading.Thread(target=self._maintain, args=(jobs,), name="persona-mw-maintenance",
                                             daemon=True)
        self._maintenance.start()

    def _maintain(self, jobs: bool) -> None:
        tick = 0
        while not self._stop.wait(self.maintenance_interval_s):
            try:
                if self._scrub_wanted.is_set() and self.store.scrub():  # type: ignore[attr-defined]
                    self._scrub_wanted.clear()
                    if self.store.pending_scrub():  # type: ignore[attr-defined]  # a forget meanwhile
                        self._scrub_wanted.set()
                    else:
                        log.info("pending forget scrub finished: the deleted text is gone from the files")
                if jobs and tick % 10 == 0:
                    self.store.heartbeat()  # type: ignore[attr-defined]
                    if tick:
                        self._background(self.aresume_jobs(dead_only=True))
            except Exception as exc:  # a store hiccup: the next tick tries again
                if self._stop.is_set():
                    return
                log.warning("maintenance (scrub/heartbeat) failed: %s", exc)
            tick += 1

    def _shutdown(self) -> None:
        self._closed = True
        self._stop.set()
        if self._maintenance is not None and self._maintenance is not threading.current_thread():
            self._maintenance.join(timeout=5)
        if self._loop is not None:
            self._loop.stop()
        self.store.close()

    def __enter__(self) -> Middleware:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Middleware", "TraceStep"]
