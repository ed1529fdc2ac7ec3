"""The OpenAI chat-completions wire format: request bodies, OpenAI-shaped JSON errors, SSE chunks.

Split from ``persona_mw.server`` along the seam between HTTP plumbing and what goes over the wire;
nothing here imports fastapi or starlette at module level.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from persona_mw.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    PersonaError,
    PluginError,
    RequestError,
    StoreError,
    UnknownUserError,
)
from persona_mw.limits import DEFAULT_MAX_JSON_DEPTH, check_values
from persona_mw.types import ChatRequest, Feedback, GenerationParams, Message, StreamChunk

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("persona_mw.server")

USER_HEADER = "X-Persona-User"
CONTEXT_HEADER = "X-Persona-Context"
TRACE_HEADER = "X-Persona-Trace-Id"
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|bytes|none|.*\[.*\])$")
# How much of an oversize body is read (and dropped) before answering 413: a client that is still
# sending when the server answers and closes often sees a reset instead of the 413.
_DRAIN_FACTOR = 16


# --------------------------------------------------------------------------- request bodies


class ChatCompletionBody(BaseModel):
    """The part of an OpenAI chat-completions body we use; other OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message]
    user: str | None = None
    n: int | None = None
    stream: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # Passed untouched to backends that take them (litellm); the local model ignores them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # persona-mw extras
    context: str | None = None
    groups: list[str] | None = None
    metadata: dict[str, Any] | None = None


_FEEDBACK: TypeAdapter[Any] = TypeAdapter(Feedback)
_FEEDBACK_KINDS = ("choice", "rating", "edit", "stated")


