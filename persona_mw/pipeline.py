"""``Pipeline``: the whole of one turn (chat, stream, the split prepare/complete) and of one
feedback event, through the hooks in YAML order.

Every entry path starts the same way (``begin``: the request checked and clamped, the backend
loaded, scope/gather/rewrite run under the plugin policies and the ``on_failure:
unpersonalized`` degradation, the prompt trimmed) and ends the same way (``finish``: flags,
the trace stored, ``persona_after_turn`` scheduled by ``AfterTurnJobs``). Which stages each
path runs is the stage table's ``paths`` (``persona_mw.stages``); hooks are called by the
``HookRunner`` this class extends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Callable, TypeVar

from pydantic import TypeAdapter, ValidationError

from persona_mw import stages
from persona_mw.errors import BackendError, ForgottenError, PersonaError, PluginError, RequestError
from persona_mw.hookspecs import TURN_STAGES
from persona_mw.jobs import EPOCH, FORGOTTEN_FLAG, epoch_of, guard
from persona_mw.limits import check_request, check_values, trim_prompt
from persona_mw.nodes import user_node
from persona_mw.profiles import WRITER, applying
from persona_mw.manager import display_name
from persona_mw.runner import HookRunner
from persona_mw.stages import describe_items
from persona_mw.store import write_guard
from persona_mw.types import (
    Candidate,
    ChatRequest,
    ChatResponse,
    Decoding,
    Feedback,
    GenerationParams,
    Profile,
    StashKey,
    StreamChunk,
    TraceStep,
    Turn,
    Usage,
    validation_message,
)

if TYPE_CHECKING:
    from persona_mw.backends import BackendRegistry
    from persona_mw.config import Config
    from persona_mw.graph import PreferenceGraph
    from persona_mw.jobs import AfterTurnJobs
    from persona_mw.privacy import Redactor
    from persona_mw.profiles import ProfileService
    from persona_mw.store import Store

log = logging.getLogger("persona_mw.pipeline")
T = TypeVar("T")
_STARTED: StashKey[float] = StashKey("persona_mw.started")
_PARAM_FIELDS = tuple(GenerationParams.model_fields)
_feedback_adapter: TypeAdapter[Any] = TypeAdapter(Feedback)
RequestLike = ChatRequest | dict[str, Any] | None


def parse_request(request: RequestLike, kwargs: dict[str, Any]) -> ChatRequest:
    """A ``ChatRequest`` from a model, a dict and/or keyword fields; ``RequestError`` naming the field."""
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
        raise RequestError(f"invalid chat request: {field}: {validation_message(dict(first))}", field=field) from None


def parse_feedback(event: Feedback | dict[str, Any]) -> Feedback:
    """A ``Feedback`` event from a model or a dict; ``RequestError`` naming the field."""
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
        raise RequestError(f"invalid feedback: {field}: {validation_message(dict(first))}", field=field) from None


class Pipeline(HookRunner):
    """The stages of a turn and of a feedback event over one PluginHost. ``Middleware`` owns one and
    ``bind``s it to the parts a turn touches (config, store, graph, backends, profiles, jobs)."""

    def bind(self, *, config: Config, store: Store, graph: PreferenceGraph, backends: BackendRegistry,
             profiles: ProfileService, jobs: AfterTurnJobs, redactor: Redactor,
             cache_scope: Callable[[str], Any]) -> None:
        self.config, self.store, self.graph, self.backends = config, store, graph, backends
        self.profiles, self.jobs, self.redactor, self.cache_scope = profiles, jobs, redactor, cache_scope
        self.feedback_used = self._feedback_used()
        self._ready = False

    @property
    def backend(self) -> Any:
        return self.backends.main

    # -- the stages --------------------------------------------------------------------------

    async def prepare_messages(self, turn: Turn) -> None:
        """The stages that shape the prompt: scope, gather, rewrite (``turn.messages`` is the result)."""
        t = time.perf_counter()
        graph = self.graph
        scope = await self.firstresult("persona_resolve_scope", turn, graph=graph)
        # Store and graph work runs in a worker thread, never on the event loop (one user's large
        # neighbourhood must not stall every other request). The request's groups are scope for
        # this request only (``ensure_request``), unless ``graph.request_groups: permanent``.
        ensure = getattr(graph, "ensure_request", None) if not getattr(graph, "request_groups_permanent", False) else None
        await asyncio.to_thread(ensure or graph.ensure_user, turn.request)
        if scope is None:
            scope, profiles = await asyncio.to_thread(graph.resolve, turn.request)
        else:
            # A plugin chose the nodes: load just their profiles (empty ones for nodes not stored yet).
            stored = await asyncio.to_thread(graph.store.get_profiles, scope.node_ids)
            profiles = {n: stored.get(n) or Profile(node=n) for n in scope.node_ids}
        turn.scope = scope
        turn.profiles = profiles
        turn.trace.granularity = scope.granularity
        turn.trace.evidence = dict(scope.evidence)
        turn.trace.timings_ms["scope"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        for items in await self.collect("persona_gather", turn, store=self.store):
            turn.items.extend(items)
        turn.trace.timings_ms["gather"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        turn.messages = await self.chain("persona_rewrite", turn, "messages", list(turn.messages))
        turn.trace.timings_ms["rewrite"] = (time.perf_counter() - t) * 1000

    async def generate(self, turn: Turn, decoding: list[Decoding]) -> None:
        """Stages from generation to correction; fills ``turn.candidates`` and ``turn.selected``."""
        req, backend = turn.request, self.backend
        t = time.perf_counter()
        cands = await self.firstresult(
            "persona_generate", turn, backend=backend, messages=turn.messages, n=req.n, decoding=decoding
        )
        if cands is None:
            cands = await backend.generate(turn.messages, n=req.n, params=req.params, decoding=decoding)
        if not cands:
            raise PersonaError("the backend returned no candidates")
        turn.candidates = list(cands)
        turn.trace.timings_ms["generate"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        if len(turn.candidates) > 1:
            for scores in await self.collect("persona_score", turn, candidates=turn.candidates):
                turn.scores.update(scores)
        picked = await self.firstresult("persona_select", turn, candidates=turn.candidates, scores=turn.scores)
        if picked is None:
            picked = _default_select(turn.scores, len(turn.candidates))
        if not 0 <= picked < len(turn.candidates):
            raise PluginError(f"persona_select returned index {picked} for {len(turn.candidates)} candidates",
                              plugin="persona_select", hook="persona_select")
        turn.selected = picked
        if len(turn.candidates) > 1:
            turn.trace.scores = {k: list(v) for k, v in turn.scores.items()}
            turn.trace.selected = picked
        best = await self.chain("persona_correct", turn, "candidate", turn.candidates[picked])
        turn.candidates[picked] = best
        turn.trace.timings_ms["select"] = (time.perf_counter() - t) * 1000

    def needs_full_answer(self, turn: Turn) -> bool:
        """Whether the turn must see whole candidates (so streaming cannot pass tokens through)."""
        return turn.request.n > 1 or any(
            self.has_impls(s) for s in ("persona_generate", "persona_score", "persona_select", "persona_correct")
        )

    def response(self, turn: Turn) -> ChatResponse:
        backend = self.backend
        chosen = turn.candidates[turn.selected]
        others = [c for i, c in enumerate(turn.candidates) if i != turn.selected]
        choices = [chosen] + (others if turn.request.n > 1 else [])
        choices = [c.model_copy(update={"index": i}) for i, c in enumerate(choices)]
        prompt_tokens = sum(backend.count_tokens(m.text) for m in turn.messages)
        completion = sum(c.tokens or backend.count_tokens(c.text) for c in choices)
        return ChatResponse(
            model=turn.request.model or str(getattr(backend, "name", "")),
            choices=choices,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                        total_tokens=prompt_tokens + completion),
            trace=turn.trace,
            messages=turn.messages,
        )

    async def stream_candidate(self, turn: Turn, decoding: list[Decoding]) -> AsyncGenerator[StreamChunk, None]:
        """Stream the answer: token pieces straight from the backend, or the finished answer."""
        t = time.perf_counter()
        if self.needs_full_answer(turn):
            await self.generate(turn, decoding)
            text = turn.candidates[turn.selected].text
            # Whole words, so clients render progressively even though the answer is complete.
            pieces = text.split(" ")
            for i, piece in enumerate(pieces):
                yield StreamChunk(delta=piece if i == 0 else " " + piece)
            return
        parts: list[str] = []
        # Closed explicitly when abandoned, so the backend stops generating now, not at garbage collection.
        async with closing(self.backend.stream(turn.messages, params=turn.request.params, decoding=decoding)) as pieces:
            async for piece in pieces:
                parts.append(piece)
                yield StreamChunk(delta=piece)
        turn.candidates = [Candidate(text="".join(parts))]
        turn.selected = 0
        turn.trace.timings_ms["generate"] = (time.perf_counter() - t) * 1000

    async def feedback(self, event: Feedback) -> list[TraceStep]:
        """Run ``persona_feedback``; returns the steps (errors of skipped plugins included)."""
        holder = Turn.model_construct()  # a bare trace holder for policy bookkeeping
        from persona_mw.types import Trace

        holder.trace = Trace()
        object.__setattr__(holder, "_notes", [])
        for stage in stages.on_path("feedback"):
            for impl in self.impls(stage):
                token = WRITER.set(display_name(impl.plugin_name))  # its profile writes are marked as this plugin's
                try:
                    await self._call(stage, impl, holder, {"event": event, "store": self.store, "graph": self.graph})
                finally:
                    WRITER.reset(token)
        return holder.trace.steps

    async def apply_feedback(self, ev: Feedback, seq: int) -> list[TraceStep]:
        """Every effect of the stored event ``seq`` on profiles: the core's, then ``persona_feedback``.
        Safe to repeat (a replay after a crash): each profile write is made once (``applying``)."""
        with applying(seq):
            await asyncio.to_thread(self.profiles.apply_event, ev)
            return await self.feedback(ev)

    # -- one turn: the start every entry path shares ------------------------------------------

    def new_turn(self, req: ChatRequest) -> Turn:
        """A turn for ``req``: max_tokens clamped to the backend's cap (flagged), budgets, forget epoch."""
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
        turn.stash[EPOCH] = epoch_of(self.store, req.user)
        return turn

    def checked_turn(self, request: RequestLike, kwargs: dict[str, Any]) -> Turn:
        """Parse and bound the request (``limits``), then start its turn."""
        depth = self.config.limits.max_json_depth
        if isinstance(request, dict):  # named as sent, before pydantic reads (and maybe coerces) it
            check_values(request, max_depth=depth)
        check_values(kwargs, max_depth=depth)
        req = parse_request(request, kwargs)
        check_request(req, self.config.limits)
        turn = self.new_turn(req)
        turn.stash[_STARTED] = time.perf_counter()
        return turn

    def _token_cap(self) -> int | None:
        """The configured bound on generated tokens (the backend's ``max_new_tokens``), if it has one."""
        cap = getattr(self.backend, "max_new_tokens", None)
        return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None

    async def begin(self, turn: Turn, path: str) -> list[Decoding]:
        """The start of every entry path: the backend loaded, the pre-call stages of ``path`` run
        (degraded to the request as sent under ``on_failure: unpersonalized``), the prompt trimmed.
        Call inside ``cache_scope`` and ``guard``."""
        await self._backend_ready(turn)
        decoding: list[Decoding] | None = None
        try:
            await self.prepare_messages(turn)
            if "persona_decoding" in stages.on_path(path):
                decoding = await self.collect("persona_decoding", turn, backend=self.backend)
        except ForgottenError:
            # Forgotten while this turn was being prepared: answer the request as sent, store nothing.
            self._unpersonalized(turn, FORGOTTEN_FLAG)
        except PersonaError as exc:
            policy = self._policy()
            # A bad request stays the caller's problem; only a failure of ours is degraded.
            if isinstance(exc, RequestError) or policy is None or policy.on_failure != "unpersonalized":
                raise
            log.warning("personalization failed, serving unpersonalized: %s", exc)
            self._unpersonalized(turn, f"degraded: unpersonalized ({type(exc).__name__}: {exc})")
        trim_prompt(turn, self.config.limits)
        return decoding or []

    @staticmethod
    def _unpersonalized(turn: Turn, flag: str) -> None:
        turn.messages = list(turn.request.messages)
        turn.items = []
        turn.trace.flags.append(flag)

    def _policy(self) -> Any:
        return self.config.resilience.get("backend")

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

    async def _generate_guarded(self, turn: Turn, decoding: list[Decoding]) -> None:
        from persona_mw.resilience import collect_notes

        with collect_notes() as notes:
            try:
                await self.generate(turn, decoding)
            except BackendError as exc:
                policy = self._policy()
                original = list(turn.request.messages)
                if policy is None or policy.on_failure != "unpersonalized" or turn.messages == original:
                    raise
                turn.trace.flags.append(f"degraded: unpersonalized ({type(exc).__name__}: {exc.message})")
                turn.messages = original
                await self.generate(turn, [])
            finally:
                turn.trace.flags.extend(n for n in notes if n not in turn.trace.flags)

    # -- the entry paths ----------------------------------------------------------------------

    async def chat(self, request: RequestLike, kwargs: dict[str, Any]) -> ChatResponse:
        """The ``chat`` path: every turn stage, then ``finish``."""
        turn = self.checked_turn(request, kwargs)
        with self.cache_scope(turn.request.user), guard(turn):
            try:
                decoding = await self.begin(turn, "chat")
                await self._generate_guarded(turn, decoding)
            except asyncio.CancelledError:
                self._cancelled(turn, "the caller went away before the answer was ready")
                raise
            return await self.finish(turn)

    async def stream(self, request: RequestLike, kwargs: dict[str, Any]) -> AsyncGenerator[StreamChunk, None]:
        """The ``stream`` path: pieces as they come; the last chunk carries the trace."""
        turn = self.checked_turn(request, kwargs)
        sent = 0
        try:
            # The scopes are entered around each stretch without a yield: a context variable set before a
            # yield cannot be reset after it when another task resumes the generator (SSE responses).
            with self.cache_scope(turn.request.user), guard(turn):
                decoding = await self.begin(turn, "stream")
            async with contextlib.aclosing(self.stream_candidate(turn, decoding)) as it:
                async for chunk in it:
                    chunk.trace_id = turn.trace.id
                    yield chunk
                    sent += 1
        except (GeneratorExit, asyncio.CancelledError):
            with guard(turn):
                self._cancelled(turn, f"the stream was abandoned after {sent} chunk(s)")
            raise
        with guard(turn):
            response = await self.finish(turn)
        yield StreamChunk(done=True, finish_reason=response.choices[0].finish_reason, trace=turn.trace,
                          trace_id=turn.trace.id)

    async def prepare(self, request: RequestLike, kwargs: dict[str, Any]) -> Turn:
        """The ``prepare`` path's first half: scope, gather, rewrite; ``turn.messages`` is the prompt."""
        turn = self.checked_turn(request, kwargs)
        with self.cache_scope(turn.request.user), guard(turn):
            await self.begin(turn, "prepare")
        return turn

    async def complete(self, turn: Turn, texts: list[str], finish_reason: str | None) -> ChatResponse:
        """The ``prepare`` path's second half: the remote LLM's answer(s) become the turn's candidates."""
        turn.candidates = [Candidate(text=t, index=i, finish_reason=finish_reason) for i, t in enumerate(texts)]
        turn.selected = 0
        with guard(turn):
            return await self.finish(turn)

    async def finish(self, turn: Turn) -> ChatResponse:
        """The end of every entry path: the response, its flags, the trace stored and after-turn scheduled."""
        response = self.response(turn)
        turn.trace.timings_ms["total"] = (time.perf_counter() - turn.stash.get(_STARTED, time.perf_counter())) * 1000
        await asyncio.to_thread(self._finish, turn, response)  # store writes off the event loop
        return response

    def _finish(self, turn: Turn, response: ChatResponse) -> None:
        from persona_mw.budget import BUDGET_KEY

        if BUDGET_KEY in turn.stash:  # the request's auxiliary calls, for the user to see
            turn.trace.aux_calls = turn.stash[BUDGET_KEY].as_list()
        cut = [c.index for c in response.choices if c.finish_reason == "length"]
        if cut:  # the answer hit the token cap: say so rather than serve a sentence cut in half silently
            limit = turn.request.params.max_tokens or getattr(self.backend, "max_new_tokens", None)
            turn.trace.flags.append("truncated: finish_reason=length" + (f" (max_tokens={limit})" if limit else "")
                                    + (f", choices {cut}" if len(response.choices) > 1 else ""))
        self._flag_unused_feedback(turn)
        self.jobs.finish(turn, response)

    def _cancelled(self, turn: Turn, detail: str) -> None:
        """A turn abandoned by its caller (a client that disconnected; a cancelled task): the trace is
        kept, flagged ``cancelled``, so the turn is accounted for; no answer is recorded and no
        after-turn learning is scheduled, since the user never saw the answer."""
        turn.trace.flags.append(f"cancelled: {detail}; after-turn learning not scheduled")
        turn.trace.timings_ms["total"] = (time.perf_counter() - turn.stash.get(_STARTED, time.perf_counter())) * 1000
        try:
            # Only under a stored user (cancelled before the pipeline created it: nothing to keep),
            # so that forgetting the user deletes it too.
            if self.store.has_user(turn.request.user):
                self.jobs.save_trace(turn.trace)
        except Exception as exc:  # the caller is gone; nothing to report the failure to but the log
            log.warning("could not save the trace of cancelled turn %s: %s", turn.trace.id, exc)

    # -- unused feedback ----------------------------------------------------------------------

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

    # -- one feedback event -------------------------------------------------------------------

    async def record_feedback(self, event: Feedback | dict[str, Any] | None, kwargs: dict[str, Any]) -> str:
        """Record a feedback event (append-only), update the profile, run ``persona_feedback``."""
        if event is None or kwargs:
            data = dict(event.model_dump() if event is not None and not isinstance(event, dict) else (event or {}))
            data.update(kwargs)
            event = data
        depth = self.config.limits.max_json_depth
        if isinstance(event, dict):
            check_values(event, max_depth=depth)
        ev = parse_feedback(event)
        check_values(ev, max_depth=depth)  # before anything is stored: no half-created user
        for field in ("id", "trace_id"):  # keys are stored as sent: one carrying PII is refused, not rewritten
            value = getattr(ev, field)
            found = self.redactor.kinds_in(value) if value else []
            if found:
                raise RequestError(f"invalid feedback: {field}: the id contains PII ({found[0]}); "
                                   "use an opaque id", field=field)
        ev = self.redactor.redact_model(ev)
        epoch = await asyncio.to_thread(epoch_of, self.store, ev.user)
        try:
            with write_guard(ev.user, epoch), self.cache_scope(ev.user):  # a forget from now on drops its writes
                seq = await asyncio.to_thread(self._store_feedback, ev)  # store work off the event loop
                try:
                    steps = await self.apply_feedback(ev, seq)
                except ForgottenError:
                    raise
                except BaseException as exc:  # a failing plugin, a cancelled request: the rest is a worker's
                    self._release_feedback_job(seq, exc)
                    raise
                # Its effects are in: the job that owed them (held by this process) is done.
                await asyncio.to_thread(self.store.finish_job, f"feedback-{seq}")
        except ForgottenError:
            log.info("user %r was forgotten while feedback %s was applied: its writes were dropped", ev.user, ev.id)
            return str(ev.id)
        for s in steps:
            if s.error:
                log.warning("feedback plugin %s: %s", s.plugin, s.error)
        unused = self.unused_feedback_warning(ev.kind)
        if unused:
            log.warning("feedback %s of user %r: %s", ev.id, ev.user, unused)
        return str(ev.id)

    def _release_feedback_job(self, seq: int, exc: BaseException) -> None:
        """Leave the event's job to the next ``resume`` (the job worker, a restart): its effects are
        not all in. Blocking, but one short write, and also right for a request being cancelled."""
        try:
            self.store.fail_job(f"feedback-{seq}", f"{type(exc).__name__}: {exc}")
        except Exception as err:  # the store is down too: the job stays claimed until this process is gone
            log.error("feedback event %s: its job could not be released: %s", seq, err)

    def _store_feedback(self, ev: Feedback) -> int:
        """The event stored, with the job that owes its effects, off the event loop (a store waiting
        on another process must not stall it); returns its sequence number."""
        if ev.context:
            self.profiles.check_context_bound(ev.user, ev.context)
        self.store.ensure_node(user_node(ev.user))
        return self.store.append_feedback(ev, job=True)


@contextlib.asynccontextmanager
async def closing(iterator: Any) -> AsyncIterator[Any]:
    """``contextlib.aclosing`` for any async iterator: ``aclose()`` afterwards if it has one."""
    try:
        yield iterator
    finally:
        closer = getattr(iterator, "aclose", None)
        if closer is not None:
            await closer()


def _default_select(scores: dict[str, list[float]], n: int) -> int:
    if not scores:
        return 0
    totals = [sum(v[i] for v in scores.values() if i < len(v)) / len(scores) for i in range(n)]
    return max(range(n), key=lambda i: totals[i])


__all__ = ["Pipeline", "TURN_STAGES", "describe_items", "parse_feedback", "parse_request"]
