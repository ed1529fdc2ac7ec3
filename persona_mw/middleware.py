"""``Middleware``: the public entry point, a facade of the public verbs over the parts doing the work
(README "Architecture", docs/architecture.md). Plugins see a ``PluginContext``, never this class.
Async first: each sync verb runs its async twin on the private loop (``runtime.sync_verb``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Coroutine, Iterator

from persona_mw.backends import BackendRegistry
from persona_mw.config import Config, default_config, load_config, parse_config
from persona_mw.context import PerPlugin, PluginContext
from persona_mw.embeddings import cache_scope
from persona_mw.errors import PersonaError, RequestError
from persona_mw.graph import PreferenceGraph
from persona_mw.jobs import AfterTurnJobs
from persona_mw.manager import PluginHost
from persona_mw.pipeline import Pipeline, RequestLike, parse_feedback
from persona_mw.privacy import Redactor
from persona_mw.profiles import ProfileService, detached
from persona_mw.runtime import Runtime, forward, sync_verb
from persona_mw.store import Store, open_store
from persona_mw.types import ChatResponse, Feedback, StatedFeedback, StreamChunk, TraceStep, Turn
from persona_mw.users import UserService


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
        tenant: str | None = None,
        run_jobs: bool | None = None,
    ) -> None:
        self.config = config if config is not None else default_config()
        self.host = PluginHost(autoload=self.config.autoload_plugins if autoload is None else autoload,
                               plugin_types=plugins)
        self.store: Store = open_store(store) if isinstance(store, str) else store or open_store(self.config.store.path)
        try:
            self.store.max_memories_per_owner = self.config.limits.max_memories_per_user
            self.redactor = Redactor.from_config(self.config.privacy, self.host.detectors,
                                                 where=self.config.source.where(("privacy", "redact")))
            if self.redactor:
                self.store.redactor = self.redactor  # memories written by any plugin
            self.backends = BackendRegistry(self.config, self.host, backend)
            self._owns_backends = tenant is None  # a tenant's backends are its base's to close
            self.graph = PreferenceGraph(self.store, prior_strength=self.config.graph.prior_strength,
                                         max_groups_per_user=self.config.limits.max_groups_per_user)
            # The tenant this Middleware serves (``for_tenant``); with the user it scopes the in-process
            # caches of user content (embeddings), so no party's cache hit is another's.
            self.tenant = tenant
            self.graph.request_groups_permanent = self.config.graph.request_groups == "permanent"
            self.host.build_pipeline(self.config)
            self.runtime = Runtime()
            self.profiles = ProfileService(self.store, self.config)
            self.pipeline = Pipeline(self.host)
            self.jobs = AfterTurnJobs(config=self.config, store=self.store, graph=self.graph, redactor=self.redactor,
                                      pipeline=self.pipeline, runtime=self.runtime, cache_scope=self.cache_scope)
            # False (``server.run_jobs``, ``serve --no-jobs``): after-turn jobs are left to ``persona-mw worker``
            self.jobs.run_here = self.config.server.run_jobs if run_jobs is None else run_jobs
            self.pipeline.bind(config=self.config, store=self.store, graph=self.graph, backends=self.backends,
                               profiles=self.profiles, jobs=self.jobs, redactor=self.redactor, cache_scope=self.cache_scope)
            self.users = UserService(config=self.config, store=self.store, graph=self.graph, profiles=self.profiles,
                                     pipeline=self.pipeline, runtime=self.runtime, memory=lambda: self._memory)
            self.feedback_used = self.pipeline.feedback_used
            self.profiles.apply_declared_graph()
        except BaseException:
            if store is None or isinstance(store, str):  # ours: a failed start leaves no open store
                self.store.close()
            raise
        self._memory: Any = None  # persona_mw.memory.MemoryManager, created on first use
        self._start()

    def _start(self) -> None:
        """``persona_startup`` (each plugin gets its ``PluginContext``; old plugins still the Middleware),
        then resumption of after-turn jobs a crashed process left, then the maintenance thread."""
        try:
            self.pipeline.run_blocking("persona_startup", self.runtime.run,
                                       ctx=PerPlugin(lambda name: PluginContext(self, name)), middleware=self)
        except BaseException:
            self._shutdown()
            raise
        # Jobs a crashed process left behind (after-turn work, a feedback event's effects): held by a
        # process that is gone (or silent longer than the lease), or claimed longer ago than any live job runs.
        if self.jobs.run_here:
            self.runtime.background(self.jobs.aresume_jobs(stale_after_s=300.0))
        self.runtime.start_maintenance(self.store, jobs=self.jobs.run_here,
                                       sweep=lambda: self.jobs.aresume_jobs(dead_only=True))

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Middleware:
        return cls(load_config(path), **overrides)

    @classmethod
    def from_yaml_string(cls, text: str, **overrides: Any) -> Middleware:
        return cls(parse_config(text), **overrides)

    def for_tenant(self, tenant: str, store_path: str | None = None, config: Config | None = None) -> Middleware:
        """A Middleware for ``tenant`` with its own store (``store_path``, else ``store.for_tenant``) and
        config (else this one's with ``privacy.tenants.<tenant>``), sharing this one's backends (left open)."""
        if config is None:
            config = self.config.model_copy(deep=True)
            config._source = self.config._source
            config.privacy = config.privacy.for_tenant(tenant)
        store: Store | str = store_path if store_path is not None else self.store.for_tenant(tenant)
        config.store.path = store if isinstance(store, str) else store.path
        return type(self)(config, store=store, backend=self.backend, autoload=self.host.autoloaded,
                          plugins=dict(self.host.plugin_types), tenant=tenant, run_jobs=self.jobs.run_here)

    @property
    def backend(self) -> Any:
        """The main backend (``backend:``), under its ``resilience:`` policy when it has one."""
        return self.backends.main

    @property
    def model_name(self) -> str:
        return str(getattr(self.backend, "name", "persona-mw"))

    make_backend = forward("backends.build", BackendRegistry.build)
    update_profile = forward("profiles.update", ProfileService.update)
    profile_lock = forward("profiles.lock", ProfileService.lock)
    unused_feedback_warning = forward("pipeline.unused_feedback_warning", Pipeline.unused_feedback_warning)
    job_budget = forward("jobs.job_budget", AfterTurnJobs.job_budget)
    parse_feedback = staticmethod(parse_feedback)

    def plugin(self, name: str) -> Any:
        """The instance of the ``pipeline:`` entry named ``name`` (``PersonaError`` when there is none)."""
        for p in self.host.pipeline:
            if p.name == name:
                return p.instance
        raise PersonaError(f"no plugin named {name!r} in this pipeline")

    def cache_scope(self, user: str) -> Any:
        """A context manager: caches of user content filled inside belong to this tenant's ``user``."""
        return cache_scope(f"{self.tenant or f'mw{id(self):x}'}/{user}")

    # -- turns -------------------------------------------------------------------------------

    async def achat(self, request: RequestLike = None, /, **kwargs: Any) -> ChatResponse:
        """Run one turn (``kwargs``: ChatRequest fields). Cancelling the task stops local generation at
        its next step; the trace is kept with a ``cancelled`` flag and nothing is learned from the turn."""
        return await self.pipeline.chat(request, kwargs)

    def astream(self, request: RequestLike = None, /, **kwargs: Any) -> AsyncIterator[StreamChunk]:
        """Run one turn, yielding the answer in pieces; the last chunk carries the trace. Closing the
        iterator early stops generation at the next token (trace flagged ``cancelled``, nothing learned)."""
        return self.pipeline.stream(request, kwargs)

    def stream(self, request: RequestLike = None, /, **kwargs: Any) -> Iterator[StreamChunk]:
        """Sync streaming: iterate over chunks as they arrive."""
        return self.runtime.iterate(self.pipeline.stream(request, kwargs))

    async def aprepare(self, request: RequestLike = None, /, **kwargs: Any) -> Turn:
        """Run the pre-call stages (scope, gather, rewrite); ``turn.messages`` is the prompt to send.

        The caller makes the LLM call itself, then hands the answer to ``acomplete`` so the
        post-call stages run. Decoding contributions are not collected: the LLM is remote.
        """
        return await self.pipeline.prepare(request, kwargs)

    async def acomplete(self, turn: Turn, text: str | list[str], *, finish_reason: str | None = "stop") -> ChatResponse:
        """Finish a turn from ``aprepare`` with the answer(s) the LLM gave: trace saved, after-turn scheduled."""
        texts = [text] if isinstance(text, str) else list(text) or [""]
        return await self.pipeline.complete(turn, texts, finish_reason)

    chat = sync_verb(achat)
    prepare = sync_verb(aprepare)
    complete = sync_verb(acomplete)

    # -- feedback and profiles ---------------------------------------------------------------

    async def afeedback(self, event: Feedback | dict[str, Any] | None = None, /, **kwargs: Any) -> str:
        """Record a feedback event (append-only), update the profile, run ``persona_feedback``.

        Returns the event id. Raises ``RequestError`` naming the field for a malformed event,
        in which case nothing is stored.
        """
        return await self.pipeline.record_feedback(event, kwargs)

    feedback = sync_verb(afeedback)

    async def arebuild(self, user: str) -> dict[str, Any]:
        """Rebuild a user's profiles from their append-only events."""
        return await self.users.arebuild(user)

    rebuild = sync_verb(arebuild)

    def state(self, text: str, polarity: str = "like", *, user: str | None = None,
              group: str | None = None, context: str | None = None) -> str | None:
        """State a preference for a user (recorded as feedback) or for a whole group."""
        if (user is None) == (group is None):
            raise RequestError("give exactly one of user= or group=", field="user")
        if user is not None:
            return self.feedback(StatedFeedback(user=user, context=context, text=text, polarity=polarity))  # type: ignore[arg-type]
        self.profiles.state_for_group(str(group), text, polarity)
        return None

    async def astate(self, text: str, polarity: str = "like", *, user: str | None = None,
                     group: str | None = None, context: str | None = None) -> str | None:
        return await asyncio.to_thread(self.state, text, polarity, user=user, group=group, context=context)

    profile = forward("users.profile", UserService.profile)
    aprofile = forward("users.aprofile", UserService.aprofile)
    export_user = forward("users.export_user", UserService.export_user)
    aexport_user = forward("users.aexport_user", UserService.aexport_user)
    forget = forward("users.forget", UserService.forget)
    aforget = forward("users.aforget", UserService.aforget)
    join = forward("users.join", UserService.join)
    leave = forward("users.leave", UserService.leave)
    ajoin = forward("users.ajoin", UserService.ajoin)
    aleave = forward("users.aleave", UserService.aleave)
    groups = forward("users.groups", UserService.groups)
    agroups = forward("users.agroups", UserService.agroups)
    trace = forward("users.trace", UserService.trace)
    atrace = forward("users.atrace", UserService.atrace)

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

    def provide_memory(self, manager: Any) -> None:
        """Install ``manager`` as this Middleware's memory unless one is installed already (plugins)."""
        if self._memory is None:
            self._memory = manager

    # -- background work and lifecycle -------------------------------------------------------

    async def aresume_jobs(self, stale_after_s: float = 60.0, *, dead_only: bool = False) -> int:
        """Re-run pending after-turn jobs left by a crash or failed (see ``AfterTurnJobs.aresume_jobs``)."""
        return await self.jobs.aresume_jobs(stale_after_s, dead_only=dead_only)

    resume_jobs = sync_verb(aresume_jobs)

    def schedule(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` off the request path, on the background loop; ``drain()`` waits for it.

        For plugins (profile refits, persona inference): the coroutine logs its own failures. Work
        scheduled while a feedback event is applied is not part of it: its profile writes carry no mark
        of the event (``persona_mw.profiles.detached``).
        """
        self.runtime.background(detached(coro))

    drain = forward("runtime.drain", Runtime.drain)
    adrain = forward("runtime.adrain", Runtime.adrain)

    async def aclose(self) -> None:
        await self.adrain()
        if self._owns_backends:
            await self.backends.aclose()
        self._shutdown()

    def close(self) -> None:
        if self.runtime.closed:
            return
        self.drain()
        if self._owns_backends:
            self.runtime.run(self.backends.aclose())
        self._shutdown()

    @property
    def closed(self) -> bool:
        return self.runtime.closed

    def _shutdown(self) -> None:
        self.runtime.shutdown()
        self.pipeline.stop_threads()
        self.store.close()

    def __enter__(self) -> Middleware:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Middleware", "TraceStep"]
