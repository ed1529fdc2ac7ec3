"""The console's routes (``/console``), excluded from the OpenAPI document (they answer HTML)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from persona_mw.nodes import context_of, is_group, user_node
from persona_mw.api_data import (
    check_id,
    int_param,
    is_memory_id,
    is_pinned,
    list_traces,
    list_users,
    request_middleware,
    str_param,
    to_http_error,
    trace_json,
)
from persona_mw.errors import RequestError
from persona_mw.text import STYLE_NAMES
from persona_mw.openai_wire import HTTPError

COOKIE = "persona_console_key"
PREFIX = "/console"
MAX_FORM_BYTES = 64 * 1024
_HERE = Path(__file__).parent
_SECRET = secrets.token_bytes(32)  # CSRF tokens are valid for this process's life
_ENV: Any = None


def _env() -> Any:
    global _ENV
    if _ENV is None:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        env = Environment(loader=FileSystemLoader(str(_HERE / "templates")), auto_reload=False,
                          autoescape=select_autoescape(default=True, default_for_string=True))
        env.filters["when"] = _when
        env.filters["urlpart"] = lambda s: quote(str(s), safe="")
        _ENV = env
    return _ENV


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _needs_key(request: Request) -> bool:
    return getattr(request.app.state, "tenants", None) is not None


def _key(request: Request) -> str | None:
    return request.cookies.get(COOKIE) or None


def _csrf(key: str | None) -> str:
    return hmac.new(_SECRET, (key or "").encode(), hashlib.sha256).hexdigest()


def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    from markupsafe import Markup

    html = _env().get_template(name).render(prefix=PREFIX, csrf=Markup(_csrf(_key(request))),  # hex: nothing to escape
                                            logged_in=_key(request) is not None, needs_key=_needs_key(request), **ctx)
    return HTMLResponse(html, status_code=status, headers={
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                   "script-src 'self'; frame-ancestors 'none'; form-action 'self'"})


class _Login(Exception):
    """No key (or a wrong one) on a console page: go to the login page."""


def console_mw(request: Request) -> Any:
    if not _needs_key(request):
        return request_middleware(request)
    key = _key(request)
    if key is None:
        raise _Login()
    try:
        return request_middleware(request, key)
    except HTTPError as exc:
        if exc.status == 401:
            raise _Login() from exc
        raise


async def form(request: Request) -> dict[str, str]:
    """A urlencoded form body (bounded), with its CSRF token checked."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPError(413, f"form larger than {MAX_FORM_BYTES} bytes", code="body_too_large")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPError(400, "malformed form body", param="body", code="invalid_value") from exc
    data = {k: v[-1] for k, v in parsed.items()}
    if not hmac.compare_digest(data.get("csrf", ""), _csrf(_key(request))):
        raise HTTPError(403, "missing or stale form token: reload the page and try again", param="csrf",
                        type="permission_error", code="bad_csrf_token")
    return data


