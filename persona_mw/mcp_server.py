"""An MCP server over the same pipeline (``persona-mw mcp``): tools and resources for any MCP client.

A thin face over ``Middleware``'s public verbs; it adds no personalization logic of its own:

- tools: ``search_memories``, ``add_memory``, ``record_feedback`` (stated, choice, rating, edit),
  ``profile_summary`` (a user's profile in a few lines of words) and ``personalized_prompt`` (the
  messages the pipeline would send upstream for a conversation, from ``Middleware.aprepare``, so an
  MCP client's own model answers personalized);
- resources (URI templates): ``persona://users/{user}/profile`` and ``persona://users/{user}/memories``.

Every tool and resource names the user explicitly. Tenancy is the HTTP API's: over streamable HTTP
with ``server.api_keys`` configured every request needs ``Authorization: Bearer <key>`` and sees
only its key's tenant (its own store, ``persona_mw.tenancy``); over stdio the tenant is fixed when
the server starts (``--tenant``). A bad argument is an MCP tool error naming the field, never a
traceback. The ``mcp`` SDK is the optional extra ``[mcp]``, imported only when a server is built.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Mapping, TypeVar

from persona_mw.nodes import scope_node, user_node
from persona_mw.errors import PersonaError, RequestError
from persona_mw.tenancy import ApiKeys, Tenants, api_key_of
from persona_mw.types import ID_PATTERN

try:  # the tools' ``ctx: Context`` annotations are resolved by the SDK against this module's globals
    from mcp.server.mcpserver import Context
except ImportError:  # pragma: no cover - build_mcp_server says what to install
    Context = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["McpAccess", "build_mcp_server", "mcp_http_app", "profile_summary"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_ID_RE = re.compile(ID_PATTERN)
MAX_K = 100
MAX_MESSAGES = 200


def _import_mcp() -> None:
    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the MCP server needs the mcp SDK ({exc.name} is missing): "
                          "pip install 'persona-mw[mcp]'") from exc




class AccessDenied(PersonaError):
    """A request without a valid API key where keys are required."""


class McpAccess:
    """Which ``Middleware`` a request may see: the HTTP API's rule (``persona_mw.tenancy``).

    Open (no API keys, no tenant): the base middleware. With API keys, an HTTP request's bearer key
    picks its tenant's middleware; stdio requests (no headers) get the tenant fixed at startup.
    """

    def __init__(self, mw: Any, api_keys: dict[str, list[str]] | None = None, *, tenant: str | None = None) -> None:
        server_cfg = getattr(getattr(mw, "config", None), "server", None)
        self.mw = mw
        self.keys = ApiKeys(api_keys if api_keys is not None else getattr(server_cfg, "api_keys", None) or {})
        if tenant is not None and not _ID_RE.match(tenant):
            raise RequestError(f"invalid tenant {tenant!r}: expected {ID_PATTERN}", field="tenant")
        self.tenant = tenant
        self.tenants = Tenants(mw, self.keys) if (self.keys or tenant is not None) else None

    def for_headers(self, headers: Mapping[str, str] | None) -> Any:
        if headers is None:  # stdio: the process was started for one tenant (or the open store)
            if self.tenant is not None and self.tenants is not None:
                return self.tenants.middleware(self.tenant)
            if self.keys:
                raise AccessDenied("this server requires API keys: start it with --tenant for stdio")
            return self.mw
        if not self.keys:
            return self.mw
        key = api_key_of(headers)
        if key is None:
            raise AccessDenied("missing API key: send 'Authorization: Bearer <key>'")
        tenant = self.keys.tenant_of(key)
        if tenant is None:
            raise AccessDenied("invalid API key")
        assert self.tenants is not None
        return self.tenants.middleware(tenant)

    async def aclose(self) -> None:
        if self.tenants is not None:
            await self.tenants.aclose()


# --------------------------------------------------------------------------- words about a profile


def profile_summary(mw: Any, user: str, context: str | None = None, *, max_items: int = 8) -> dict[str, Any]:
    """A user's profile in words: stated preferences, persona sentences, strongest style features,
    the scope (nodes and weights), groups and memory counts. Short: never the weight vectors."""
    data = mw.profile(user, context=context)
    scope = data["scope"]
    profiles: dict[str, Any] = data["profiles"]
    own = {user_node(user)} | ({scope_node(user, context)} if context else set())
    likes: list[str] = []
    avoids: list[str] = []
    persona: list[str] = []
    inherited: list[str] = []
    evidence = 0
    features: list[str] = []
    for node, prof in profiles.items():
        stated = prof.get("stated") or []
        if node in own:
            evidence += int(prof.get("evidence") or 0)
            for s in stated:
                (avoids if s.get("polarity") == "avoid" else likes).append(str(s.get("text", "")))
            persona.extend(str(p) for p in prof.get("persona") or [])
            features.extend(_strongest_features(prof.get("weights") or []))
        else:
            inherited.extend(f"{s.get('text', '')} (from {node})" for s in stated)
    nodes = [{"node": n["id"], "kind": n["kind"], "weight": round(float(n["weight"]), 3)}
             for n in scope.get("nodes", [])]
    mem = mw.memory
    memories = mem.list(user)
    lines = [f"User {user}" + (f" in context {context}" if context else "") +
             f": {evidence} feedback event(s), {len(memories)} memory(ies)."]
    if likes:
        lines.append("Likes: " + "; ".join(likes[:max_items]) + ".")
    if avoids:
        lines.append("Avoids: " + "; ".join(avoids[:max_items]) + ".")
    if persona:
        lines.append("Persona: " + " ".join(persona[:max_items]))
    if features:
        lines.append("Strongest style features: " + ", ".join(features[:3]) + ".")
    if inherited:
        lines.append("Inherited: " + "; ".join(inherited[:max_items]) + ".")
    lines.append("Scope: " + ", ".join(f"{n['node']} ({n['weight']:g})" for n in nodes) +
                 f"; granularity {scope.get('granularity')}.")
    return {"user": user, "context": context, "summary": "\n".join(lines), "likes": likes[:max_items],
            "avoids": avoids[:max_items], "persona": persona[:max_items], "inherited": inherited[:max_items],
            "scope": nodes, "memories": len(memories)}


def _strongest_features(weights: list[float]) -> list[str]:
    """The named style features with the largest weights (``[style | n-grams | ...]`` layout)."""
    from persona_mw.text import STYLE_NAMES

    if len(weights) < len(STYLE_NAMES):
        return []
    named = sorted(zip(STYLE_NAMES, weights), key=lambda nw: -abs(float(nw[1])))
    return [f"{'more' if w > 0 else 'less'} {name}" for name, w in named[:3] if abs(float(w)) > 1e-6]


def _memory_json(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = m.model_dump(mode="json", exclude={"embedding", "meta"})
    return out


# --------------------------------------------------------------------------- the server


def _error_text(exc: PersonaError) -> str:
    field = getattr(exc, "field", None)
    text = str(exc)
    return f"{field}: {text}" if field and not text.startswith(f"{field}:") else text


def _check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise RequestError(f"invalid {field} id {value!r}: expected {ID_PATTERN}", field=field)
    return value


def _check_opt_id(value: Any, field: str) -> str | None:
    return None if value is None else _check_id(value, field)


def _middleware(ctx: Any) -> Any:
    """The middleware a tool call may see: its server's ``McpAccess`` resolves the request's API key
    (streamable HTTP carries it in the headers; stdio has none)."""
    if ctx is None:
        raise RequestError("the tool needs its MCP request context", field="ctx")
    access: McpAccess = ctx.mcp_server.persona_access
    request = ctx.request_context.request
    return access.for_headers(getattr(request, "headers", None))


def _tool_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A tool's failures as MCP tool errors naming the field (never a traceback)."""
    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> T:
        from mcp.server.mcpserver.exceptions import ToolError

        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except PersonaError as exc:
            raise ToolError(_error_text(exc)) from None
        except Exception:
            log.exception("MCP tool %s failed", fn.__name__)
            raise ToolError(f"{fn.__name__} failed: internal error (logged on the server)") from None
    return wrapped


