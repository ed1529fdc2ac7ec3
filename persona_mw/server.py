"""The OpenAI-compatible HTTP API over a ``Middleware`` (``persona-mw serve``), plus helpers to run it.

fastapi and uvicorn are the optional extra ``[server]`` and are imported only when an app is built
or served, so importing this module (let alone ``persona_mw``) never requires them. The wire format
(bodies, errors, SSE) lives in ``persona_mw.openai_wire``, the OpenAPI document in ``persona_mw.openapi``.

Routes: ``POST /v1/chat/completions`` (``n`` choices, SSE streaming, ``tools``/``tool_choice`` passed
to backends that take them), ``POST /v1/feedback``, ``GET|DELETE /v1/users/{id}``,
``GET /v1/users/{id}/profile``, ``GET /v1/traces/{id}``, ``GET /v1/models``, ``GET /healthz``,
``GET /openapi.json``. With ``server.api_keys`` configured every ``/v1`` route needs
``Authorization: Bearer <key>`` and sees only the key's tenant (``persona_mw.tenancy``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from pydantic_core import to_jsonable_python

from persona_mw.errors import RequestError, StoreError
from persona_mw.limits import DEFAULT_MAX_JSON_DEPTH, check_groups
from persona_mw.openai_wire import (
    CONTEXT_HEADER,
    TRACE_HEADER,
    USER_HEADER,
    HTTPError,
    _aclose_shielded,
    _read_json_object,
    _sse,
    _sse_events,
    _validation_error,
    _FEEDBACK,
    completion_json,
    error_for,
    to_chat_request,
    upstream_secrets,
)
from persona_mw.ratelimit import DEFAULT_TENANT, RateLimiter
from persona_mw.tenancy import ApiKeys, Tenants
from persona_mw.types import ID_PATTERN, ChatRequest, StreamChunk, new_id

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "explain_trace", "serve", "serve_in_thread", "to_chat_request"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
_ID_RE = re.compile(ID_PATTERN)


def _import_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the HTTP server needs fastapi and uvicorn ({exc.name} is missing): pip install 'persona-mw[server]'"
        ) from exc


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
    import asyncio

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


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


# --------------------------------------------------------------------------- the app


def create_app(
    mw: Any, *, max_body_bytes: int | None = None, api_keys: dict[str, list[str]] | None = None,
    close_on_shutdown: bool = False,
) -> FastAPI:
    """Build the FastAPI app serving ``mw``.

    ``max_body_bytes`` and ``api_keys`` (``{tenant: [key or "sha256:<hex>"]}``) default to the
    config's ``server:`` section. No keys: the API is open and serves ``mw`` itself. With keys:
    each tenant gets its own store (see ``persona_mw.tenancy``). ``close_on_shutdown`` awaits
    ``mw.aclose()`` at shutdown.
    """
    _import_server_deps()
    from fastapi import FastAPI
    from fastapi.openapi.utils import get_openapi
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.responses import Response as StarletteResponse

    from persona_mw import openapi

    server_cfg = getattr(getattr(mw, "config", None), "server", None)
    limit = max_body_bytes or getattr(server_cfg, "max_body_bytes", None) or DEFAULT_MAX_BODY_BYTES
    max_depth = getattr(getattr(getattr(mw, "config", None), "limits", None), "max_json_depth", None) \
        or DEFAULT_MAX_JSON_DEPTH
    keys = ApiKeys(api_keys if api_keys is not None else getattr(server_cfg, "api_keys", None) or {})
    tenants = Tenants(mw, keys) if keys else None
    limiter = RateLimiter.from_config(server_cfg)

    def model_name() -> str:
        return str(getattr(mw, "model_name", None) or "persona-mw")

    secrets: list[list[str]] = []  # computed on first use: backends are built by then

    def upstream() -> list[str]:
        if not secrets:
            secrets.append(upstream_secrets(mw))
        return secrets[0]

    def error_response(exc: BaseException) -> Response:
        err = error_for(exc, upstream())
        if err.status >= 500 and err.type == "server_error":
            log.error("request failed: %s", exc, exc_info=exc)
        elif err.status >= 500:
            log.warning("request failed (%s): %s", err.type, exc)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def tenant_mw(request: Request) -> Any:
        """The middleware this request may see: ``mw`` when open, else its key's tenant's."""
        if tenants is None:
            return mw
        key = _bearer(request)
        if key is None:
            raise HTTPError(401, "missing API key: send 'Authorization: Bearer <key>'",
                            type="authentication_error", code="missing_api_key")
        tenant = keys.tenant_of(key)
        if tenant is None:
            raise HTTPError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        return tenants.middleware(tenant)

    def rate_limited(request: Request) -> Response | None:
        """A 429 if the request's tenant is over its rate (``server.rate_limit``), else None.

        Runs before the body is read: only headers are looked at. A missing or unknown key is not
        charged (the handler answers 401)."""
        if limiter is None:
            return None
        if tenants is None:
            tenant: str | None = DEFAULT_TENANT
        else:
            key = _bearer(request)
            tenant = keys.tenant_of(key) if key is not None else None
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
        return JSONResponse(err.body(), status_code=429, headers={"Retry-After": str(retry)})

    def refused_hold(request: Request) -> float:
        return float(getattr(request.state, "rate_limit_hold_s", 0.0) or 0.0)

    def guarded(handler: Callable[[Request], Awaitable[Response]], *, counted: bool = True,
                ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                refused = rate_limited(request) if counted else None
                if refused is not None:
                    hold = refused_hold(request)
                    if hold > 0:  # a client that ignores Retry-After waits here instead of looping
                        import asyncio

                        await asyncio.sleep(hold)
                    return refused
                return await handler(request)
            except ClientGone:
                # Nobody reads this answer; 499 (nginx's "client closed request") for the access log.
                return StarletteResponse(status_code=499)
            except Exception as exc:
                return error_response(exc)

        endpoint.__name__ = handler.__name__
        # Resolved here, not from the postponed annotation: FastAPI must see the Request class to
        # hand over the raw request instead of treating "request" as a query parameter.
        endpoint.__annotations__ = {"request": StarletteRequest, "return": StarletteResponse}
        return endpoint

    def path_user(request: Request) -> str:
        user = str(request.path_params["user"])
        if not _ID_RE.match(user):
            raise HTTPError(400, f"invalid user id {user!r}: expected {ID_PATTERN}", param="user", code="invalid_value")
        return user

    async def chat_completions(request: Request) -> Response:
        m = tenant_mw(request)
        data = await _read_json_object(request, limit, max_depth)
        lim = getattr(getattr(m, "config", None), "limits", None)
        if lim is not None:  # before validating every item: a 20,000-group body is refused cheaply
            check_groups(data.get("groups"), lim)
        chat_request = to_chat_request(data, request.headers)
        model = chat_request.model or model_name()
        if chat_request.stream and chat_request.n > 1:
            return await stream_choices(request, m, chat_request, model)
        if chat_request.stream:
            return await stream_completion(request, m, chat_request, model)
        resp = await until_disconnected(request, m.achat(chat_request))
        return JSONResponse(completion_json(resp, model), headers={TRACE_HEADER: resp.trace.id})

    async def stream_choices(request: Request, m: Any, chat_request: ChatRequest, model: str) -> Response:
        # n > 1 needs every candidate before one is picked: generate them all, then stream each.
        resp = await until_disconnected(request, m.achat(chat_request.model_copy(update={"stream": False})))
        body = completion_json(resp, model)
        created = int(time.time())

        async def events() -> AsyncIterator[str]:
            for choice in body["choices"]:
                base = {"id": resp.id, "object": "chat.completion.chunk", "created": created, "model": model}
                i, text = choice["index"], choice["message"]["content"] or ""
                for delta in ({"role": "assistant", "content": ""}, {"content": text}):
                    yield _sse({**base, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
                yield _sse({**base, "choices": [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}],
                            **({"persona_trace": body["persona_trace"]} if i == len(body["choices"]) - 1 else {})})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", TRACE_HEADER: resp.trace.id})

    async def stream_completion(request: Request, m: Any, chat_request: ChatRequest, model: str) -> Response:
        stream = await _maybe_await(m.astream(chat_request))
        iterator = stream.__aiter__()

        async def first_chunk() -> StreamChunk | None:
            try:
                return await iterator.__anext__()  # type: ignore[no-any-return]
            except StopAsyncIteration:
                return None

        # Wait for the first chunk before answering, so that a request the pipeline rejects
        # (bad input, unknown user, backend down) gets its real status instead of a 200 stream;
        # a client that leaves meanwhile cancels it. Once streaming, starlette notices the
        # disconnect and the events' generator closes the pipeline's stream (generation stops).
        try:
            first = await until_disconnected(request, first_chunk())
        except BaseException:
            await _aclose_shielded(iterator)
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        trace_id = first.trace_id or (first.trace.id if first.trace is not None else None) if first else None
        if trace_id:
            headers[TRACE_HEADER] = trace_id
        events = _sse_events(first, iterator, completion_id=new_id("chatcmpl"), model=model, secrets=upstream())
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def feedback(request: Request) -> Response:
        m = tenant_mw(request)
        data = await _read_json_object(request, limit, max_depth)
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
        return JSONResponse({"id": event_id or event.id, "status": "recorded"}, status_code=201)

    async def profile(request: Request) -> Response:
        m = tenant_mw(request)
        return JSONResponse(to_jsonable_python(await _call_mw(m, "profile", path_user(request))))

    async def export_user(request: Request) -> Response:
        m = tenant_mw(request)
        return JSONResponse(to_jsonable_python(await _call_mw(m, "export_user", path_user(request))))

    async def forget(request: Request) -> Response:
        m = tenant_mw(request)
        user = path_user(request)
        result = await _call_mw(m, "forget", user)
        details = to_jsonable_python(result)
        # scrubbed: false = the rows are deleted, but another connection's snapshot keeps the text in
        # the database/WAL files until a checkpoint can run (retried in the background).
        scrubbed = bool(details.pop("scrubbed", True)) if isinstance(details, dict) else True
        pending = int(details.pop("pending_scrub", 0)) if isinstance(details, dict) else 0
        return JSONResponse({"id": user, "object": "user", "deleted": True, "scrubbed": scrubbed,
                             "pending_scrub": pending, "details": details})

    def path_group(request: Request) -> str:
        group = str(request.path_params["group"])
        if not _ID_RE.match(group):
            raise HTTPError(400, f"invalid group id {group!r}: expected {ID_PATTERN}", param="group",
                            code="invalid_value")
        return group

    async def join_group(request: Request) -> Response:
        m = tenant_mw(request)
        user, group = path_user(request), path_group(request)
        return JSONResponse(to_jsonable_python(await _call_mw(m, "join", user, group)))

    async def leave_group(request: Request) -> Response:
        m = tenant_mw(request)
        user, group = path_user(request), path_group(request)
        return JSONResponse(to_jsonable_python(await _call_mw(m, "leave", user, group)))

    async def trace(request: Request) -> Response:
        m = tenant_mw(request)
        trace_id = str(request.path_params["trace_id"])
        found = await _call_mw(m, "trace", trace_id) if len(trace_id) <= 128 else None
        if not found:
            raise HTTPError(404, f"unknown trace {trace_id!r}", type="not_found_error", param="trace_id",
                            code="unknown_trace")
        return JSONResponse(to_jsonable_python(explain_trace(found)))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        tenant_mw(request)
        card = {"id": model_name(), "object": "model", "created": 0, "owned_by": "persona-mw"}
        return JSONResponse({"object": "list", "data": [card]})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if tenants is not None:
                await tenants.aclose()
            if close_on_shutdown:
                await _maybe_await(mw.aclose())

    app = FastAPI(title="persona-mw", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat completions, personalized per user.")
    docs, components = openapi.route_docs()
    # Handlers take the raw Request: bodies are parsed here (size limit, 400s naming fields) rather
    # than by FastAPI's dependency injection, whose 422s are not OpenAI-shaped. The schema of each
    # route is declared in persona_mw.openapi instead of inferred.
    for path, handler, method in (
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
    ):
        extra = dict(docs[f"{method} {path}"])
        # every /v1 route counts against its tenant's rate; /healthz (and /openapi.json) do not
        app.add_api_route(path, guarded(handler, counted=path.startswith("/v1/")), methods=[method],
                          summary=extra.pop("summary"),
                          openapi_extra=extra, response_model=None)

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for ops in doc.get("paths", {}).values():
                for op in ops.values():  # drop FastAPI's generic 422 (we answer 400s)
                    op.get("responses", {}).pop("422", None)
                    op.get("responses", {}).pop("default", None)
            app.openapi_schema = openapi.finish(doc, components, keys=bool(keys))
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]

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
    app.state.tenants = tenants
    from persona_mw.console import install as install_console

    install_console(app)  # the data API (persona_mw.api_data) and the web console under /console
    return app


# --------------------------------------------------------------------------- running it


def serve(mw: Any, host: str = "127.0.0.1", port: int = 8000, *, max_body_bytes: int | None = None) -> None:
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
