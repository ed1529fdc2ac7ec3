"""The data API a console needs (``persona-mw serve``): users, memories, recent traces, batch feedback.

Routes (an ``APIRouter`` that ``persona_mw.server.create_app`` includes):

- ``GET /v1/users`` (``q`` searches ids, ``limit``, ``offset``)
- ``GET /v1/users/{user}/memories`` (``context``, ``include_superseded``, ``limit``, ``offset``)
- ``GET /v1/users/{user}/memories/search`` (``q``, ``k``, ``mode``, ``context``)
- ``POST /v1/users/{user}/memories`` (add), ``PATCH|DELETE /v1/users/{user}/memories/{memory_id}``
  (edit the text, pin or unpin; delete with its superseded history)
- ``GET /v1/users/{user}/traces`` (the most recent traces, with each plugin's step and the final prompt)
- ``POST /v1/feedback/batch`` (up to 1,000 events: all validated before any is recorded)

Each handler sees only its key's tenant, exactly as the chat routes (``request_middleware``), and uses
only the middleware's public verbs, ``mw.memory`` and the store's public methods. Errors are the
OpenAI-shaped bodies of ``persona_mw.openai_wire``: a 400 names the field, an unknown user or memory is
a 404; nothing here answers a 5xx for bad input.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from pydantic_core import to_jsonable_python
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from persona_mw.nodes import context_of, is_user_node_of
from persona_mw.errors import RequestError, StoreError
from persona_mw.limits import DEFAULT_MAX_JSON_DEPTH
from persona_mw.memory.manager import UnknownMemoryError
from persona_mw.openai_wire import (
    CONTEXT_HEADER,
    USER_HEADER,
    HTTPError,
    _FEEDBACK,
    _read_json_object,
    _validation_error,
    error_for,
    upstream_secrets,
)
from persona_mw.tenancy import api_key_of
from persona_mw.types import ID_PATTERN, Memory

__all__ = ["build_router", "memory_json", "request_middleware", "route_docs", "trace_json"]

_ID_RE = re.compile(ID_PATTERN)
MAX_BATCH = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20


# --------------------------------------------------------------------------- shared with the console




def request_middleware(request: Request, key: str | None = None) -> Any:
    """The middleware this request may see: the app's own when no API keys are configured, else the
    tenant's of ``key`` (default: the request's bearer key). Mirrors ``create_app``'s ``tenant_mw``.

    (Merge note: ``server.py`` keeps that one as a closure; both read ``app.state``.)
    """
    tenants = getattr(request.app.state, "tenants", None)
    if tenants is None:
        return request.app.state.middleware
    key = key if key is not None else api_key_of(request.headers)
    if key is None:
        raise HTTPError(401, "missing API key: send 'Authorization: Bearer <key>'",
                        type="authentication_error", code="missing_api_key")
    tenant = tenants.keys.tenant_of(key)
    if tenant is None:
        raise HTTPError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    from persona_mw.console.record import record_prompts

    m = tenants.middleware(tenant)
    record_prompts(m)
    return m


def check_id(value: str, field: str) -> str:
    if not _ID_RE.match(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise HTTPError(400, f"invalid {field} id {shown!r}: expected {ID_PATTERN}", param=field, code="invalid_value")
    return value


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise HTTPError(400, f"{name} must be an integer from {lo} to {hi}, got {raw[:40]!r}", param=name,
                        code="invalid_value")
    return value


def str_param(request: Request, name: str, max_len: int = 2000) -> str | None:
    raw = request.query_params.get(name)
    if raw is not None and len(raw) > max_len:
        raise HTTPError(400, f"{name} is longer than {max_len} characters", param=name, code="invalid_value")
    return raw


def bool_param(request: Request, name: str) -> bool:
    raw = (request.query_params.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise HTTPError(400, f"{name} must be true or false, got {raw[:40]!r}", param=name, code="invalid_value")
    return raw in ("true", "1")


def is_pinned(m: Memory) -> bool:
    """Offered in the prompt on every turn: pinned by hand, or a preference not unpinned."""
    return m.meta.get("pinned") is True or (m.kind == "preference" and m.meta.get("pinned") is not False)


def memory_json(m: Memory, user: str) -> dict[str, Any]:
    owner = m.owner
    context = context_of(owner) if is_user_node_of(owner, user) else None
    meta = {k: v for k, v in m.meta.items() if k not in ("idem", "index_text")}
    return {"id": m.id, "object": "memory", "user": user, "context": context, "owner": owner, "text": m.text,
            "kind": m.kind, "polarity": m.polarity, "pinned": is_pinned(m), "provenance": list(m.provenance),
            "source": m.meta.get("source"), "created_at": m.created_at, "updated_at": m.updated_at,
            "superseded_by": m.superseded_by, "meta": to_jsonable_python(meta)}


def trace_json(t: Any) -> dict[str, Any]:
    from persona_mw.server import explain_trace

    data = t.model_dump(mode="json") if hasattr(t, "model_dump") else dict(t)
    return {**explain_trace(data), "prompt": data.get("prompt") or []}


def list_traces(m: Any, user: str, limit: int) -> list[Any]:
    return list(m.store.list_traces(user, limit))


def list_users(m: Any, query: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
    return list(m.store.list_users(query, limit, offset))


def body_limits(m: Any) -> tuple[int, int]:
    cfg = getattr(m, "config", None)
    limit = getattr(getattr(cfg, "server", None), "max_body_bytes", None) or DEFAULT_MAX_BODY_BYTES
    depth = getattr(getattr(cfg, "limits", None), "max_json_depth", None) or DEFAULT_MAX_JSON_DEPTH
    return int(limit), int(depth)


def to_http_error(exc: BaseException, m: Any = None) -> HTTPError:
    if isinstance(exc, UnknownMemoryError):
        return HTTPError(404, str(exc), type="not_found_error", param="memory_id", code="unknown_memory")
    return error_for(exc, upstream_secrets(m) if m is not None else [])


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` behind the server's rate limit; every exception becomes its OpenAI-shaped error (a 5xx
    only for a real server fault, logged)."""
    import logging

    log = logging.getLogger(__name__)

    async def endpoint(request: Request) -> Response:
        from persona_mw.server_routes import hold_refused, rate_limited

        try:
            refused = rate_limited(request)  # the same per-tenant rate as /v1 (server.rate_limit)
            if refused is not None:
                await hold_refused(request)
                return refused
            return await handler(request)
        except Exception as exc:
            err = to_http_error(exc, getattr(request.app.state, "middleware", None))
            if err.status >= 500:
                log.error("request failed: %s", exc, exc_info=exc)
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return JSONResponse(err.body(), status_code=err.status, headers=headers)

    endpoint.__name__ = handler.__name__
    endpoint.__annotations__ = {"request": Request, "return": Response}
    return endpoint