def _resource_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> T:
        from mcp.server.mcpserver.exceptions import ResourceError

        try:
            return await fn(*args, **kwargs)
        except PersonaError as exc:
            raise ResourceError(_error_text(exc)) from None
        except Exception:
            log.exception("MCP resource %s failed", fn.__name__)
            raise ResourceError("internal error (logged on the server)") from None
    return wrapped


async def _in_thread(fn: Callable[[], T]) -> T:
    import anyio

    return await anyio.to_thread.run_sync(fn)


# --------------------------------------------------------------------------- tools and resources


@_tool_errors
async def search_memories(user: str, query: str, k: int = 10, context: str | None = None,
                          ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    _check_id(user, "user")
    _check_opt_id(context, "context")
    if not isinstance(query, str) or not query.strip():
        raise RequestError("query must be a non-empty string", field="query")
    if not 1 <= k <= MAX_K:
        raise RequestError(f"k must be from 1 to {MAX_K}, got {k}", field="k")

    def run() -> list[dict[str, Any]]:
        mw.memory.require_user(user)
        return [{"memory": _memory_json(h.memory), "score": round(float(h.score), 6)}
                for h in mw.memory.search(user, query, k=k, context=context)]

    return {"user": user, "results": await _in_thread(run)}


@_tool_errors
async def add_memory(user: str, text: str, kind: Literal["preference", "fact", "episode"] = "preference",
                     polarity: Literal["like", "avoid", "constraint"] | None = None,
                     context: str | None = None, ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    _check_id(user, "user")
    _check_opt_id(context, "context")
    if not isinstance(text, str) or not text.strip():
        raise RequestError("text must be a non-empty string", field="text")
    if polarity is not None and kind != "preference":
        raise RequestError("polarity applies to kind 'preference' only", field="polarity")

    def run() -> list[dict[str, Any]]:
        mem = mw.memory
        written = mem.remember(user, text, kind=kind, polarity=polarity or "like", context=context,
                               embed=mem.embedder_loaded)
        return [_memory_json(m) for m in written]

    return {"user": user, "memories": await _in_thread(run)}


@_tool_errors
async def record_feedback(user: str, kind: Literal["stated", "choice", "rating", "edit"],
                          text: str | None = None, polarity: Literal["like", "avoid"] | None = None,
                          prompt: str | None = None, chosen: str | None = None,
                          rejected: list[str] | None = None, response: str | None = None,
                          rating: float | None = None, before: str | None = None, after: str | None = None,
                          context: str | None = None, ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    event: dict[str, Any] = {"user": user, "kind": kind, "context": context}
    given = {"text": text, "polarity": polarity, "prompt": prompt, "chosen": chosen, "rejected": rejected,
             "response": response, "rating": rating, "before": before, "after": after}
    event.update({k: v for k, v in given.items() if v is not None})
    if kind == "edit" and "prompt" not in event:
        event["prompt"] = ""
    event_id = await mw.afeedback(event)
    return {"id": event_id, "status": "recorded"}


@_tool_errors
async def get_profile_summary(user: str, context: str | None = None,
                              ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    _check_id(user, "user")
    _check_opt_id(context, "context")
    return await _in_thread(lambda: profile_summary(mw, user, context))


@_tool_errors
async def personalized_prompt(user: str, messages: list[dict[str, Any]], context: str | None = None,
                              groups: list[str] | None = None, ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"at most {MAX_MESSAGES} messages, got {len(messages)}", field="messages")
    request: dict[str, Any] = {"user": user, "messages": messages, "context": context, "groups": groups or []}
    turn = await mw.aprepare(request)
    return {"user": user, "messages": [{"role": m.role, "content": m.text} for m in turn.messages]}


@_resource_errors
async def profile_resource(user: str, ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    _check_id(user, "user")
    return await _in_thread(lambda: profile_summary(mw, user))


@_resource_errors
async def memories_resource(user: str, ctx: Context | None = None) -> dict[str, Any]:
    mw = _middleware(ctx)
    _check_id(user, "user")

    def run() -> list[dict[str, Any]]:
        mw.memory.require_user(user)
        return [_memory_json(m) for m in mw.memory.list(user)]

    return {"user": user, "memories": await _in_thread(run)}


TOOLS: tuple[tuple[Callable[..., Awaitable[dict[str, Any]]], str], ...] = (
    (search_memories, "Search a user's long-term memories; returns the best matches with scores."),
    (add_memory, "Add a memory for a user (a preference, a fact or an episode), through the same update logic "
                 "as memories learned from conversations (duplicates merge, contradictions supersede)."),
    (record_feedback, "Record feedback from a user. kind 'stated': text (+ polarity like/avoid); 'choice': prompt, "
                      "chosen, rejected (list); 'rating': prompt, response, rating (0..1); 'edit': before, after "
                      "(+ prompt)."),
    (get_profile_summary, "A user's profile in a few lines of words: what they like and avoid, persona sentences, "
                          "the groups/contexts in their scope with weights, and how many memories."),
    (personalized_prompt, "The personalized prompt for a conversation: the messages persona-mw would send to the "
                          "model for this user (give them to your own model)."),
)
RESOURCES: tuple[tuple[str, Callable[..., Awaitable[dict[str, Any]]], str], ...] = (
    ("persona://users/{user}/profile", profile_resource,
     "A user's profile summary (words and scope; no weight vectors)."),
    ("persona://users/{user}/memories", memories_resource, "A user's active memories, oldest first."),
)
INSTRUCTIONS = (
    "persona-mw personalizes LLM answers per user. Call personalized_prompt with the conversation "
    "to get the messages to send to your model; record what the user says they like with "
    "record_feedback (kind 'stated'); search_memories and profile_summary read what is known. "
    "Every tool takes the user's id.")


def build_mcp_server(access: McpAccess, *, name: str = "persona-mw") -> MCPServer:
    """The MCP server: the module's tools and resources over ``access``'s middleware(s)."""
    _import_mcp()
    from mcp.server.mcpserver import MCPServer

    server: MCPServer = MCPServer(name, instructions=INSTRUCTIONS, log_level="WARNING")
    server.persona_access = access  # type: ignore[attr-defined]  # read by _middleware through ctx.mcp_server
    for fn, description in TOOLS:
        server.add_tool(fn, description=description)
    for uri, handler, description in RESOURCES:
        server.resource(uri, mime_type="application/json", description=description)(handler)
    return server


class _RequireKey:
    """ASGI guard: with API keys configured, a request without a valid key is a 401 before MCP sees it."""

    def __init__(self, app: ASGIApp, access: McpAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.access.keys:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                self.access.for_headers(headers)
            except AccessDenied as exc:
                from starlette.responses import JSONResponse

                body = {"error": {"message": str(exc), "type": "authentication_error"}}
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def mcp_http_app(access: McpAccess, *, host: str = "127.0.0.1", path: str = "/mcp") -> Any:
    """The streamable-HTTP ASGI app (``path``), guarded by the API keys; closes tenants on shutdown."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Mount

    server = build_mcp_server(access)
    server_cfg = getattr(getattr(access.mw, "config", None), "server", None)
    limit = int(getattr(server_cfg, "max_body_bytes", 1 << 20))  # `serve`'s limit: larger bodies get a 413
    inner = server.streamable_http_app(streamable_http_path=path, host=host, max_request_body_size=limit)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with server.session_manager.run():
            try:
                yield
            finally:
                await access.aclose()

    app = Starlette(routes=[Mount("/", app=_RequireKey(inner, access))], lifespan=lifespan)
    return app
