"""The one hook runner: every hook but the registration ones is called here.

pluggy's own call loop is synchronous and an ``async def`` firstresult implementation would
end the chain with a coroutine, so hooks are walked here: implementations in YAML order, each
given only the arguments it declares (a ``PerPlugin`` argument is built for each plugin),
awaitables awaited, the stage's combine rule and result check (``persona_mw.stages``) applied,
and every call timed, recorded in the turn's trace and reported to ``persona_mw.observe``
(per-plugin stage metrics, a no-op unless metrics are on). Failures follow each plugin's policy:
``fail`` raises ``PluginError`` naming it; ``skip`` records the error and goes on.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Coroutine

from pydantic import ValidationError

from persona_mw import observe, stages
from persona_mw.context import PerPlugin
from persona_mw.errors import ForgottenError, PluginError
from persona_mw.manager import PluginHost, display_name
from persona_mw.types import TraceStep, Turn

log = logging.getLogger("persona_mw.pipeline")


class HookRunner:
    """Runs any awaited hook of the stage table over one PluginHost (``Pipeline`` is one)."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    # -- calling hooks ---------------------------------------------------------------------

    async def _offloaded(self, name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """``fn(**kwargs)`` on the plugin's own thread (a stage with ``offload``), in a copy of this
        context (a profile write's marks name the writer through a context variable). One thread per
        plugin keeps its calls in order and one at a time, as they were on the event loop. A caller
        cancelled meanwhile drops its call if it has not started; a started one runs to its end."""
        pools: dict[str, ThreadPoolExecutor] = self.__dict__.setdefault("_offload_threads", {})
        pool = pools.get(name)
        if pool is None:
            pool = pools.setdefault(name, ThreadPoolExecutor(1, thread_name_prefix=f"persona-{name}"))
        ctx = contextvars.copy_context()
        return await asyncio.wrap_future(pool.submit(ctx.run, lambda: fn(**kwargs)))

    def stop_threads(self) -> None:
        """End the offload threads (the Middleware is closing): queued calls, whose callers are gone with
        the event loop, are dropped; a running one ends before this returns, so before the store closes."""
        for pool in self.__dict__.pop("_offload_threads", {}).values():
            pool.shutdown(wait=True, cancel_futures=True)

    def impls(self, stage: str) -> list[Any]:
        """Implementations of ``stage`` in YAML order (pluggy lists them registration-ordered)."""
        return list(reversed(getattr(self.host.pm.hook, stage).get_hookimpls()))

    def has_impls(self, stage: str) -> bool:
        return bool(getattr(self.host.pm.hook, stage).get_hookimpls())

    async def _call(self, stage: str, impl: Any, turn: Turn | None, available: dict[str, Any]) -> tuple[bool, Any]:
        """Call one implementation. Returns (ok, result); ok is False when skipped on error."""
        name = display_name(impl.plugin_name)
        row = stages.stage(stage)
        kwargs = {a: available[a].make(name) if isinstance(available[a], PerPlugin) else available[a]
                  for a in impl.argnames if a in available}
        t0 = time.perf_counter()
        if turn is not None:
            turn._notes.clear()
        try:
            if row.offload and not inspect.iscoroutinefunction(impl.function):
                result = await self._offloaded(name, impl.function, kwargs)
            else:
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
            observe.stage(stage, name, ms / 1000, False)
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
        ms = (time.perf_counter() - t0) * 1000
        observe.stage(stage, name, ms / 1000, True)
        if turn is not None:
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


__all__ = ["HookRunner"]
