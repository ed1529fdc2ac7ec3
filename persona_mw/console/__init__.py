"""The web console of ``persona-mw serve`` (``/console``): people's data, for them and for operators.

Plain server-rendered pages (Jinja2, autoescaped: every stored text is hostile) and a few lines of JS
(confirmations). Behind the same API keys as ``/v1``: the login page keeps the key in an HttpOnly,
SameSite=Strict cookie scoped to ``/console``; each page sees only the key's tenant. Every form posts a
CSRF token bound to the key. Actions go through the middleware's public verbs and ``mw.memory``.

``install(app)`` adds the console and the data API (``persona_mw.api_data``) to an app built by
``persona_mw.server.create_app``, and records each turn's final prompt in its trace (``record``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["install"]


def install(app: Any) -> None:
    """Include the data API and console routers in ``app``; record final prompts in traces."""
    from persona_mw.api_data import build_router
    from persona_mw.console.record import record_prompts
    from persona_mw.console.routes import build_console_router

    app.include_router(build_router())
    app.include_router(build_console_router())
    from persona_mw.api_data import route_docs

    _, components = route_docs()
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:  # the data API's body schemas join the document's components
        doc: dict[str, Any] = base_openapi()
        doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return doc

    app.openapi = openapi

    mw = getattr(app.state, "middleware", None)
    if mw is not None:
        record_prompts(mw)
    tenants = getattr(app.state, "tenants", None)
    if tenants is not None and not getattr(tenants, "_console_wrapped", False):
        build = tenants.middleware

        def middleware(tenant: str) -> Any:
            m = build(tenant)
            record_prompts(m)
            return m

        tenants.middleware = middleware  # every tenant's turns record their prompt from the first one
        tenants._console_wrapped = True
