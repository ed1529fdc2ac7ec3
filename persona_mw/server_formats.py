"""``POST /v1/messages`` (Anthropic Messages) and ``POST /v1/responses`` (OpenAI Responses) on the server.

Thin faces over the same turn as chat completions: the bodies are converted by the pure wire modules
(``persona_mw.wire_anthropic``, ``persona_mw.wire_responses``) into a ``ChatRequest`` and go through the
tenant's middleware; auth, tenants, rate limit and body limits are the server's own (``guarded``,
``tenant_mw``, ``_read_json_object``). Errors are each API's own JSON: Anthropic's
``{"type": "error", "error": {type, message}}`` for Messages, OpenAI's for Responses. A stream answers
its real status until the first chunk is ready (as chat completions do); an error after that becomes an
``error`` event in the stream.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from persona_mw import wire_anthropic, wire_responses
from persona_mw.limits import check_groups
from persona_mw.openai_wire import TRACE_HEADER, HTTPError, _aclose_shielded, _read_json_object, error_for
from persona_mw.server_routes import (
    first_chunk,
    stream_headers,
    _json,
    observed_turn,
    state_of,
    tenant_mw,
    until_disconnected,
)
from persona_mw.types import ChatRequest, StreamChunk

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("persona_mw.server")

__all__ = ["anthropic_error", "messages", "responses"]


def anthropic_error(err: HTTPError) -> dict[str, Any]:
    """An ``HTTPError`` in Anthropic's error shape (the OpenAI ``param`` kept as an extra field)."""
    body = wire_anthropic.error_json(err.status, err.message)
    if err.type in ("rate_limit_error", "authentication_error", "not_found_error"):
        body["error"]["type"] = err.type
    if err.param:
        body["error"]["param"] = err.param
    return body


async def _read(request: Request, convert: Callable[[dict[str, Any], Any], ChatRequest]) -> tuple[Any, ChatRequest]:
    state = state_of(request)
    m = tenant_mw(request)
    data = await _read_json_object(request, state.limit, state.max_depth)
    lim = getattr(getattr(m, "config", None), "limits", None)
    if lim is not None:  # before validating every item, as chat completions do
        check_groups(data.get("groups"), lim)
    return m, convert(data, request.headers)


async def _chain(first: StreamChunk | None, rest: Any) -> AsyncIterator[StreamChunk]:
    if first is None:
        return
    yield first
    async for chunk in rest:
        yield chunk


async def _framed(frames: AsyncIterator[str], rest: Any, request: Request,
                  on_error: Callable[[HTTPError], str]) -> AsyncIterator[str]:
    """``frames``, with an error mid-stream as the format's error event; the pipeline's stream is closed."""
    try:
        async for frame in frames:
            yield frame
    except Exception as exc:
        err = error_for(exc, state_of(request).upstream())
        if err.status >= 500:
            log.error("%s stream failed mid-stream: %s", request.url.path, exc, exc_info=exc)
        yield on_error(err)
    finally:
        await _aclose_shielded(rest)


# --------------------------------------------------------------------------- Anthropic Messages


async def _turn(request: Request, wire: Any, error_event: Callable[[HTTPError], str]) -> Response:
    """One turn in a wire format (``wire``: ``wire_anthropic`` or ``wire_responses``): its JSON answer, or
    its SSE event sequence when the request streams (a late error becomes ``error_event``)."""
    from starlette.responses import StreamingResponse

    m, chat_request = await _read(request, wire.to_chat_request)
    model = chat_request.model or state_of(request).model_name()
    if not chat_request.stream:
        resp = await until_disconnected(request, m.achat(chat_request))
        observed_turn(resp)
        return _json(wire.answer_json(resp, model), headers={TRACE_HEADER: resp.trace.id})
    first, rest = await first_chunk(request, m, chat_request)
    frames = wire.sse_events(_chain(first, rest), model=model)
    events = _framed(frames, rest, request, error_event)
    return StreamingResponse(events, media_type="text/event-stream", headers=stream_headers(first))


async def messages(request: Request) -> Response:
    """``POST /v1/messages``: an Anthropic ``message`` (or its SSE event sequence with ``stream``)."""
    return await _turn(request, wire_anthropic, lambda err: wire_anthropic.sse(anthropic_error(err)))


# --------------------------------------------------------------------------- OpenAI Responses


def _responses_error_event(err: HTTPError) -> str:
    return wire_responses.sse({"type": "error", "code": err.code or err.type, "message": err.message,
                               "param": err.param, "sequence_number": 0})


async def responses(request: Request) -> Response:
    """``POST /v1/responses``: a Responses ``response`` object (or its SSE events with ``stream``)."""
    return await _turn(request, wire_responses, _responses_error_event)