def page(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        from persona_mw.server_routes import hold_refused, rate_limit_error

        try:
            refused = rate_limit_error(request, _key(request))  # the same per-tenant rate as /v1
            if refused is not None:
                await hold_refused(request)
                err, retry = refused
                resp = render(request, "error.html", status=429, status_code=429, message=err.message,
                              param=err.param)
                resp.headers["Retry-After"] = str(retry)
                return resp
            return await handler(request)
        except _Login:
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        except Exception as exc:
            err = to_http_error(exc, getattr(request.app.state, "middleware", None))
            if err.status >= 500:
                import logging

                logging.getLogger(__name__).error("console request failed: %s", exc, exc_info=exc)
            return render(request, "error.html", status=err.status, status_code=err.status, message=err.message,
                          param=err.param)

    endpoint.__name__ = "console_" + handler.__name__
    endpoint.__annotations__ = {"request": Request, "return": Response}
    return endpoint


# --------------------------------------------------------------------------- the user page's data


def scope_svg(scope: dict[str, Any], user: str) -> dict[str, Any]:
    """Positions for the scope picture: the user's node in the middle, the other nodes around it,
    each edge as thick as the node's weight."""
    nodes = list(scope.get("nodes") or [])
    me = user_node(user)
    center: dict[str, Any] = next((n for n in nodes if n.get("id") == me), {"id": me, "weight": 0.0})
    others = [n for n in nodes if n.get("id") != me]
    w, h, r = 560, 340, 125
    cx, cy = w / 2, h / 2
    out = []
    for i, n in enumerate(others):
        a = -math.pi / 2 + 2 * math.pi * i / max(1, len(others))
        x, y = cx + r * math.cos(a) * 1.5, cy + r * math.sin(a)
        weight = float(n.get("weight") or 0.0)
        out.append({"id": str(n.get("id")), "weight": weight, "x": round(x, 1), "y": round(y, 1),
                    "stroke": round(1 + 10 * weight, 1), "kind": str(n.get("id", "")).split(":", 1)[0]})
    return {"w": w, "h": h, "cx": cx, "cy": cy, "center": {"id": me, "weight": float(center.get("weight") or 0.0)},
            "others": out}


def strongest(weights: list[float], n: int = 6) -> list[dict[str, Any]]:
    named = [(STYLE_NAMES[i] if i < len(STYLE_NAMES) else f"lexical feature #{i - len(STYLE_NAMES)}", float(v))
             for i, v in enumerate(weights)]
    named.sort(key=lambda t: -abs(t[1]))
    return [{"name": k, "weight": round(v, 3), "direction": "more" if v > 0 else "less"} for k, v in named[:n] if v]


def feedback_view(ev: Any) -> dict[str, Any]:
    data = ev.model_dump(mode="json")
    details = {k: (v if len(str(v)) <= 300 else str(v)[:300] + "...") for k, v in data.items()
               if k not in ("id", "user", "kind", "created_at") and v not in (None, "", [], {})}
    return {"id": data.get("id"), "kind": data.get("kind"), "created_at": data.get("created_at"), "details": details}


def user_page_data(m: Any, user: str) -> dict[str, Any]:
    prof = m.profile(user)
    scope = prof.get("scope") or {}
    profiles = prof.get("profiles") or {}
    me = user_node(user)
    stated = [{"node": node, **s} for node, p in profiles.items() for s in (p.get("stated") or [])]
    persona = [{"node": node, "text": t} for node, p in profiles.items() for t in (p.get("persona") or [])]
    own = profiles.get(me) or {}
    mems = m.memory.list(user)
    base = f"{PREFIX}/users/{quote(user, safe='')}/memories/"
    rows = [{"m": x, "pinned": is_pinned(x), "context": context_of(x.owner), "action": base + quote(x.id, safe=""),
             "source": x.meta.get("source") or "-", "was": x.meta.get("extracted_by"), "when": _when(x.updated_at)}
            for x in reversed(mems)]
    events = m.store.list_feedback(user=user)
    feedback = [feedback_view(e) for e in reversed(events[-50:])]
    traces = [trace_json(t) for t in list_traces(m, user, 5)]
    return {"user": user, "user_q": quote(user, safe=""), "scope": scope, "svg": scope_svg(scope, user), "stated": stated, "persona": persona,
            "features": strongest(list(own.get("weights") or [])), "evidence": own.get("evidence", 0),
            "memories": rows, "feedback": feedback, "feedback_total": len(events), "traces": traces,
            "groups": sorted(n["id"] for n in scope.get("nodes") or [] if is_group(str(n.get("id", ""))))}


# --------------------------------------------------------------------------- pages


async def index(request: Request) -> Response:
    m = console_mw(request)
    q = str_param(request, "q", 128) or ""
    offset = int_param(request, "offset", 0, 0, 10_000_000)
    rows = await asyncio.to_thread(list_users, m, q or None, 101, offset)
    tenant = getattr(m, "tenant", None)
    return render(request, "users.html", users=rows[:100], more=len(rows) > 100, q=q, offset=offset, tenant=tenant,
                  notice=request.query_params.get("notice", "")[:200])


async def login_page(request: Request) -> Response:
    if not _needs_key(request):
        return RedirectResponse(f"{PREFIX}/", status_code=303)
    return render(request, "login.html", error="")


async def login(request: Request) -> Response:
    if not _needs_key(request):
        return RedirectResponse(f"{PREFIX}/", status_code=303)
    body = (await request.body())[:MAX_FORM_BYTES]
    try:
        key = (parse_qs(body.decode("utf-8"), max_num_fields=5).get("key") or [""])[-1].strip()
    except (UnicodeDecodeError, ValueError):
        key = ""
    tenants = request.app.state.tenants
    if not key or tenants.keys.tenant_of(key) is None:
        return render(request, "login.html", status=401, error="That key is not valid.")
    resp = RedirectResponse(f"{PREFIX}/", status_code=303)
    resp.set_cookie(COOKIE, key, httponly=True, samesite="strict", path=PREFIX,
                    secure=request.url.scheme == "https")
    return resp


async def logout(request: Request) -> Response:
    await form(request)
    resp = RedirectResponse(f"{PREFIX}/login" if _needs_key(request) else f"{PREFIX}/", status_code=303)
    resp.delete_cookie(COOKIE, path=PREFIX)
    return resp


def _user(request: Request) -> str:
    return check_id(str(request.path_params["user"]), "user")


async def user_page(request: Request) -> Response:
    m = console_mw(request)
    user = _user(request)
    t0 = time.perf_counter()
    data = await asyncio.to_thread(user_page_data, m, user)
    resp = render(request, "user.html", notice=request.query_params.get("notice", "")[:200], **data)
    resp.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - t0) * 1000:.1f}"
    return resp


