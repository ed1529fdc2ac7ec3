"""What the integrations share: reading user/context from OpenAI-style call arguments, and the prompt."""

from __future__ import annotations

from typing import Any, Mapping

from persona_mw.types import Turn

USER_HEADER = "X-Persona-User"
CONTEXT_HEADER = "X-Persona-Context"


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, Mapping):
        return None
    low = name.lower()
    return next((str(v) for k, v in headers.items() if str(k).lower() == low and v), None)


def _meta(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata from the places litellm and callers put it (``metadata``, ``litellm_metadata``, params)."""
    out: dict[str, Any] = {}
    params = kwargs.get("litellm_params")
    for source in (params.get("metadata") if isinstance(params, Mapping) else None,
                   kwargs.get("litellm_metadata"), kwargs.get("metadata")):
        if isinstance(source, Mapping):
            out.update(source)
    return out


def who(kwargs: Mapping[str, Any], *, user: str | None = None, context: str | None = None) -> tuple[str | None, str | None]:
    """The end user and context of a call: explicit values, then ``user`` / ``extra_body.user``,
    ``metadata.persona_user`` / ``persona_context``, then the ``X-Persona-*`` headers (as sent to
    a persona-mw server). Returns ``(None, ...)`` when there is nobody to personalize for."""
    meta = _meta(kwargs)
    body = kwargs.get("extra_body")
    extra_body: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    headers = [kwargs.get("extra_headers"), kwargs.get("headers")]
    proxy_req = kwargs.get("proxy_server_request")
    if isinstance(proxy_req, Mapping):
        headers.append(proxy_req.get("headers"))
    headers.append(meta.get("headers"))
    u = (user or kwargs.get("user") or extra_body.get("user") or meta.get("persona_user")
         or next((h for h in (_header(x, USER_HEADER) for x in headers) if h), None))
    c = (context or meta.get("persona_context") or extra_body.get("context")
         or next((h for h in (_header(x, CONTEXT_HEADER) for x in headers) if h), None))
    return (str(u) if u else None), (str(c) if c else None)


def prompt_dicts(turn: Turn) -> list[dict[str, Any]]:
    """The personalized prompt as OpenAI message dicts (extra fields such as tool_calls kept)."""
    return [m.model_dump(exclude_none=True) for m in turn.messages]


def plain_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts (the SDKs also accept pydantic objects / TypedDicts)."""
    out = []
    for m in messages or []:
        if hasattr(m, "model_dump"):
            m = m.model_dump(exclude_none=True)
        out.append(dict(m))
    return out
