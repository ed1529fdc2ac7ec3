"""``persona_mw.wrap(client)``: the OpenAI Python client (sync or async) with personalization applied.

``client.chat.completions.create(..., user="ana")`` keeps its signature: the pipeline's prompt
stages rewrite ``messages``, the real client makes the call, and the post-call stages run on the
answer, after the last chunk for streams (also when the caller stops reading early: the turn is
finished with what arrived and flagged ``stream_incomplete``). Calls without ``user`` pass through
untouched. The context comes from ``wrap(..., context=)`` or an ``X-Persona-Context`` extra header;
everything else on the client is the client's own.
"""

from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Iterator

from persona_mw.integrations._common import plain_messages, prompt_dicts, who
from persona_mw.types import Turn

__all__ = ["wrap"]


def wrap(client: Any, middleware: Any = None, *, context: str | None = None) -> Any:
    """Return ``client`` personalized by ``middleware`` (default: ``Middleware()`` from the embedded config)."""
    if middleware is None:
        from persona_mw.middleware import Middleware

        middleware = Middleware()
    return _Client(client, middleware, context)


class _Proxy:
    """Delegates every attribute it does not define to the wrapped object."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Client(_Proxy):
    def __init__(self, client: Any, mw: Any, context: str | None) -> None:
        super().__init__(client)
        self.persona = mw
        self.chat = _Chat(client.chat, _Completions(client.chat.completions, mw, context))

    def with_options(self, **options: Any) -> _Client:
        return _Client(self._inner.with_options(**options), self.persona, self.chat.completions.context)


class _Chat(_Proxy):
    def __init__(self, chat: Any, completions: _Completions) -> None:
        super().__init__(chat)
        self.completions = completions


class _Completions(_Proxy):
    def __init__(self, completions: Any, mw: Any, context: str | None) -> None:
        super().__init__(completions)
        self.mw = mw
        self.context = context
        self.is_async = inspect.iscoroutinefunction(inspect.unwrap(completions.create)) or type(
            completions).__name__.startswith("Async")

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        user, context = who(kwargs, context=self.context)
        if not user or not kwargs.get("messages"):
            return None
        n = kwargs.get("n")
        return {"user": user, "context": context, "messages": plain_messages(kwargs["messages"]),
                "n": n if isinstance(n, int) and n > 0 else 1, "model": kwargs.get("model")}

    def create(self, **kwargs: Any) -> Any:
        if self.is_async:
            return self._acreate(kwargs)
        req = self._request(kwargs)
        if req is None:
            return self._inner.create(**kwargs)
        turn = self.mw.prepare(req)
        response = self._inner.create(**{**kwargs, "messages": prompt_dicts(turn)})
        if kwargs.get("stream"):
            return _SyncStream(response, turn, self.mw)
        self.mw.complete(turn, _texts(response), finish_reason=_finish(response))
        return _tag(response, turn)

    async def _acreate(self, kwargs: dict[str, Any]) -> Any:
        req = self._request(kwargs)
        if req is None:
            return await self._inner.create(**kwargs)
        turn = await self.mw.aprepare(req)
        response = await self._inner.create(**{**kwargs, "messages": prompt_dicts(turn)})
        if kwargs.get("stream"):
            return _AsyncStream(response, turn, self.mw)
        await self.mw.acomplete(turn, _texts(response), finish_reason=_finish(response))
        return _tag(response, turn)


def _texts(response: Any) -> list[str]:
    return [c.message.content or "" for c in response.choices] or [""]


def _finish(response: Any) -> str | None:
    return response.choices[0].finish_reason if response.choices else None


def _tag(response: Any, turn: Turn) -> Any:
    try:  # the SDK's models keep extra attributes; a trace id there lets callers send feedback
        response.persona_trace_id = turn.trace.id
    except Exception:  # pragma: no cover - depends on the SDK's model config
        pass
    return response


class _Collector:
    """Accumulates streamed deltas per choice index, and finishes the turn once."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.parts: dict[int, list[str]] = {}
        self.finish: str | None = None
        self.done = False
        self.persona_trace_id = turn.trace.id

    def add(self, chunk: Any) -> None:
        for choice in getattr(chunk, "choices", None) or []:
            delta = getattr(getattr(choice, "delta", None), "content", None)
            self.parts.setdefault(choice.index, []).append(delta or "")
            if getattr(choice, "finish_reason", None):
                self.finish = choice.finish_reason

    def texts(self, complete: bool) -> list[str]:
        if not complete:
            self.turn.trace.flags.append("stream_incomplete")
        return ["".join(self.parts[i]) for i in sorted(self.parts)] or [""]


class _SyncStream(_Proxy):
    def __init__(self, stream: Any, turn: Turn, mw: Any) -> None:
        super().__init__(stream)
        self._mw = mw
        self._c = _Collector(turn)
        self.persona_trace_id = turn.trace.id

    def __iter__(self) -> Iterator[Any]:
        complete = False
        try:
            for chunk in self._inner:
                self._c.add(chunk)
                yield chunk
            complete = True
        finally:
            self._done(complete)

    def _done(self, complete: bool) -> None:
        if not self._c.done:
            self._c.done = True
            self._mw.complete(self._c.turn, self._c.texts(complete), finish_reason=self._c.finish)

    def close(self) -> None:
        self._inner.close()
        self._done(False)

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncStream(_Proxy):
    def __init__(self, stream: Any, turn: Turn, mw: Any) -> None:
        super().__init__(stream)
        self._mw = mw
        self._c = _Collector(turn)
        self.persona_trace_id = turn.trace.id

    async def __aiter__(self) -> AsyncIterator[Any]:
        complete = False
        try:
            async for chunk in self._inner:
                self._c.add(chunk)
                yield chunk
            complete = True
        finally:
            await self._done(complete)

    async def _done(self, complete: bool) -> None:
        if not self._c.done:
            self._c.done = True
            await self._mw.acomplete(self._c.turn, self._c.texts(complete), finish_reason=self._c.finish)

    async def close(self) -> None:
        await self._inner.close()
        await self._done(False)

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
