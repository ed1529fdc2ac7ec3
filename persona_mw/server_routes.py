"""The HTTP API's route handlers, module-level (``persona_mw.server.create_app`` wires them up).

Each handler takes the raw starlette ``Request`` and finds what the app serves through
``request.app.state.persona`` (a ``ServerState``): the middleware, its tenants, the rate limiter
and the body limits. Bodies are parsed here (size limit, 400s naming fields) rather than by
FastAPI's dependency injection, whose 422s are not OpenAI-shaped. fastapi/starlette are imported
lazily, as in ``persona_mw.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

from pydantic_core import to_jsonable_python

from persona_mw.errors import BackendOverloaded, RequestError, StoreError
from persona_mw.limits import check_groups
from persona_mw.openai_wire import (
    _FEEDBACK,
    CONTEXT_HEADER,
    TRACE_HEADER,
    USER_HEADER,
    HTTPError,
    _aclose_shielded,
    _read_json_object,
    _sse,
    _sse_events,
    _validation_error,
    completion_json,
    error_for,
    to_chat_request,
    upstream_secrets,
)
from persona_mw.ratelimit import DEFAULT_TENANT, RateLimiter
from persona_mw.tenancy import ApiKeys, Tenants, api_key_of
from persona_mw.types import ID_PATTERN, ChatRequest, StreamChunk, new_id

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("persona_mw.server")
T = TypeVar("T")
Handler = Callable[["Request"], Awaitable["Response"]]

_ID_RE = re.compile(ID_PATTERN)


@dataclass
class ServerState:
    """What one app serves: kept on ``app.state.persona`` for the handlers."""

    mw: Any
    limit: int
    max_depth: int
    keys: ApiKeys
    tenants: Tenants | None
    limiter: RateLimiter | None
    close_on_shutdown: bool = False
    _secrets: list[str] | None = field(default=None, repr=False)

    def model_name(self) -> str:
        return str(getattr(self.mw, "model_name", None) or "persona-mw")

    def upstream(self) -> list[str]:
        """The upstream API keys to scrub from errors, computed on first use (backends are built by then)."""
        if self._secrets is None:
            self._secrets = upstream_secrets(self.mw)
        return self._secrets


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.persona
    return state


# --------------------------------------------------------------------------- helpers


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _call_mw(mw: Any, name: str, *args: Any) -> Any:
    """Call ``mw.a<name>`` if it exists, else the sync ``mw.<name>`` in a worker thread."""
    from starlette.concurrency import run_in_threadpool

    async_method = getattr(mw, f"a{name}", None)
    if async_method is not None:
        return await _maybe_await(async_method(*args))
    return await _maybe_await(await run_in_threadpool(getattr(mw, name), *args))


def explain_trace(trace: dict[str, Any]) -> dict[str, Any]:
    """A stored trace as an explanation: granularity, what was used, which plugins changed what."""
    steps = trace.get("steps") or []
    return {
        "id": trace.get("id"), "object": "persona.trace", "user": trace.get("user"),
        "granularity": trace.get("granularity"), "evidence": trace.get("evidence") or {},
        "items_used": trace.get("items_used") or [],
        "changed_by": [{"plugin": s["plugin"], "hook": s["hook"], "summary": s.get("summary", "")}
                       for s in steps if s.get("changed")],
        "errors": [{"plugin": s["plugin"], "hook": s["hook"], "error": s["error"], "skipped": s.get("skipped")}
                   for s in steps if s.get("error")],
        "steps": steps, "timings_ms": trace.get("timings_ms") or {}, "flags": trace.get("flags") or [],
    }


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work for it was cancelled."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first: then ``work`` is cancelled (the local
    model stops at its next step, the turn is flagged ``cancelled``) and ``ClientGone`` is raised.

    The body has been read by then, so the next ASGI message is ``http.disconnect`` (or nothing
    until the response is sent).
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled: so is its work
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    if watcher.exception() is not None:  # the transport cannot tell: just wait for the answer
        try:
            return await task
        except asyncio.CancelledError:
            task.cancel()
            raise
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone("the client disconnected before the answer was ready")


def bearer(request: Request) -> str | None:
    return api_key_of(request.headers)


Shape = Callable[[HTTPError], dict[str, Any]]


def openai_shape(err: HTTPError) -> dict[str, Any]:
    return err.body()


def error_response(state: ServerState, exc: BaseException, shape: Shape = openai_shape) -> Response:
    """The error answer for ``exc`` in ``shape`` (OpenAI's by default; upstream secrets scrubbed, 5xx logged)."""
    from starlette.responses import JSONResponse

    err = error_for(exc, state.upstream())
    if err.status >= 500 and err.type == "server_error":
        log.error("request failed: %s", exc, exc_info=exc)
    elif err.status >= 500:
        log.warning("request failed (%s): %s", err.type, exc)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    retry = _retry_after(exc)
    if err.status == 503 and retry is not None:
        headers = {"Retry-After": str(retry)}
    return JSONResponse(shape(err), status_code=err.status, headers=headers)


def _retry_after(exc: BaseException) -> int | None:
    """The ``Retry-After`` seconds of an overloaded backend anywhere in ``exc``'s cause chain."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, BackendOverloaded):
            return current.retry_after_s
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def tenant_mw(request: Request) -> Any:
    """The middleware this request may see: the app's when open, else its key's tenant's."""
    state = state_of(request)
    if state.tenants is None:
        return state.mw
    key = bearer(request)
    if key is None:
        raise HTTPError(401, "missing API key: send 'Authorization: Bearer <key>'",
                        type="authentication_error", code="missing_api_key")
    tenant = state.keys.tenant_of(key)
    if tenant is None:
        raise HTTPError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    return state.tenants.middleware(tenant)


def _rate_tenant(state: ServerState, request: Request, key: str | None = None) -> str | None:
    """The tenant a request is charged to; None for a missing or unknown key (answered 401)."""
    if state.tenants is None:
        return DEFAULT_TENANT
    key = key if key is not None else bearer(request)
    return state.keys.tenant_of(key) if key is not None else None


def rate_limit_error(request: Request, key: str | None = None) -> tuple[HTTPError, int] | None:
    """``(the 429 error, Retry-After seconds)`` if the request's tenant is over its rate
    (``server.rate_limit``), else None. ``key`` is the API key when it is not a header (the console's
    cookie). Only headers are looked at, so this runs before the body is read. A missing or unknown
    key is not charged (the handler answers 401). Sets the hold a refused client waits for."""
    state: ServerState | None = getattr(request.app.state, "persona", None)
    limiter = state.limiter if state is not None else None
    if state is None or limiter is None:
        return None
    tenant = _rate_tenant(state, request, key)
    if tenant is None:
        return None
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        length = 0
    retry = limiter.check(tenant, length)
    if retry is None:
        return None
    lim = limiter.limit_of(tenant)
    request.state.rate_limit_hold_s = min(float(getattr(lim, "hold_s", 0.0) or 0.0), float(retry))
    name = f"server.tenant_rate_limits.{tenant}" if tenant in limiter.overrides else "server.rate_limit"
    err = HTTPError(429, f"rate limit exceeded for tenant {tenant!r}: {lim.requests_per_s:g} requests/s, "
                    f"burst {lim.burst} ({name}); retry after {retry}s",
                    type="rate_limit_error", param=name, code="rate_limit_exceeded")
    return err, int(retry)


def rate_limited(request: Request, shape: Shape = openai_shape) -> Response | None:
    """A 429 answer in ``shape`` if the request's tenant is over its rate, else None (``rate_limit_error``)."""
    from starlette.responses import JSONResponse

    refused = rate_limit_error(request)
    if refused is None:
        return None
    err, retry = refused
    return JSONResponse(shape(err), status_code=429, headers={"Retry-After": str(retry)})


async def hold_refused(request: Request) -> None:
    """A client that ignores Retry-After waits here (``server.rate_limit.hold_s``) instead of looping."""
    hold = float(getattr(request.state, "rate_limit_hold_s", 0.0) or 0.0)
    if hold > 0:
        await asyncio.sleep(hold)


def guarded(handler: Handler, *, counted: bool = True, shape: Shape = openai_shape) -> Handler:
    """``handler`` behind the rate limit (when ``counted``), with errors turned into answers in ``shape``
    (OpenAI's error JSON unless given)."""
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import Response as StarletteResponse

    async def endpoint(request: Request) -> Response:
        try:
            refused = rate_limited(request, shape) if counted else None
            if refused is not None:
                await hold_refused(request)
                return refused
            return await handler(request)
        except ClientGone:
            # Nobody reads this answer; 499 (nginx's "client closed request") for the access log.
            return StarletteResponse(status_code=499)
        except Exception as exc:
            return error_response(state_of(request), exc, shape)

    endpoint.__name__ = handler.__name__
    # Resolved here, not from the postponed annotation: FastAPI must see the Request class to
    # hand over the raw request instead of treating "request" as a query parameter.
    endpoint.__annotations__ = {"request": StarletteRequest, "return": StarletteResponse}
    return endpoint


def _path_id(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if not _ID_RE.match(value):
        raise HTTPError(400, f"invalid {name} id {value!r}: expected {ID_PATTERN}", param=name, code="invalid_value")
    return value


def path_user(request: Request) -> str:
    return _path_id(request, "user")


def path_group(request: Request) -> str:
    return _path_id(request, "group")


def _json(value: Any, **kwargs: Any) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(value, **kwargs)


# --------------------------------------------------------------------------- chat completions


async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    m = tenant_mw(request)
    data = await _read_json_object(request, state.limit, state.max_depth)
    lim = getattr(getattr(m, "config", None), "limits", None)
    if lim is not None:  # before validating every item: a 20,000-group body is refused cheaply
        check_groups(data.get("groups"), lim)
    chat_request = to_chat_request(data, request.headers)
    model = chat_request.model or state.model_name()
    if chat_request.stream and chat_request.n > 1:
        return await stream_choices(request, m, chat_request, model)
    if chat_request.stream:
        return await stream_completion(request, m, chat_request, model)
    resp = await until_disconnected(request, m.achat(chat_request))
    observed_turn(resp)
    return _json(completion_json(resp, model), headers={TRACE_HEADER: resp.trace.id})


async def _choice_events(body: dict[str, Any], completion_id: str, model: str) -> AsyncIterator[str]:
    """Each of a finished completion's choices as its own SSE chunks; the last carries the trace."""
    created = int(time.time())
    for choice in body["choices"]:
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        i, text = choice["index"], choice["message"]["content"] or ""
        for delta in ({"role": "assistant", "content": ""}, {"content": text}):
            yield _sse({**base, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
        yield _sse({**base, "choices": [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}],
                    **({"persona_trace": body["persona_trace"]} if i == len(body["choices"]) - 1 else {})})
    yield "data: [DONE]\n\n"


async def stream_choices(request: Request, m: Any, chat_request: ChatRequest, model: str) -> Response:
    """``n > 1`` streamed: every candidate is needed before one is picked, so generate them all, then stream each."""
    from starlette.responses import StreamingResponse

    resp = await until_disconnected(request, m.achat(chat_request.model_copy(update={"stream": False})))
    observed_turn(resp)
    body = completion_json(resp, model)
    return StreamingResponse(_choice_events(body, resp.id, model), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", TRACE_HEADER: resp.trace.id})


async def first_chunk(request: Request, m: Any, chat_request: ChatRequest) -> tuple[StreamChunk | None, Any]:
    """Start the turn's stream and wait for its first chunk: ``(first, the rest)``.

    Waiting before answering lets a request the pipeline rejects (bad input, unknown user, backend
    down) get its real status instead of a 200 stream; a client that leaves meanwhile cancels it.
    Once streaming, starlette notices the disconnect and the events' generator closes the pipeline's
    stream (generation stops)."""
    stream = await _maybe_await(m.astream(chat_request))
    iterator = stream.__aiter__()

    async def first() -> StreamChunk | None:
        try:
            return await iterator.__anext__()  # type: ignore[no-any-return]
        except StopAsyncIteration:
            return None

    try:
        chunk = await until_disconnected(request, first())
    except BaseException:
        await _aclose_shielded(iterator)
        raise
    observed(chunk)
    return chunk, Observed(iterator)


def stream_headers(first: StreamChunk | None) -> dict[str, str]:
    """An SSE answer's headers, with the turn's trace id when the first chunk carries it."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    trace_id = (first.trace_id or (first.trace.id if first.trace is not None else None)) if first else None
    if trace_id:
        headers[TRACE_HEADER] = trace_id
    return headers


async def stream_completion(request: Request, m: Any, chat_request: ChatRequest, model: str) -> Response:
    from starlette.responses import StreamingResponse

    first, rest = await first_chunk(request, m, chat_request)
    events = _sse_events(first, rest, completion_id=new_id("chatcmpl"), model=model,
                         secrets=state_of(request).upstream())
    return StreamingResponse(events, media_type="text/event-stream", headers=stream_headers(first))


# --------------------------------------------------------------------------- feedback, users, traces


async def feedback(request: Request) -> Response:
    state = state_of(request)
    m = tenant_mw(request)
    data = await _read_json_object(request, state.limit, state.max_depth)
    if not data.get("user"):
        if not request.headers.get(USER_HEADER):
            raise RequestError(f"missing user: set the 'user' field or the {USER_HEADER} header", field="user")
        data["user"] = request.headers[USER_HEADER]
    if data.get("context") is None and request.headers.get(CONTEXT_HEADER):
        data["context"] = request.headers[CONTEXT_HEADER]
    from pydantic import ValidationError

    try:
        event = _FEEDBACK.validate_python(data)
    except ValidationError as exc:
        raise _validation_error(exc, drop_tag=True) from exc
    try:
        event_id = await m.afeedback(event)
    except StoreError as exc:
        # A client-chosen id that is already stored is the client's conflict, not a store outage.
        if "id" in data and str(exc).startswith("duplicate feedback event id"):
            raise HTTPError(409, str(exc), param="id", code="duplicate_id") from exc
        raise
    return _json({"id": event_id or event.id, "status": "recorded"}, status_code=201)


async def profile(request: Request) -> Response:
    m = tenant_mw(request)
    return _json(to_jsonable_python(await _call_mw(m, "profile", path_user(request))))


async def export_user(request: Request) -> Response:
    m = tenant_mw(request)
    return _json(to_jsonable_python(await _call_mw(m, "export_user", path_user(request))))


async def forget(request: Request) -> Response:
    m = tenant_mw(request)
    user = path_user(request)
    result = await _call_mw(m, "forget", user)
    details = to_jsonable_python(result)
    # scrubbed: false = the rows are deleted, but another connection's snapshot keeps the text in
    # the database/WAL files until a checkpoint can run (retried in the background).
    scrubbed = bool(details.pop("scrubbed", True)) if isinstance(details, dict) else True
    pending = int(details.pop("pending_scrub", 0)) if isinstance(details, dict) else 0
    return _json({"id": user, "object": "user", "deleted": True, "scrubbed": scrubbed,
                  "pending_scrub": pending, "details": details})


async def join_group(request: Request) -> Response:
    m = tenant_mw(request)
    user, group = path_user(request), path_group(request)
    return _json(to_jsonable_python(await _call_mw(m, "join", user, group)))


async def leave_group(request: Request) -> Response:
    m = tenant_mw(request)
    user, group = path_user(request), path_group(request)
    return _json(to_jsonable_python(await _call_mw(m, "leave", user, group)))


async def trace(request: Request) -> Response:
    m = tenant_mw(request)
    trace_id = str(request.path_params["trace_id"])
    found = await _call_mw(m, "trace", trace_id) if len(trace_id) <= 128 else None
    if not found:
        raise HTTPError(404, f"unknown trace {trace_id!r}", type="not_found_error", param="trace_id",
                        code="unknown_trace")
    return _json(to_jsonable_python(explain_trace(found)))


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def metrics(request: Request) -> Response:
    """The Prometheus exposition (``persona_mw.observe``); 501 naming the extra when prometheus-client is missing."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response as StarletteResponse

    from persona_mw import observe

    if not observe.available():
        raise HTTPError(501, f"/metrics needs prometheus-client, the [metrics] extra: {observe.METRICS_EXTRA}",
                        type="not_implemented", code="metrics_extra_missing")
    state = state_of(request)
    mws: list[tuple[str, Any]] = [(DEFAULT_TENANT, state.mw)]
    if state.tenants is not None:
        mws = list(state.tenants._made.items())  # the tenants served so far (each its own store)
    label = bool(getattr(getattr(getattr(state.mw, "config", None), "server", None), "metrics_tenant_label", False))
    body, content_type = await run_in_threadpool(lambda: observe.render(mws, tenant_label=label))
    return StarletteResponse(body, media_type=content_type)


class Observed:
    """A turn's chunk stream that reports the turn (``observe.turn``) when its traced last chunk passes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __aiter__(self) -> Observed:
        return self

    async def __anext__(self) -> StreamChunk:
        chunk: StreamChunk = await self.inner.__anext__()
        observed(chunk)
        return chunk

    async def aclose(self) -> None:
        await _aclose_shielded(self.inner)


def observed(chunk: StreamChunk | None) -> None:
    from persona_mw import observe

    if chunk is not None and chunk.trace is not None:
        observe.turn(chunk.trace, stream=True)


def observed_turn(resp: Any) -> None:
    from persona_mw import observe

    observe.turn(getattr(resp, "trace", None))


async def models(request: Request) -> Response:
    tenant_mw(request)
    card = {"id": state_of(request).model_name(), "object": "model", "created": 0, "owned_by": "persona-mw"}
    return _json({"object": "list", "data": [card]})


# (path, handler, method), in the order the OpenAPI document lists them. Every /v1 route counts
# against its tenant's rate; /healthz (and /openapi.json) do not.
ROUTES: tuple[tuple[str, Handler, str], ...] = (
    ("/v1/chat/completions", chat_completions, "POST"),
    ("/v1/feedback", feedback, "POST"),
    ("/v1/users/{user}/profile", profile, "GET"),
    ("/v1/users/{user}", export_user, "GET"),
    ("/v1/users/{user}", forget, "DELETE"),
    ("/v1/users/{user}/groups/{group}", join_group, "PUT"),
    ("/v1/users/{user}/groups/{group}", leave_group, "DELETE"),
    ("/v1/traces/{trace_id}", trace, "GET"),
    ("/healthz", healthz, "GET"),
    ("/v1/models", models, "GET"),
    ("/metrics", metrics, "GET"),
)


# --------------------------------------------------------------------------- app-level handlers


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Close the tenants' middlewares (and the served one, with ``close_on_shutdown``) at shutdown."""
    try:
        yield
    finally:
        state: ServerState = app.state.persona
        if state.tenants is not None:
            await state.tenants.aclose()
        if state.close_on_shutdown:
            await _maybe_await(state.mw.aclose())


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 unknown route, 405 wrong method) in the OpenAI error shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "error"
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return _json(HTTPError(status, str(detail), type=kind).body(), status_code=status,
                 headers=getattr(exc, "headers", None))


async def unhandled(request: Request, exc: Exception) -> Response:
    return error_response(state_of(request), exc)
