"""The OpenAI-compatible HTTP API over a ``Middleware`` (``persona-mw serve``), plus helpers to run it.

fastapi and uvicorn are the optional extra ``[server]`` and are imported only when an app is built
or served, so importing this module (let alone ``persona_mw``) never requires them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from persona_mw.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    PersonaError,
    PluginError,
    RequestError,
    StoreError,
    UnknownUserError,
)
from persona_mw.types import ID_PATTERN, ChatRequest, Feedback, GenerationParams, Message, StreamChunk, new_id

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "serve", "serve_in_thread"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
USER_HEADER = "X-Persona-User"
CONTEXT_HEADER = "X-Persona-Context"
TRACE_HEADER = "X-Persona-Trace-Id"
_ID_RE = re.compile(ID_PATTERN)
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|bytes|none|.*\[.*\])$")
# How much of an oversize body is read (and dropped) before answering 413: a client that is still
# sending when the server answers and closes often sees a reset instead of the 413.
_DRAIN_FACTOR = 16


def _import_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the HTTP server needs fastapi and uvicorn ({exc.name} is missing): pip install 'persona-mw[server]'"
        ) from exc


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


def error_for(exc: BaseException) -> HTTPError:
    """Map any exception onto the HTTP error answered for it (500s are logged by the caller)."""
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


async def _read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, or an HTTPError: wrong content type, too large, malformed, not an object."""
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
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason or "stop",
                "logprobs": None,
            }
            for i, c in enumerate(resp.choices)
        ],
        "usage": resp.usage.model_dump(mode="json"),
        "persona_trace": resp.trace.model_dump(mode="json"),
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse_events(
    first: StreamChunk | None, rest: AsyncIterator[StreamChunk], *, completion_id: str, model: str
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
        err = error_for(exc)
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


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _call_mw(mw: Any, name: str, *args: Any) -> Any:
    """Call ``mw.a<name>`` if it exists, else the sync ``mw.<name>`` in a worker thread."""
    from starlette.concurrency import run_in_threadpool

    async_method = getattr(mw, f"a{name}", None)
    if async_method is not None:
        return await _maybe_await(async_method(*args))
    return await _maybe_await(await run_in_threadpool(getattr(mw, name), *args))


# --------------------------------------------------------------------------- the app


def create_app(mw: Any, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, close_on_shutdown: bool = False) -> FastAPI:
    """Build the FastAPI app serving ``mw``. ``close_on_shutdown`` awaits ``mw.aclose()`` at shutdown."""
    _import_server_deps()
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    def model_name() -> str:
        return str(getattr(mw, "model_name", None) or "persona-mw")

    def error_response(exc: BaseException) -> Response:
        err = error_for(exc)
        if err.status >= 500 and err.type == "server_error":
            log.error("request failed: %s", exc, exc_info=exc)
        elif err.status >= 500:
            log.warning("request failed (%s): %s", err.type, exc)
        return JSONResponse(err.body(), status_code=err.status)

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        endpoint.__name__ = handler.__name__
        return endpoint

    def path_user(request: Request) -> str:
        user = str(request.path_params["user"])
        if not _ID_RE.match(user):
            raise HTTPError(400, f"invalid user id {user!r}: expected {ID_PATTERN}", param="user", code="invalid_value")
        return user

    async def chat_completions(request: Request) -> Response:
        chat_request = to_chat_request(await _read_json_object(request, max_body_bytes), request.headers)
        model = chat_request.model or model_name()
        if chat_request.stream:
            return await stream_completion(chat_request, model)
        resp = await mw.achat(chat_request)
        return JSONResponse(completion_json(resp, model), headers={TRACE_HEADER: resp.trace.id})

    async def stream_completion(chat_request: ChatRequest, model: str) -> Response:
        stream = await _maybe_await(mw.astream(chat_request))
        iterator = stream.__aiter__()
        # Wait for the first chunk before answering, so that a request the pipeline rejects
        # (bad input, unknown user, backend down) gets its real status instead of a 200 stream.
        try:
            first: StreamChunk | None = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await _aclose_shielded(iterator)
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        trace_id = first.trace_id or (first.trace.id if first.trace is not None else None) if first else None
        if trace_id:
            headers[TRACE_HEADER] = trace_id
        events = _sse_events(first, iterator, completion_id=new_id("chatcmpl"), model=model)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def feedback(request: Request) -> Response:
        data = await _read_json_object(request, max_body_bytes)
        if not data.get("user"):
            if not request.headers.get(USER_HEADER):
                raise RequestError(f"missing user: set the 'user' field or the {USER_HEADER} header", field="user")
            data["user"] = request.headers[USER_HEADER]
        if data.get("context") is None and request.headers.get(CONTEXT_HEADER):
            data["context"] = request.headers[CONTEXT_HEADER]
        try:
            event = _FEEDBACK.validate_python(data)
        except ValidationError as exc:
            raise _validation_error(exc, drop_tag=True) from exc
        event_id = await mw.afeedback(event)
        return JSONResponse({"id": event_id or event.id, "status": "recorded"}, status_code=201)

    async def profile(request: Request) -> Response:
        return JSONResponse(to_jsonable_python(await _call_mw(mw, "profile", path_user(request))))

    async def export_user(request: Request) -> Response:
        return JSONResponse(to_jsonable_python(await _call_mw(mw, "export_user", path_user(request))))

    async def forget(request: Request) -> Response:
        user = path_user(request)
        result = await _call_mw(mw, "forget", user)
        return JSONResponse({"id": user, "object": "user", "deleted": True, "details": to_jsonable_python(result)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        card = {"id": model_name(), "object": "model", "created": 0, "owned_by": "persona-mw"}
        return JSONResponse({"object": "list", "data": [card]})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_on_shutdown:
                await _maybe_await(mw.aclose())

    app = FastAPI(title="persona-mw", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Plain Starlette routes: bodies are parsed here (size limit, 400s naming fields) rather than
    # by FastAPI's dependency injection, whose 422s are not OpenAI-shaped.
    for path, handler, methods in (
        ("/v1/chat/completions", chat_completions, ["POST"]),
        ("/v1/feedback", feedback, ["POST"]),
        ("/v1/users/{user}/profile", profile, ["GET"]),
        ("/v1/users/{user}", export_user, ["GET"]),
        ("/v1/users/{user}", forget, ["DELETE"]),
        ("/healthz", healthz, ["GET"]),
        ("/v1/models", models, ["GET"]),
    ):
        app.add_route(path, guarded(handler), methods=methods)

    async def http_exception(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return JSONResponse(HTTPError(status, str(detail), type=kind).body(), status_code=status,
                            headers=getattr(exc, "headers", None))

    async def unhandled(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(Exception, unhandled)
    app.state.middleware = mw
    return app


# --------------------------------------------------------------------------- running it


def serve(mw: Any, host: str = "127.0.0.1", port: int = 8000, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve ``mw`` with uvicorn until interrupted; closes the middleware on shutdown."""
    _import_server_deps()
    import uvicorn

    app = create_app(mw, max_body_bytes=max_body_bytes, close_on_shutdown=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 15.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields the base URL (``http://host:port``).

    ``port=0`` picks a free port. On exit the server shuts down and the thread is joined.
    """
    _import_server_deps()
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"persona-mw-server-{bound_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if failure or not thread.is_alive():
                raise RuntimeError(f"the server on {host}:{bound_port} failed to start") from (
                    failure[0] if failure else None
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{bound_port} did not start within {timeout:g}s")
            time.sleep(0.01)
        url_host = f"[{host}]" if family == socket.AF_INET6 else host
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        if thread.is_alive():
            log.warning("the server thread on %s:%s did not stop within %gs", host, bound_port, timeout)