# --------------------------------------------------------------------------- bodies


class MemoryCreate(BaseModel):
    """A memory written by hand (through the same update logic as extracted ones: a duplicate merges)."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(min_length=1, max_length=2000, description="what to remember, in words")
    kind: Literal["fact", "preference", "episode"] = "preference"
    polarity: Literal["like", "avoid", "constraint"] | None = Field(
        default="like", description="preferences only: like, avoid or constraint")
    context: StrictStr | None = Field(default=None, pattern=ID_PATTERN,
                                      description="the context it holds in (constraints hold in every context)")
    pinned: StrictBool | None = Field(default=None, description="offer it in the prompt on every turn")
    provenance: list[StrictStr] = Field(default_factory=list, max_length=50,
                                        description="ids of the source messages or events")


class MemoryPatch(BaseModel):
    """A change to one memory: its text, whether it is pinned, or both."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr | None = Field(default=None, min_length=1, max_length=2000)
    pinned: StrictBool | None = None


class FeedbackBatch(BaseModel):
    """Feedback events recorded in order; all are validated before any is recorded."""

    model_config = ConfigDict(extra="forbid")
    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH,
                                         description="feedback events, each as POST /v1/feedback takes it")


def parse_body(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


# --------------------------------------------------------------------------- handlers


def _user(request: Request) -> str:
    return check_id(str(request.path_params["user"]), "user")


def is_memory_id(mid: str) -> bool:
    """The shape every memory id has (what a path may name; a NUL or a slash never is one)."""
    return len(mid) <= 128 and bool(_ID_RE.match(mid))


def _memory_id(request: Request) -> str:
    mid = str(request.path_params["memory_id"])
    if not is_memory_id(mid):
        raise HTTPError(404, f"unknown memory {mid[:80]!r}", type="not_found_error", param="memory_id",
                        code="unknown_memory")
    return mid


async def users(request: Request) -> Response:
    m = request_middleware(request)
    q = str_param(request, "q", 128)
    limit = int_param(request, "limit", 100, 1, 1000)
    offset = int_param(request, "offset", 0, 0, 10_000_000)
    rows = await asyncio.to_thread(list_users, m, q or None, limit + 1, offset)
    data = [{"object": "user", **r} for r in rows[:limit]]
    return JSONResponse({"object": "list", "data": data, "has_more": len(rows) > limit})


async def memories(request: Request) -> Response:
    m = request_middleware(request)
    user = _user(request)
    context = str_param(request, "context", 128)
    if context is not None:
        check_id(context, "context")
    superseded = bool_param(request, "include_superseded")
    limit = int_param(request, "limit", 100, 1, 1000)
    offset = int_param(request, "offset", 0, 0, 10_000_000)

    def run() -> list[Memory]:
        m.memory.require_user(user)
        return list(m.memory.list(user, include_superseded=superseded, context=context))

    mems = await asyncio.to_thread(run)
    page = mems[offset:offset + limit]
    return JSONResponse({"object": "list", "data": [memory_json(x, user) for x in page],
                         "total": len(mems), "has_more": offset + limit < len(mems)})


async def search_memories(request: Request) -> Response:
    m = request_middleware(request)
    user = _user(request)
    q = str_param(request, "q", 2000)
    if not q or not q.strip():
        raise HTTPError(400, "missing q: the search text", param="q", code="missing_value")
    k = int_param(request, "k", 10, 1, 100)
    mode = request.query_params.get("mode") or "fused"
    context = str_param(request, "context", 128)
    if context is not None:
        check_id(context, "context")

    def run() -> list[Any]:
        m.memory.require_user(user)
        return list(m.memory.search(user, q, k, context=context, mode=mode))

    hits = await asyncio.to_thread(run)
    return JSONResponse({"object": "list", "data": [
        {**memory_json(h.memory, user), "score": round(float(h.score), 6), "why": to_jsonable_python(h.why)}
        for h in hits]})


async def add_memory(request: Request) -> Response:
    m = request_middleware(request)
    user = _user(request)
    limit, depth = body_limits(m)
    body: MemoryCreate = parse_body(MemoryCreate, await _read_json_object(request, limit, depth))
    if body.kind != "preference" and body.polarity not in (None, "like"):
        raise RequestError("polarity applies to preferences only", field="polarity")

    def run() -> list[Memory]:
        written = m.memory.remember(user, body.text, kind=body.kind,
                                    polarity=body.polarity if body.kind == "preference" else None,
                                    provenance=body.provenance, context=body.context)
        if body.pinned is not None:
            written = [m.memory.edit(user, w.id, pinned=body.pinned) for w in written]
        return list(written)

    written = await asyncio.to_thread(run)
    return JSONResponse({"object": "list", "data": [memory_json(x, user) for x in written]}, status_code=201)


async def edit_memory(request: Request) -> Response:
    m = request_middleware(request)
    user, mid = _user(request), _memory_id(request)
    limit, depth = body_limits(m)
    body: MemoryPatch = parse_body(MemoryPatch, await _read_json_object(request, limit, depth))
    if body.text is None and body.pinned is None:
        raise HTTPError(400, "nothing to change: send 'text' and/or 'pinned'", param="text", code="missing_value")
    mem = await asyncio.to_thread(m.memory.edit, user, mid, text=body.text, pinned=body.pinned)
    return JSONResponse(memory_json(mem, user))


async def delete_memory(request: Request) -> Response:
    m = request_middleware(request)
    user, mid = _user(request), _memory_id(request)
    n = await asyncio.to_thread(m.memory.forget, user, mid)
    return JSONResponse({"id": mid, "object": "memory", "deleted": True, "rows": n})


async def traces(request: Request) -> Response:
    m = request_middleware(request)
    user = _user(request)
    limit = int_param(request, "limit", 20, 1, 100)

    def run() -> list[Any]:
        m.memory.require_user(user)
        return list_traces(m, user, limit)

    found = await asyncio.to_thread(run)
    return JSONResponse({"object": "list", "data": [trace_json(t) for t in found]})


async def feedback_batch(request: Request) -> Response:
    m = request_middleware(request)
    limit, depth = body_limits(m)
    data = await _read_json_object(request, limit, depth)
    batch: FeedbackBatch = parse_body(FeedbackBatch, data)
    default_user = request.headers.get(USER_HEADER)
    default_context = request.headers.get(CONTEXT_HEADER)
    events = []
    for i, raw in enumerate(batch.events):
        item = dict(raw)
        if not item.get("user"):
            if not default_user:
                raise HTTPError(400, f"events[{i}].user: missing (set it or the {USER_HEADER} header)",
                                param=f"events[{i}].user", code="missing_value")
            item["user"] = default_user
        if item.get("context") is None and default_context:
            item["context"] = default_context
        try:
            events.append(_FEEDBACK.validate_python(item))
        except ValidationError as exc:
            err = _validation_error(exc, drop_tag=True)
            raise HTTPError(400, f"events[{i}]: {err.message}", param=f"events[{i}].{err.param or 'body'}",
                            code=err.code) from exc
    results: list[dict[str, Any]] = []
    recorded = 0
    for i, event in enumerate(events):
        try:
            event_id = await m.afeedback(event)
            results.append({"index": i, "id": event_id or event.id, "status": "recorded"})
            recorded += 1
        except StoreError as exc:
            if not str(exc).startswith("duplicate feedback event id"):
                raise
            results.append({"index": i, "id": event.id, "status": "duplicate",
                            "error": {"message": str(exc), "param": f"events[{i}].id", "code": "duplicate_id"}})
        except RequestError as exc:
            err = to_http_error(exc)
            results.append({"index": i, "id": event.id, "status": "rejected",
                            "error": {"message": err.message, "param": f"events[{i}].{err.param or 'body'}",
                                      "code": err.code, "status": err.status}})
    return JSONResponse({"object": "list", "data": results, "recorded": recorded}, status_code=200)


# --------------------------------------------------------------------------- OpenAPI and the router


def route_docs() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(per-route openapi_extra keyed by "METHOD path", component schemas)``, as ``persona_mw.openapi``'s."""
    from persona_mw.openapi import _REF, _errors, _json, _split, _user_param

    components: dict[str, Any] = {}

    obj = {"type": "object"}

    def q(name: str, schema: dict[str, Any], desc: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}

    page = [q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most this many (default 100)"),
            q("offset", {"type": "integer", "minimum": 0}, "skip this many")]
    mem_param = [{"name": "memory_id", "in": "path", "required": True, "schema": {"type": "string"}}]

    def body(model: type[BaseModel]) -> dict[str, Any]:
        components[model.__name__] = _split(model.model_json_schema(ref_template=_REF), components)
        return {"required": True, "content": _json({"$ref": _REF.format(model=model.__name__)})}

    docs: dict[str, dict[str, Any]] = {
        "GET /v1/users": {
            "summary": "list the tenant's users; q searches their ids",
            "parameters": [q("q", {"type": "string", "maxLength": 128}, "part of the id, any case")] + page,
            "responses": {"200": {"description": "users", "content": _json(obj)}, **_errors(400, 401)}},
        "GET /v1/users/{user}/memories": {
            "summary": "the user's memories (all contexts), oldest first, with provenance",
            "parameters": _user_param() + [q("context", {"type": "string"}, "one context only"),
                                           q("include_superseded", {"type": "boolean"}, "also replaced ones")] + page,
            "responses": {"200": {"description": "memories", "content": _json(obj)}, **_errors(400, 401, 404)}},
        "GET /v1/users/{user}/memories/search": {
            "summary": "search the memories of the user's scope (as the memory plugin does)",
            "parameters": _user_param() + [
                {"name": "q", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}},
                q("k", {"type": "integer", "minimum": 1, "maximum": 100}, "how many (default 10)"),
                q("mode", {"type": "string", "enum": ["fused", "hybrid", "bm25", "dense"]}, "ranking"),
                q("context", {"type": "string"}, "the context of the search")],
            "responses": {"200": {"description": "hits with scores", "content": _json(obj)},
                          **_errors(400, 401, 404)}},
        "POST /v1/users/{user}/memories": {
            "summary": "add a memory by hand (a duplicate merges into the stored one)",
            "parameters": _user_param(), "requestBody": body(MemoryCreate),
            "responses": {"201": {"description": "the memories written", "content": _json(obj)},
                          **_errors(400, 401, 413)}},
        "PATCH /v1/users/{user}/memories/{memory_id}": {
            "summary": "edit a memory's text, or pin/unpin it",
            "parameters": _user_param() + mem_param, "requestBody": body(MemoryPatch),
            "responses": {"200": {"description": "the memory", "content": _json(obj)}, **_errors(400, 401, 404, 413)}},
        "DELETE /v1/users/{user}/memories/{memory_id}": {
            "summary": "delete a memory (and the versions it replaced)",
            "parameters": _user_param() + mem_param,
            "responses": {"200": {"description": "deleted", "content": _json(obj)}, **_errors(400, 401, 404)}},
        "GET /v1/users/{user}/traces": {
            "summary": "the user's recent traces: each plugin's step and the final prompt",
            "parameters": _user_param() + [q("limit", {"type": "integer", "minimum": 1, "maximum": 100},
                                             "at most this many (default 20)")],
            "responses": {"200": {"description": "traces, newest first", "content": _json(obj)},
                          **_errors(400, 401, 404)}},
        "POST /v1/feedback/batch": {
            "summary": "record up to 1,000 feedback events (all validated first; duplicates reported per event)",
            "requestBody": body(FeedbackBatch),
            "responses": {"200": {"description": "one result per event", "content": _json(obj)},
                          **_errors(400, 401, 413)}},
    }
    return docs, components


ROUTES: tuple[tuple[str, Callable[[Request], Awaitable[Response]], str], ...] = (
    ("/v1/users", users, "GET"),
    ("/v1/users/{user}/memories/search", search_memories, "GET"),
    ("/v1/users/{user}/memories", memories, "GET"),
    ("/v1/users/{user}/memories", add_memory, "POST"),
    ("/v1/users/{user}/memories/{memory_id}", edit_memory, "PATCH"),
    ("/v1/users/{user}/memories/{memory_id}", delete_memory, "DELETE"),
    ("/v1/users/{user}/traces", traces, "GET"),
    ("/v1/feedback/batch", feedback_batch, "POST"),
)


def build_router() -> Any:
    """The data API as a FastAPI ``APIRouter`` (its OpenAPI entries declared like ``persona_mw.openapi``'s)."""
    from fastapi import APIRouter

    router = APIRouter()
    docs, _ = route_docs()
    for path, handler, method in ROUTES:
        extra = dict(docs[f"{method} {path}"])
        router.add_api_route(path, guarded(handler), methods=[method], summary=extra.pop("summary"),
                             openapi_extra=extra, response_model=None)
    return router
