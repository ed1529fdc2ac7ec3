"""The OpenAI-compatible HTTP API over a ``Middleware`` (``persona-mw serve``), plus helpers to run it.

fastapi and uvicorn are the optional extra ``[server]`` and are imported only when an app is built
or served, so importing this module (let alone ``persona_mw``) never requires them. The wire format
(bodies, errors, SSE) lives in ``persona_mw.openai_wire``, the OpenAPI document in ``persona_mw.openapi``.

Routes: ``POST /v1/chat/completions`` (``n`` choices, SSE streaming, ``tools``/``tool_choice`` passed
to backends that take them), ``POST /v1/feedback``, ``GET|DELETE /v1/users/{id}``,
``GET /v1/users/{id}/profile``, ``GET /v1/traces/{id}``, ``GET /v1/models``, ``GET /healthz``,
``GET /openapi.json``; ``POST /v1/messages`` (Anthropic Messages) and ``POST /v1/responses`` (OpenAI
Responses), both streaming, in ``persona_mw.server_formats``. With ``server.api_keys`` configured every ``/v1`` route needs
``Authorization: Bearer <key>`` and sees only the key's tenant (``persona_mw.tenancy``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from persona_mw.limits import DEFAULT_MAX_JSON_DEPTH
from persona_mw.openai_wire import to_chat_request
from persona_mw.ratelimit import RateLimiter
from persona_mw.server_routes import (
    ROUTES,
    ClientGone,
    ServerState,
    bearer,
    _call_mw,
    _maybe_await,
    explain_trace,
    guarded,
    http_exception,
    lifespan,
    unhandled,
    until_disconnected,
)
from persona_mw.server_formats import anthropic_error, messages, responses
from persona_mw.tenancy import ApiKeys, Tenants

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app", "explain_trace", "serve", "serve_in_thread", "to_chat_request"]
# kept importable from here for callers of the earlier single module
_bearer = bearer
_COMPAT = (ClientGone, _bearer, _call_mw, _maybe_await, until_disconnected)

DEFAULT_MAX_BODY_BYTES = 1 << 20
# (path, handler, error shape) of the other wire formats' POST routes (persona_mw.server_formats)
FORMAT_ROUTES: tuple[tuple[str, Any, Any], ...] = (
    ("/v1/messages", messages, anthropic_error),
    ("/v1/responses", responses, lambda err: err.body()),
)


def _import_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the HTTP server needs fastapi and uvicorn ({exc.name} is missing): pip install 'persona-mw[server]'"
        ) from exc


# --------------------------------------------------------------------------- the app


def _server_state(mw: Any, max_body_bytes: int | None, api_keys: dict[str, list[str]] | None,
                  close_on_shutdown: bool) -> ServerState:
    """What the handlers need, resolved from the arguments and else the config's ``server:`` section."""
    config = getattr(mw, "config", None)
    server_cfg = getattr(config, "server", None)
    limit = max_body_bytes or getattr(server_cfg, "max_body_bytes", None) or DEFAULT_MAX_BODY_BYTES
    max_depth = getattr(getattr(config, "limits", None), "max_json_depth", None) or DEFAULT_MAX_JSON_DEPTH
    keys = ApiKeys(api_keys if api_keys is not None else getattr(server_cfg, "api_keys", None) or {})
    return ServerState(mw=mw, limit=limit, max_depth=max_depth, keys=keys,
                       tenants=Tenants(mw, keys) if keys else None,
                       limiter=RateLimiter.from_config(server_cfg), close_on_shutdown=close_on_shutdown)


def _install_openapi(app: FastAPI, components: dict[str, Any], keys: bool) -> None:
    """Serve the OpenAPI document declared in ``persona_mw.openapi`` instead of FastAPI's inferred one."""
    from fastapi.openapi.utils import get_openapi

    from persona_mw import openapi

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for ops in doc.get("paths", {}).values():
                for op in ops.values():  # drop FastAPI's generic 422 (we answer 400s)
                    op.get("responses", {}).pop("422", None)
                    op.get("responses", {}).pop("default", None)
            app.openapi_schema = openapi.finish(doc, components, keys=keys)
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]


def _install_observability(app: FastAPI, state: ServerState) -> None:
    """Request metrics and access logs (``persona_mw.observe.AccessMiddleware``); spans when configured."""
    from persona_mw import observe

    server_cfg = getattr(getattr(state.mw, "config", None), "server", None)
    observe.enable_metrics()  # per-plugin stage timings from the hook runner, for /metrics
    observe.configure_tracing(bool(getattr(server_cfg, "otel", False)))
    log_cfg = getattr(getattr(state.mw, "config", None), "logging", None)

    def tenant_of(scope: Any) -> str:
        if not getattr(server_cfg, "metrics_tenant_label", False) or state.tenants is None:
            return ""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, value = headers.get("authorization", "").partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else headers.get("x-api-key")
        return (state.keys.tenant_of(key) if key else None) or ""

    app.add_middleware(observe.AccessMiddleware, tenant_of=tenant_of,
                       access_log=bool(getattr(log_cfg, "access_log", True)))


def create_app(
    mw: Any, *, max_body_bytes: int | None = None, api_keys: dict[str, list[str]] | None = None,
    close_on_shutdown: bool = False,
) -> FastAPI:
    """Build the FastAPI app serving ``mw``.

    ``max_body_bytes`` and ``api_keys`` (``{tenant: [key or "sha256:<hex>"]}``) default to the
    config's ``server:`` section. No keys: the API is open and serves ``mw`` itself. With keys:
    each tenant gets its own store (see ``persona_mw.tenancy``). ``close_on_shutdown`` awaits
    ``mw.aclose()`` at shutdown. The handlers live in ``persona_mw.server_routes`` and read
    ``app.state.persona``.
    """
    _import_server_deps()
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from persona_mw import openapi

    state = _server_state(mw, max_body_bytes, api_keys, close_on_shutdown)
    app = FastAPI(title="persona-mw", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat completions, personalized per user.")
    app.state.persona = state
    docs, components = openapi.route_docs()
    # The schema of each route is declared in persona_mw.openapi instead of inferred.
    for path, handler, method in ROUTES:
        extra = dict(docs[f"{method} {path}"])
        app.add_api_route(path, guarded(handler, counted=path.startswith("/v1/")), methods=[method],
                          summary=extra.pop("summary"), openapi_extra=extra, response_model=None)
    for path, handler, shape in FORMAT_ROUTES:  # Anthropic Messages, OpenAI Responses: each its own errors
        extra = dict(docs[f"POST {path}"])
        app.add_api_route(path, guarded(handler, shape=shape), methods=["POST"], summary=extra.pop("summary"),
                          openapi_extra=extra, response_model=None)
    _install_openapi(app, components, keys=bool(state.keys))
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(Exception, unhandled)
    app.state.middleware = mw
    app.state.tenants = state.tenants
    _install_observability(app, state)
    from persona_mw.console import install as install_console

    install_console(app)  # the data API (persona_mw.api_data) and the web console under /console
    return app


# --------------------------------------------------------------------------- running it


def serve(mw: Any, host: str = "127.0.0.1", port: int = 8000, *, max_body_bytes: int | None = None) -> None:
    """Serve ``mw`` with uvicorn until interrupted; closes the middleware on shutdown."""
    _import_server_deps()
    import uvicorn

    from persona_mw import observe

    log_cfg = getattr(getattr(mw, "config", None), "logging", None)
    if log_cfg is not None:
        observe.setup_logging(log_cfg)  # `logging:` level and json; uvicorn's own access log is off
    app = create_app(mw, max_body_bytes=max_body_bytes, close_on_shutdown=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


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
