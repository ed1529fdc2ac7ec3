"""The OpenAI Responses wire format (``POST /v1/responses``): request -> ``ChatRequest``, answers and stream
chunks -> a ``response`` object and its SSE events. Pure: no HTTP, no server imports.

The route is added to ``persona-mw serve`` after its refactor; this module is what it will call.
The user comes from what OpenAI clients already send: ``user``, ``safety_identifier``,
``prompt_cache_key`` (in that order) or the ``X-Persona-User`` header.

Stream events, in OpenAI's order, each with a growing ``sequence_number``: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Iterable, Iterator, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persona_mw.errors import RequestError
from persona_mw.wire_events import events, sse, sse_frames
from persona_mw.types import ChatRequest, ChatResponse, GenerationParams, Message, StreamChunk

__all__ = ["ResponsesBody", "response_json", "sse", "sse_events", "stream_events", "to_chat_request"]

USER_HEADER = "X-Persona-User"
CONTEXT_HEADER = "X-Persona-Context"
_TEXT_PARTS = ("input_text", "output_text", "text")


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_Part]


class ResponsesBody(BaseModel):
    """The part of a Responses body we use; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[_Item]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # persona-mw extras (as in chat completions)
    context: str | None = None
    groups: list[str] | None = None


def _invalid(exc: ValidationError) -> RequestError:
    # a union (string or items) reports each member it tried: the deepest location is the real culprit
    errs = exc.errors(include_url=False)
    located = [([str(p) for p in e.get("loc", ()) if p not in ("str", "list[_Item]", "list[_Part]")], str(e["msg"]))
               for e in errs]
    loc, msg = max(located, key=lambda lm: len(lm[0])) if located else ([], "invalid")
    field = ".".join(loc) or "body"
    return RequestError(f"invalid request: {field}: {msg}", field=field)


def _text(content: str | list[_Part], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, p in enumerate(content):
        if p.type not in _TEXT_PARTS or p.text is None:
            raise RequestError(f"invalid request: {where}.{i}.type: unsupported content part {p.type!r} "
                               "(only text)", field=f"{where}.{i}.type")
        parts.append(p.text)
    return "\n".join(parts)


def to_chat_request(data: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> ChatRequest:
    """A Responses body (+ persona headers) as a ``ChatRequest``; errors name the field."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    try:
        body = ResponsesBody.model_validate(dict(data))
    except ValidationError as exc:
        raise _invalid(exc) from None
    user = body.user or body.safety_identifier or body.prompt_cache_key or lowered.get(USER_HEADER.lower())
    if not user:
        raise RequestError(f"missing user: set 'user' (or safety_identifier, prompt_cache_key) or the "
                           f"{USER_HEADER} header", field="user", hint="personalization needs to know whom it serves")
    messages: list[Message] = []
    if body.instructions:
        messages.append(Message(role="system", content=body.instructions))
    if isinstance(body.input, str):
        messages.append(Message(role="user", content=body.input))
    else:
        for i, item in enumerate(body.input):
            role = "system" if item.role == "developer" else item.role
            messages.append(Message(role=role, content=_text(item.content, f"input.{i}.content")))
    try:
        params = GenerationParams(max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
                                  tools=body.tools, tool_choice=body.tool_choice)
        return ChatRequest(user=user, messages=messages, context=body.context or lowered.get(CONTEXT_HEADER.lower()),
                           groups=body.groups or [], model=body.model, stream=bool(body.stream), params=params,
                           metadata=body.metadata or {})
    except ValidationError as exc:
        raise _invalid(exc) from None


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _response(resp_id: str, model: str, created: int, status: str, output: list[dict[str, Any]],
              usage: tuple[int, int] | None, finish_reason: str | None = None) -> dict[str, Any]:
    incomplete = status == "completed" and finish_reason == "length"
    out: dict[str, Any] = {
        "id": resp_id, "object": "response", "created_at": created, "model": model,
        "status": "incomplete" if incomplete else status, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": None, "metadata": {}, "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
        "temperature": None, "top_p": None,
    }
    if usage is not None:
        out["usage"] = {"input_tokens": usage[0], "output_tokens": usage[1], "total_tokens": usage[0] + usage[1],
                        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0}}
    return out


def response_json(resp: ChatResponse, model: str) -> dict[str, Any]:
    """A ``ChatResponse`` as a Responses ``response`` object (the first choice) plus ``persona_trace``."""
    choice = resp.choices[0] if resp.choices else None
    item = _message_item(_id("msg"), choice.text if choice else "", "completed")
    out = _response("resp_" + resp.id.split("-", 1)[-1], resp.model or model, resp.created, "completed", [item],
                    (resp.usage.prompt_tokens, resp.usage.completion_tokens),
                    choice.finish_reason if choice else None)
    out["persona_trace"] = resp.trace.model_dump(mode="json")
    return out


class _Stream:
    def __init__(self, model: str, response_id: str | None, input_tokens: int) -> None:
        self.model = model
        self.id = response_id or _id("resp")
        self.item_id = _id("msg")
        self.created = int(time.time())
        self.input_tokens = input_tokens
        self.seq = 0
        self.text: list[str] = []
        self.finish: str | None = None
        self.trace: dict[str, Any] | None = None

    def _ev(self, type: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self) -> list[dict[str, Any]]:
        pending = _response(self.id, self.model, self.created, "in_progress", [], None)
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self._ev("response.created", response=pending), self._ev("response.in_progress", response=pending),
                self._ev("response.output_item.added", output_index=0,
                         item=_message_item(self.item_id, "", "in_progress")),
                self._ev("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                         part=part)]

    def chunk(self, chunk: StreamChunk) -> list[dict[str, Any]]:
        if chunk.index != 0:  # one answer: n > 1 is not part of this wire format
            return []
        out = []
        if chunk.delta:
            self.text.append(chunk.delta)
            out.append(self._ev("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                                delta=chunk.delta, logprobs=[]))
        if chunk.done:
            self.finish = chunk.finish_reason
            if chunk.trace is not None:
                self.trace = chunk.trace.model_dump(mode="json")
        return out

    def end(self) -> list[dict[str, Any]]:
        text = "".join(self.text)
        item = _message_item(self.item_id, text, "completed")
        done = _response(self.id, self.model, self.created, "completed", [item],
                         (self.input_tokens, len(self.text)), self.finish)
        if self.trace is not None:
            done["persona_trace"] = self.trace
        return [self._ev("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                         text=text, logprobs=[]),
                self._ev("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                         part=item["content"][0]),
                self._ev("response.output_item.done", output_index=0, item=item),
                self._ev("response.completed" if done["status"] == "completed" else "response.incomplete",
                         response=done)]


def stream_events(chunks: Iterable[StreamChunk], *, model: str, response_id: str | None = None,
                  input_tokens: int = 0) -> Iterator[dict[str, Any]]:
    """Stream chunks as the Responses event sequence (dicts; ``sse`` frames one)."""
    return events(_Stream(model, response_id, input_tokens), chunks)


def sse_events(chunks: AsyncIterator[StreamChunk], *, model: str, response_id: str | None = None,
                     input_tokens: int = 0) -> AsyncIterator[str]:
    """``stream_events`` over an async stream, as SSE frames."""
    return sse_frames(_Stream(model, response_id, input_tokens), chunks)


# the name the server's one turn handler uses for every wire format
answer_json = response_json