def _back(user: str, notice: str) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/users/{quote(user, safe='')}?notice={quote(notice)}#memories", status_code=303)


def _memory_id(request: Request) -> str:
    mid = str(request.path_params["memory_id"])
    if not is_memory_id(mid):  # before, a NUL reached the store: a 503 on Postgres
        raise HTTPError(404, "unknown memory", type="not_found_error", param="memory_id", code="unknown_memory")
    return mid


async def edit_memory(request: Request) -> Response:
    m = console_mw(request)
    user, mid = _user(request), _memory_id(request)
    data = await form(request)
    text = data.get("text", "")
    if len(text) > 2000:
        raise RequestError("memory text longer than 2000 characters", field="text")
    await asyncio.to_thread(m.memory.edit, user, mid, text=text)
    return _back(user, "Memory saved.")


async def pin_memory(request: Request) -> Response:
    m = console_mw(request)
    user, mid = _user(request), _memory_id(request)
    data = await form(request)
    pinned = data.get("pinned") == "1"
    await asyncio.to_thread(m.memory.edit, user, mid, pinned=pinned)
    return _back(user, "Memory pinned." if pinned else "Memory unpinned.")


async def delete_memory(request: Request) -> Response:
    m = console_mw(request)
    user, mid = _user(request), _memory_id(request)
    await form(request)
    await asyncio.to_thread(m.memory.forget, user, mid)
    return _back(user, "Memory deleted.")


async def export_user(request: Request) -> Response:
    m = console_mw(request)
    user = _user(request)
    from pydantic_core import to_jsonable_python

    data = await asyncio.to_thread(m.export_user, user)
    return JSONResponse(to_jsonable_python(data), headers={
        "Content-Disposition": f'attachment; filename="persona-export-{user}.json"', "Cache-Control": "no-store"})


async def forget_user(request: Request) -> Response:
    m = console_mw(request)
    user = _user(request)
    data = await form(request)
    if data.get("confirm") != user:
        raise RequestError("type the user's id to confirm forgetting them", field="confirm")
    await m.aforget(user)
    return RedirectResponse(f"{PREFIX}/?notice={quote(f'Forgot {user}: everything stored about them is deleted.')}",
                            status_code=303)


async def static(request: Request) -> Response:
    name = str(request.path_params["name"])
    files = {"console.css": "text/css", "console.js": "text/javascript"}
    if name not in files:
        raise HTTPError(404, "not found", type="not_found_error", code="not_found")
    return Response((_HERE / "static" / name).read_bytes(), media_type=files[name],
                    headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})


def build_console_router() -> Any:
    from fastapi import APIRouter

    router = APIRouter(include_in_schema=False)
    for path, handler, method in (
        ("", index, "GET"), ("/", index, "GET"),
        ("/login", login_page, "GET"), ("/login", login, "POST"), ("/logout", logout, "POST"),
        ("/static/{name}", static, "GET"),
        ("/users/{user}", user_page, "GET"),
        ("/users/{user}/export", export_user, "GET"),
        ("/users/{user}/forget", forget_user, "POST"),
        ("/users/{user}/memories/{memory_id}/edit", edit_memory, "POST"),
        ("/users/{user}/memories/{memory_id}/pin", pin_memory, "POST"),
        ("/users/{user}/memories/{memory_id}/delete", delete_memory, "POST"),
    ):
        router.add_api_route(PREFIX + path, page(handler), methods=[method], response_model=None)
    return router
