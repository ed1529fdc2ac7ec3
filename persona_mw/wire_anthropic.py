"""The Anthropic Messages wire format (``POST /v1/messages``): request -> ``ChatRequest``, answers and
stream chunks -> Anthropic's JSON and its SSE event sequence. Pure: no HTTP, no server imports.

The route is added to ``persona-mw serve`` after its refactor; this module is what it will call.
The user comes from the fields Anthropic clients already send: ``metadata.user_id`` (or the
``X-Persona-User`` header), so a client needs no change beyond the base URL.

Stream sequence, as Anthropic sends it: ``message_start``, ``content_block_start`` (index 0, an empty
text block), ``ping``, ``content_block_delta`` (``text_delta``) for each piece, ``content_block_stop``,
``message_delta`` (``stop_reason``, output ``usage``), ``message_stop``. Each SSE frame is
``event: <type>`` + ``data: <json>``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterable, Iterator, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persona_mw.errors import PersonaError, RequestError
from persona_mw.wire_events import events, sse, sse_frames
from persona_mw.types import ChatRequest, ChatResponse, GenerationParams, Message, StreamChunk, new_id

__all__ = ["MessagesBody", "error_json", "message_json", "sse", "sse_events", "stop_reason", "stream_events",
           "to_chat_request"]

USER_HEADER = "X-Persona-User"
CONTEXT_HEADER = "X-Persona-Context"
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[_Block]


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user_id: str | None = None


class MessagesBody(BaseModel):
    """The part of an Anthropic Messages body we use; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[_Msg] = Field(min_length=1)
    system: str | list[_Block] | None = None
    metadata: _Metadata | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    # persona-mw extras (as in chat completions)
    context: str | None = None
    groups: list[str] | None = None


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p in ("str", "list[_Block]")))


def _invalid(exc: ValidationError) -> RequestError:
    # a union (string or blocks) reports each member it tried: the deepest location is the real culprit
    errs = exc.errors(include_url=False)
    first = max(errs, key=lambda e: len(_field(tuple(e.get("loc", ()))))) if errs else {"loc": (), "msg": "invalid"}
    field = _field(tuple(first.get("loc", ()))) or "body"
    return RequestError(f"invalid request: {field}: {first.get('msg', 'invalid')}", field=field)


def _text(blocks: str | list[_Block], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for i, b in enumerate(blocks):
        if b.type != "text" or b.text is None:
            raise RequestError(f"invalid request: {where}.{i}.type: unsupported content block type {b.type!r} "
                               "(only 'text')",
                               field=f"{where}.{i}.type")
        parts.append(b.text)
    return "\n".join(parts)


def to_chat_request(data: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> ChatRequest:
    """An Anthropic Messages body (+ persona headers) as a ``ChatRequest``; errors name the field."""
    headers = headers or {}
    try:
        body = MessagesBody.model_validate(dict(data))
    except ValidationError as exc:
        raise _invalid(exc) from None
    lowered = {k.lower(): v for k, v in headers.items()}
    user = (body.metadata.user_id if body.metadata else None) or lowered.get(USER_HEADER.lower())
    if not user:
        raise RequestError(f"missing user: set metadata.user_id or the {USER_HEADER} header",
                           field="metadata.user_id", hint="personalization needs to know whom it serves")
    messages: list[Message] = []
    if body.system is not None:
        system = _text(body.system, "system")
        if system:
            messages.append(Message(role="system", content=system))
    for i, m in enumerate(body.messages):
        messages.append(Message(role=m.role, content=_text(m.content, f"messages.{i}.content")))
    try:
        params = GenerationParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=body.stop_sequences, tools=body.tools, tool_choice=body.tool_choice)
        return ChatRequest(user=user, messages=messages, context=body.context or lowered.get(CONTEXT_HEADER.lower()),
                           groups=body.groups or [], model=body.model, stream=bool(body.stream), params=params)
    except ValidationError as exc:
        raise _invalid(exc) from None


def stop_reason(finish_reason: str | None) -> str:
    return _STOP.get(finish_reason or "stop", "end_turn")


def message_json(resp: ChatResponse, model: str) -> dict[str, Any]:
    """A ``ChatResponse`` as an Anthropic ``message`` object (the first choice) plus ``persona_trace``."""
    choice = resp.choices[0] if resp.choices else None
    return {
        "id": "msg_" + resp.id.split("-", 1)[-1],
        "type": "message",
        "role": "assistant",
        "model": resp.model or model,
        "content": [{"type": "text", "text": choice.text if choice else ""}],
        "stop_reason": stop_reason(choice.finish_reason if choice else None),
        "stop_sequence": None,
        "usage": {"input_tokens": resp.usage.prompt_tokens, "output_tokens": resp.usage.completion_tokens},
        "persona_trace": resp.trace.model_dump(mode="json"),
    }


def stream_events(chunks: Iterable[StreamChunk], *, model: str, message_id: str | None = None,
                  input_tokens: int = 0) -> Iterator[dict[str, Any]]:
    """Stream chunks as Anthropic's event sequence (dicts; ``sse`` frames one)."""
    return events(_Stream(model, message_id, input_tokens), chunks)


def sse_events(chunks: AsyncIterator[StreamChunk], *, model: str, message_id: str | None = None,
                     input_tokens: int = 0) -> AsyncIterator[str]:
    """``stream_events`` over an async stream, as SSE frames."""
    return sse_frames(_Stream(model, message_id, input_tokens), chunks)


class _Stream:
    def __init__(self, model: str, message_id: str | None, input_tokens: int) -> None:
        self.model = model
        self.id = message_id or new_id("msg").replace("-", "_", 1)  # msg_<hex>, as Anthropic names them
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.finish: str | None = None
        self.trace: dict[str, Any] | None = None

    def start(self) -> list[dict[str, Any]]:
        message: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return [{"type": "message_start", "message": message},
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                {"type": "ping"}]

    def chunk(self, chunk: StreamChunk) -> list[dict[str, Any]]:
        if chunk.index != 0:  # Messages has one answer; n > 1 is not part of this wire format
            return []
        out = []
        if chunk.delta:
            self.output_tokens += 1
            out.append({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": chunk.delta}})
        if chunk.done:
            self.finish = chunk.finish_reason
            if chunk.trace is not None:
                self.trace = chunk.trace.model_dump(mode="json")
        return out

    def end(self) -> list[dict[str, Any]]:
        delta: dict[str, Any] = {"type": "message_delta",
                                 "delta": {"stop_reason": stop_reason(self.finish), "stop_sequence": None},
                                 "usage": {"output_tokens": self.output_tokens}}
        if self.trace is not None:
            delta["persona_trace"] = self.trace
        return [{"type": "content_block_stop", "index": 0}, delta, {"type": "message_stop"}]


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}


def error_json(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_for(exc: PersonaError) -> tuple[int, dict[str, Any]]:
    """A request error as (400, Anthropic error body); other persona errors are the server's to map."""
    status = 400 if isinstance(exc, RequestError) else 500
    return status, error_json(status, str(exc))


# the name the server's one turn handler uses for every wire format
answer_json = message_json