class HTTPError(Exception):
    """An error answered as OpenAI-shaped JSON: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _validation_error(exc: ValidationError, *, drop_tag: bool = False) -> HTTPError:
    """400 naming the field(s); ``drop_tag`` strips the discriminator value pydantic puts first."""
    problems: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        if drop_tag and loc and loc[0] in _FEEDBACK_KINDS:
            loc = loc[1:]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc and str(err.get("type", "")).startswith("union_tag"):
            loc = ("kind",)
            if err.get("type") == "union_tag_not_found":
                msg = f"Field required (one of {', '.join(map(repr, _FEEDBACK_KINDS))})"
        # A union reports each member it tried ("stop.str", "stop.list[str]"): name the field only.
        loc = tuple(p for p in loc if not (isinstance(p, str) and _UNION_MEMBER.match(p)))
        msgs = problems.setdefault(_loc(loc) or "body", [])
        if msg not in msgs:
            msgs.append(msg)
    text = "; ".join(f"{name}: {', or '.join(msgs)}" for name, msgs in problems.items())
    param = next((name for name in problems if name != "body"), None)
    return HTTPError(400, f"invalid request: {text}", param=param, code="invalid_value")


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"(),]+")
_BEARER = re.compile(r"(?i)\b(bearer|api[_-]?key[=:]\s*)\s*[^\s'\"(),]+")


def upstream_secrets(mw: Any) -> list[str]:
    """What a 5xx body must not show of ``mw``'s backends: each ``api_base`` (and its host), ``api_key``
    and header value, for ``scrub``. Wrapped (resilient) backends and their fallbacks included."""
    from urllib.parse import urlsplit

    found: list[str] = []
    seen: list[Any] = []
    backends = getattr(mw, "backends", None)
    todo = list(backends.all()) if backends is not None else [getattr(mw, "backend", None)]
    while todo:
        b = todo.pop()
        if b is None or any(b is o for o in seen):
            continue
        seen.append(b)
        attrs = getattr(b, "__dict__", None) or {}  # not getattr(): a wrapper forwards unknown names
        todo += [attrs.get("inner"), *(fb for _, fb in attrs.get("fallbacks") or [])]
        base, key = attrs.get("api_base"), attrs.get("api_key")
        headers = attrs.get("extra_headers")
        for value in (base, key, *(headers.values() if isinstance(headers, dict) else ())):
            if isinstance(value, str) and len(value) >= 4:
                found.append(value)
        if isinstance(base, str) and "://" in base:
            parts = urlsplit(base)
            found += [x for x in (parts.netloc, parts.hostname) if x and len(x) >= 4]
    return sorted(set(found), key=len, reverse=True)


def scrub(message: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """A server-side failure's message without the upstream's address or credentials: the configured
    values in ``secrets``, any URL and any bearer token / api key become ``<redacted>``."""
    for secret in secrets:
        message = message.replace(secret, "<redacted>")
    message = _URL.sub("<redacted>", message)
    return _BEARER.sub(lambda m: f"{m.group(1)} <redacted>" if m.group(1).lower() == "bearer"
                       else f"{m.group(1)}<redacted>", message)


def error_for(exc: BaseException, secrets: list[str] | tuple[str, ...] = ()) -> HTTPError:
    """Map any exception onto the HTTP error answered for it (500s are logged by the caller).

    A 5xx answer never names the upstream: its message goes through ``scrub`` (the full one is logged).
    """
    err = _error_for(exc)
    if err.status >= 500 and not isinstance(exc, HTTPError):
        err = HTTPError(err.status, scrub(err.message, secrets), type=err.type, param=err.param, code=err.code)
    return err


def _error_for(exc: BaseException) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, UnknownUserError):
        return HTTPError(404, str(exc), type="not_found_error", param=exc.field, code="unknown_user")
    if isinstance(exc, RequestError):
        return HTTPError(400, str(exc), param=exc.field, code="invalid_value")
    if isinstance(exc, PluginError):
        where = f" in {exc.hook}" if exc.hook else ""
        return HTTPError(502, f"plugin {exc.plugin!r} failed{where}: {exc}", type="plugin_error", code=exc.plugin)
    if isinstance(exc, BackendTimeout):
        return HTTPError(504, str(exc), type="backend_timeout", code="timeout")
    if isinstance(exc, BackendOverloaded):
        return HTTPError(503, str(exc), type="overloaded_error", code="overloaded")
    if isinstance(exc, BackendUnavailable):
        return HTTPError(502, str(exc), type="backend_unavailable", code="unavailable")
    if isinstance(exc, BackendError):
        return HTTPError(502, str(exc), type="backend_error")
    if isinstance(exc, StoreError):
        return HTTPError(503, str(exc), type="store_error")
    if isinstance(exc, ConfigError):
        return HTTPError(500, str(exc), type="config_error")
    if isinstance(exc, PersonaError):
        return HTTPError(500, str(exc), type="server_error")
    return HTTPError(500, "internal server error (see the server log)", type="server_error")


async def _read_json_object(request: Request, limit: int, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, or an HTTPError: wrong content type, too large, malformed, not an object;
    or a RequestError naming the field: nested deeper than ``max_depth``, a lone surrogate, NaN/Infinity."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPError(400, f"expected a JSON body (Content-Type: application/json), got {media_type!r}",
                        code="invalid_content_type")
    body = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > limit * _DRAIN_FACTOR:
            break
    if size > limit:
        raise HTTPError(413, f"request body is larger than the limit of {limit} bytes",
                        code="request_too_large")
    if not body.strip():
        raise HTTPError(400, "request body is empty: expected a JSON object", code="invalid_json")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise HTTPError(400, f"expected a JSON object, got {type(data).__name__}", code="invalid_json")
    check_values(data, max_depth=max_depth)
    return data


def to_chat_request(data: dict[str, Any], headers: Any) -> ChatRequest:
    """Convert an OpenAI chat-completions body (+ persona headers) into a ``ChatRequest``."""
    try:
        body = ChatCompletionBody.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    user = body.user or headers.get(USER_HEADER)
    if not user:
        raise RequestError(
            f"missing user: set the 'user' field or the {USER_HEADER} header", field="user",
            hint="personalization needs to know whom it serves",
        )
    tokens_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    try:
        params = GenerationParams(
            max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop,
            tools=body.tools, tool_choice=body.tool_choice,
        )
    except ValidationError as exc:
        err = _validation_error(exc)
        if err.param == "max_tokens" and tokens_field != "max_tokens":
            err = HTTPError(400, err.message.replace("max_tokens", tokens_field, 1), param=tokens_field,
                            code=err.code)
        raise err from exc
    try:
        return ChatRequest(
            user=user, messages=body.messages, context=body.context or headers.get(CONTEXT_HEADER) or None,
            groups=body.groups or [], model=body.model, n=body.n if body.n is not None else 1,
            stream=bool(body.stream), params=params, metadata=body.metadata or {},
        )
    except ValidationError as exc:
        raise _validation_error(exc) from exc


# --------------------------------------------------------------------------- responses


def completion_json(resp: Any, model: str) -> dict[str, Any]:
    """A ``ChatResponse`` as an OpenAI ``chat.completion`` object plus ``persona_trace``."""
    return {
        "id": resp.id,
        "object": "chat.completion",
        "created": resp.created,
        "model": resp.model or model,
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "finish_reason": c.finish_reason or "stop",
                "logprobs": None,
            }
            for i, c in enumerate(resp.choices)
        ],
        "usage": resp.usage.model_dump(mode="json"),
        "persona_trace": resp.trace.model_dump(mode="json"),
    }


def _message(c: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.text}
    tool_calls = c.meta.get("tool_calls") if isinstance(getattr(c, "meta", None), dict) else None
    if tool_calls:
        msg["tool_calls"] = tool_calls
        msg["content"] = c.text or None
    return msg


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse_events(
    first: StreamChunk | None, rest: AsyncIterator[StreamChunk], *, completion_id: str, model: str,
    secrets: list[str] | tuple[str, ...] = (),
) -> AsyncIterator[str]:
    """StreamChunks as ``chat.completion.chunk`` SSE events; an error mid-stream becomes an error event."""
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _sse({
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra,
        })

    started: set[int] = set()
    finished: set[int] = set()

    async def chunks() -> AsyncIterator[StreamChunk]:
        if first is not None:
            yield first
            async for c in rest:
                yield c

    try:
        async for c in chunks():
            if c.index not in started:
                started.add(c.index)
                yield chunk(c.index, {"role": "assistant", "content": ""})
            if c.delta:
                yield chunk(c.index, {"content": c.delta})
            if c.done or c.finish_reason:
                extra = {"persona_trace": c.trace.model_dump(mode="json")} if c.trace is not None else {}
                yield chunk(c.index, {}, c.finish_reason or "stop", **extra)
                finished.add(c.index)
        if not started:  # nothing was generated: still a well-formed (empty) answer
            started.add(0)
            yield chunk(0, {"role": "assistant", "content": ""})
        for index in sorted(started - finished):
            yield chunk(index, {}, "stop")
        yield "data: [DONE]\n\n"
    except Exception as exc:
        err = error_for(exc, secrets)
        if err.status >= 500:
            log.error("chat stream %s failed mid-stream: %s", completion_id, exc, exc_info=exc)
        yield _sse(err.body())
    finally:
        await _aclose_shielded(rest)


async def _aclose_shielded(iterator: Any) -> None:
    closer = getattr(iterator, "aclose", None)
    if closer is None:
        return
    import anyio

    # On client disconnect the response task is cancelled; shield so the pipeline's generator
    # still runs its cleanup (trace, after-turn work) instead of being abandoned.
    with anyio.CancelScope(shield=True):
        try:
            await closer()
        except Exception:
            log.exception("closing the chat stream failed")
