"""What the streaming wire formats share (Anthropic Messages, OpenAI Responses): a format is a state
object that turns the start, each ``StreamChunk`` and the end of a turn into its own events; these
functions drive it and frame the events as server-sent events (``event:`` + ``data:``)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterable, Iterator, Protocol

from persona_mw.types import StreamChunk


class EventStream(Protocol):
    def start(self) -> Iterable[dict[str, Any]]: ...
    def chunk(self, chunk: StreamChunk) -> Iterable[dict[str, Any]]: ...
    def end(self) -> Iterable[dict[str, Any]]: ...


def sse(event: dict[str, Any]) -> str:
    """One event as an SSE frame named by its ``type``."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def events(state: EventStream, chunks: Iterable[StreamChunk]) -> Iterator[dict[str, Any]]:
    """The format's whole event sequence for ``chunks``."""
    yield from state.start()
    for chunk in chunks:
        yield from state.chunk(chunk)
    yield from state.end()


async def sse_frames(state: EventStream, chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[str]:
    """``events`` over an async stream, as SSE frames."""
    for ev in state.start():
        yield sse(ev)
    async for chunk in chunks:
        for ev in state.chunk(chunk):
            yield sse(ev)
    for ev in state.end():
        yield sse(ev)


__all__ = ["EventStream", "events", "sse", "sse_frames"]
