"""Runs one turn (or one feedback event) through the hooks, in YAML order.

pluggy's own call loop is synchronous and an ``async def`` firstresult implementation would
end the chain with a coroutine, so per-turn stages are walked here: implementations in YAML
order, each given only the arguments it declares, awaitables awaited, the stage's combine rule
applied, and every call timed and recorded in the turn's trace. Failures follow each plugin's
policy: ``fail`` raises ``PluginError`` naming it; ``skip`` records the error and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import Any, AsyncIterator, Callable, Coroutine

from pydantic import ValidationError

from persona_mw.errors import ForgottenError, PersonaError, PluginError
from persona_mw import stages
from persona_mw.hookspecs import TURN_STAGES
from persona_mw.manager import PluginHost, display_name
from persona_mw.stages import describe_items
from persona_mw.types import (
    Candidate,
    ChatResponse,
    Decoding,
    Feedback,
    Profile,
    StreamChunk,
    TraceStep,
    Turn,
    Usage,
)

log = logging.getLogger("persona_mw.pipeline")

class Pipeline:
    """The per-turn stages over one PluginHost. ``Middleware`` owns one."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    # -- calling hooks ---------------------------------------------------------------------

    def impls(self, stage: str) -> list[Any]:
        """Implementations of ``stage`` in YAML order (pluggy lists them registration-ordered)."""
        return list(reversed(getattr(self.host.pm.hook, stage).get_hookimpls()))

    def has_impls(self, stage: str) -> bool:
        return bool(getattr(self.host.pm.hook, stage).get_hookimpls())

    async def _call(self, stage: str, impl: Any, turn: Turn | None, available: dict[str, Any]) -> tuple[bool, Any]:
        """Call one implementation. Returns (ok, result); ok is False when skipped on error."""
        name = display_name(impl.plugin_name)
        row = stages.stage(stage)
        kwargs = {a: available[a] for a in impl.argnames if a in available}
        t0 = time.perf_counter()
        if turn is not None:
            turn._notes.clear()
        try:
            result = impl.function(**kwargs)
            if inspect.isawaitable(result):
                result = await result
            if result is not None and row.check is not None:
                try:
                    result = row.check(result)
                except (ValidationError, TypeError, ValueError) as exc:
                    raise PluginError(
                        f"plugin {name!r} returned an invalid result from {stage}: {exc}", plugin=name, hook=stage
                    ) from None
        except Exception as exc:
            if isinstance(exc, ForgottenError):  # the user was forgotten meanwhile: the whole work stops
                raise
            if type(exc).__name__ in row.passes:  # e.g. a startup ConfigError: its message is the user's
                raise
            ms = (time.perf_counter() - t0) * 1000
            policy = self.host.policy_of(name)
            err = f"{type(exc).__name__}: {exc}"
            if turn is not None:
                turn.trace.steps.append(
                    TraceStep(plugin=name, hook=stage, ms=ms, error=err, skipped=policy == "skip")
                )
            if policy == "skip":
                log.warning("plugin %r failed in %s and was skipped: %s", name, stage, err)
                return False, None
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"plugin {name!r} failed in {stage}: {err}", plugin=name, hook=stage) from exc
        if turn is not None:
            ms = (time.perf_counter() - t0) * 1000
            summary = "; ".join(turn._notes) if turn._notes else stages.summarize(stage, result)
            turn.trace.steps.append(
                TraceStep(plugin=name, hook=stage, ms=ms, changed=result not in (None, [], {}), summary=summary)
            )
        return True, result

    async def collect(self, stage: str, turn: Turn | None, **available: Any) -> list[Any]:
        out = []
        for impl in self.impls(stage):
            ok, res = await self._call(stage, impl, turn, {"turn": turn, **available})
            if ok and res is not None:
                out.append(res)
        return out

    async def firstresult(self, stage: str, turn: Turn | None, **available: Any) -> Any:
        for impl in self.impls(stage):
            ok, res = await self._call(stage, impl, turn, {"turn": turn, **available})
            if ok and res is not None:
                return res
        return None

    async def broadcast(self, stage: str, turn: Turn | None, **available: Any) -> None:
        """Run every implementation of a hook that returns nothing (startup, after_turn, feedback, forget)."""
        await self.collect(stage, turn, **available)

    def run_blocking(self, stage: str, portal: Callable[[Coroutine[Any, Any, Any]], Any], **available: Any) -> None:
        """``broadcast`` from sync code (startup, forget): the same runner, policy and awaiting.

        Without an ``async def`` implementation the runner never suspends, so it is driven right
        here, in the caller's thread; with one, it runs on ``portal`` (the Middleware's loop).
        """
        coro = self.broadcast(stage, None, **available)
        if any(inspect.iscoroutinefunction(i.function) for i in self.impls(stage)):
            portal(coro)
            return
        try:
            coro.send(None)
        except StopIteration:
            return
        coro.close()
        raise RuntimeError(f"{stage}: an implementation returned an awaitable from a plain def; make it async def")

    async def chain(self, stage: str, turn: Turn, key: str, value: Any, **available: Any) -> Any:
        for impl in self.impls(stage):
            ok, res = await self._call(stage, impl, turn, {"turn": turn, key: value, **available})
            if ok and res is not None:
                value = res
        return value

    # -- one turn --------------------------------------------------------------------------

    async def prepare(self, turn: Turn, *, graph: Any, store: Any, backend: Any) -> list[Decoding]:
        """Stages up to generation: scope, gather, rewrite, decoding."""
        await self.prepare_messages(turn, graph=graph, store=store)
        return await self.collect("persona_decoding", turn, backend=backend)

    async def prepare_messages(self, turn: Turn, *, graph: Any, store: Any) -> None:
        """The stages that shape the prompt: scope, gather, rewrite (``turn.messages`` is the result)."""
        t = time.perf_counter()
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
        for items in await self.collect("persona_gather", turn, store=store):
            turn.items.extend(items)
        turn.trace.timings_ms["gather"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        turn.messages = await self.chain("persona_rewrite", turn, "messages", list(turn.messages))
        turn.trace.timings_ms["rewrite"] = (time.perf_counter() - t) * 1000

    async def generate(self, turn: Turn, backend: Any, decoding: list[Decoding]) -> None:
        """Stages from generation to correction; fills ``turn.candidates`` and ``turn.selected``."""
        req = turn.request
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

    def response(self, turn: Turn, backend: Any) -> ChatResponse:
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

    async def stream_candidate(self, turn: Turn, backend: Any, decoding: list[Decoding]) -> AsyncIterator[StreamChunk]:
        """Stream the answer: token pieces straight from the backend, or the finished answer."""
        t = time.perf_counter()
        if self.needs_full_answer(turn):
            await self.generate(turn, backend, decoding)
            text = turn.candidates[turn.selected].text
            # Whole words, so clients render progressively even though the answer is complete.
            pieces = text.split(" ")
            for i, piece in enumerate(pieces):
                yield StreamChunk(delta=piece if i == 0 else " " + piece)
            return
        parts: list[str] = []
        # Closed explicitly when abandoned, so the backend stops generating now, not at garbage collection.
        async with closing(backend.stream(turn.messages, params=turn.request.params, decoding=decoding)) as pieces:
            async for piece in pieces:
                parts.append(piece)
                yield StreamChunk(delta=piece)
        turn.candidates = [Candidate(text="".join(parts))]
        turn.selected = 0
        turn.trace.timings_ms["generate"] = (time.perf_counter() - t) * 1000

    async def feedback(self, event: Feedback, *, store: Any, graph: Any) -> list[TraceStep]:
        """Run ``persona_feedback``; returns the steps (errors of skipped plugins included)."""
        holder = Turn.model_construct()  # a bare trace holder for policy bookkeeping
        from persona_mw.types import Trace

        holder.trace = Trace()
        object.__setattr__(holder, "_notes", [])
        for stage in stages.on_path("feedback"):
            for impl in self.impls(stage):
                await self._call(stage, impl, holder, {"event": event, "store": store, "graph": graph})
        return holder.trace.steps


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


__all__ = ["Pipeline", "TURN_STAGES", "describe_items"]
