"""Backend fault policy: a hard timeout on every call, bounded retries with backoff, fail-over.

``resilience: {<role>: {timeout_s, retries, backoff_s, max_backoff_s, fallback: [roles], on_failure}}``
wraps that role's backend (``backend`` is the main one) in a ``ResilientBackend``. Timeouts, 5xx and
429 (honouring ``Retry-After`` up to ``max_backoff_s``) are retried; other errors (a 4xx, a refused
prompt) go straight to the next fallback role. What happened lands in the turn's trace flags
(``retry: ...``, ``failover: ...``) through ``collect_notes``. ``on_failure: unpersonalized`` is
applied by the Middleware: once everything failed, the request is sent once more without
personalization (flag ``degraded: unpersonalized``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from persona_mw.config import BackendPolicy
from persona_mw.errors import BackendError, BackendTimeout, BackendUnavailable

T = TypeVar("T")

__all__ = ["ResilientBackend", "collect_notes", "retry_after_s"]

_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("persona_mw_resilience_notes",
                                                                         default=None)


@contextlib.contextmanager
def collect_notes() -> Iterator[list[str]]:
    """Gather the retry / fail-over notes of the backend calls made inside the block."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def _note(text: str) -> None:
    notes = _NOTES.get()
    if notes is not None:
        notes.append(text)


def retry_after_s(exc: BaseException) -> float | None:
    """The ``Retry-After`` of an HTTP error anywhere in ``exc``'s cause chain (seconds), if any."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        for holder in (getattr(current, "response", None), current):
            headers = getattr(holder, "headers", None) or getattr(holder, "litellm_response_headers", None)
            value = None
            if headers is not None:
                try:
                    value = headers.get("retry-after") or headers.get("Retry-After")
                except Exception:  # headers of an unexpected type: no hint
                    value = None
            if value:
                try:
                    return max(0.0, float(value))
                except ValueError:
                    parsed = email.utils.parsedate_to_datetime(str(value)) if value else None
                    if parsed is not None:
                        return max(0.0, parsed.timestamp() - time.time())
        current = current.__cause__ or current.__context__
    return None


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (BackendTimeout, BackendUnavailable))


class ResilientBackend:
    """Wraps a backend (and its fallbacks) with the role's ``BackendPolicy``; otherwise the same backend."""

    def __init__(self, inner: Any, policy: BackendPolicy, role: str = "backend",
                 fallbacks: list[tuple[str, Any]] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.inner = inner
        self.policy = policy
        self.role = role
        self.fallbacks = list(fallbacks or [])
        self._sleep = sleep

    def __getattr__(self, name: str) -> Any:  # name, capabilities, count_tokens, load ... of the inner one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"ResilientBackend({self.inner!r}, role={self.role!r})"

    async def aclose(self) -> None:
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()

    async def _one(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(fn(), timeout=self.policy.timeout_s)
        except asyncio.TimeoutError:
            raise BackendTimeout(f"backend role {self.role!r} gave no answer within {self.policy.timeout_s:g}s",
                                 hint="raise resilience.<role>.timeout_s or check the backend") from None

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        p = self.policy
        last: BackendError | None = None
        for index, (role, backend) in enumerate([(self.role, self.inner), *self.fallbacks]):
            if index:
                _note(f"failover: {self.role} -> {role} ({type(last).__name__})")
            for attempt in range(p.retries + 1):
                try:
                    return await self._one(lambda: fn(backend))
                except BackendError as exc:
                    last = exc
                    if not _retryable(exc) or attempt == p.retries:
                        break
                    wait = min(p.max_backoff_s, p.backoff_s * 2**attempt)
                    hinted = retry_after_s(exc)
                    if hinted is not None:
                        wait = min(p.max_backoff_s, max(wait, hinted))
                    _note(f"retry: {role} attempt {attempt + 2} after {wait:.2f}s ({type(exc).__name__})")
                    await self._sleep(wait)
        assert last is not None
        if self.fallbacks:
            raise type(last)(f"{last.message} (after {p.retries} retries and fail-over to "
                             f"{', '.join(r for r, _ in self.fallbacks)})", hint=last.hint) from last
        raise last

    async def generate(self, messages: Any, **kwargs: Any) -> Any:
        return await self._call(lambda b: b.generate(messages, **kwargs))

    async def stream(self, messages: Any, **kwargs: Any) -> AsyncIterator[str]:
        """Retries and fails over until the first piece arrives; after that each piece has the timeout."""

        async def start(b: Any) -> tuple[Any, str | None]:
            it = b.stream(messages, **kwargs).__aiter__()
            try:
                return it, await it.__anext__()
            except StopAsyncIteration:
                return it, None

        iterator, first = await self._call(start)
        try:
            if first is None:
                return
            yield first
            while True:
                try:
                    piece = await self._one(iterator.__anext__)
                except StopAsyncIteration:
                    return
                yield piece
        finally:  # abandoned (client gone) or done: the inner stream stops generating now
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                await closer()
