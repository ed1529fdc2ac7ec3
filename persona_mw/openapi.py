"""The OpenAPI document of ``persona-mw serve`` (served at ``/openapi.json``).

Bodies are parsed by hand in the server (size limit, OpenAI-shaped 400s), so FastAPI cannot infer
them from signatures: request and response schemas are declared here from the same pydantic models.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from persona_mw.openai_wire import ChatCompletionBody
from persona_mw.types import ID_PATTERN, Feedback
from persona_mw.wire_anthropic import MessagesBody
from persona_mw.wire_responses import ResponsesBody

_REF = "#/components/schemas/{model}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
    }}},
}


def _split(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    components.update(schema.pop("$defs", {}))
    return schema


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "invalid request (the message names the field)", 401: "missing or wrong API key",
            404: "unknown user, trace or route", 409: "a feedback id that is already stored", 413: "body larger than the limit",
            429: "over the tenant's rate limit (Retry-After says when to retry)",
            501: "an optional extra is not installed (the message names it)",
            502: "backend or plugin failure", 504: "backend timeout"}
    return {str(c): {"description": text.get(c, "error"), "content": _json({"$ref": _REF.format(model="Error")})}
            for c in codes}


def _user_param(name: str = "user") -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True,
             "schema": {"type": "string", "pattern": ID_PATTERN}}]


def route_docs() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(per-route openapi_extra keyed by "METHOD path", component schemas)``."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    chat = _split(ChatCompletionBody.model_json_schema(ref_template=_REF), components)
    components["ChatCompletionBody"] = chat
    feedback = _split(TypeAdapter(Feedback).json_schema(ref_template=_REF), components)
    components["Feedback"] = feedback
    components["MessagesBody"] = _split(MessagesBody.model_json_schema(ref_template=_REF), components)
    components["ResponsesBody"] = _split(ResponsesBody.model_json_schema(ref_template=_REF), components)
    obj = {"type": "object"}
    docs: dict[str, dict[str, Any]] = {
        "POST /v1/chat/completions": {
            "summary": "OpenAI chat completion, personalized (SSE when stream is true)",
            "requestBody": {"required": True, "content": _json({"$ref": _REF.format(model="ChatCompletionBody")})},
            "parameters": [{"name": "X-Persona-User", "in": "header", "required": False, "schema": {"type": "string"}},
                           {"name": "X-Persona-Context", "in": "header", "required": False,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "a chat.completion (or a text/event-stream of chunks)",
                                  "content": _json(obj)}, **_errors(400, 401, 413, 502, 504)},
        },
        "POST /v1/messages": {
            "summary": "Anthropic Messages, personalized (SSE events as Anthropic sends them when stream is true); "
                       "the user is metadata.user_id or the X-Persona-User header; errors in Anthropic's shape",
            "requestBody": {"required": True, "content": _json({"$ref": _REF.format(model="MessagesBody")})},
            "parameters": [{"name": "X-Persona-User", "in": "header", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "a message (or a text/event-stream of its events)",
                                  "content": _json(obj)}, **_errors(400, 401, 413, 429, 502, 504)},
        },
        "POST /v1/responses": {
            "summary": "OpenAI Responses, personalized (SSE events when stream is true); the user is 'user', "
                       "'safety_identifier', 'prompt_cache_key' or the X-Persona-User header",
            "requestBody": {"required": True, "content": _json({"$ref": _REF.format(model="ResponsesBody")})},
            "parameters": [{"name": "X-Persona-User", "in": "header", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "a response object (or a text/event-stream of its events)",
                                  "content": _json(obj)}, **_errors(400, 401, 413, 429, 502, 504)},
        },
        "POST /v1/feedback": {
            "summary": "record a feedback event (choice, rating, edit or stated preference)",
            "requestBody": {"required": True, "content": _json({"$ref": _REF.format(model="Feedback")})},
            "responses": {"201": {"description": "recorded", "content": _json(obj)}, **_errors(400, 401, 409, 413)},
        },
        "GET /v1/users/{user}/profile": {
            "summary": "the user's profile and resolved scope", "parameters": _user_param(),
            "responses": {"200": {"description": "profile", "content": _json(obj)}, **_errors(400, 401, 404)},
        },
        "GET /v1/users/{user}": {
            "summary": "export everything stored about the user", "parameters": _user_param(),
            "responses": {"200": {"description": "export", "content": _json(obj)}, **_errors(400, 401, 404)},
        },
        "DELETE /v1/users/{user}": {
            "summary": "forget the user", "parameters": _user_param(),
            "responses": {"200": {"description": "deleted; `scrubbed` says whether the text is already gone from the database files (false while another connection holds an older snapshot; retried in the background)", "content": _json(obj)}, **_errors(400, 401, 404)},
        },
        "PUT /v1/users/{user}/groups/{group}": {
            "summary": "make the user a permanent member of the group (a request's 'groups' last one request)",
            "parameters": _user_param() + _user_param("group"),
            "responses": {"200": {"description": "membership", "content": _json(obj)}, **_errors(400, 401)},
        },
        "DELETE /v1/users/{user}/groups/{group}": {
            "summary": "end the user's membership of the group",
            "parameters": _user_param() + _user_param("group"),
            "responses": {"200": {"description": "membership", "content": _json(obj)}, **_errors(400, 401, 404)},
        },
        "GET /v1/traces/{trace_id}": {
            "summary": "explain a response: granularity, items used, plugins that changed it",
            "parameters": [{"name": "trace_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "explanation", "content": _json(obj)}, **_errors(401, 404)},
        },
        "GET /v1/models": {"summary": "the served model",
                           "responses": {"200": {"description": "models", "content": _json(obj)}, **_errors(401)}},
        "GET /metrics": {"summary": "Prometheus metrics (no key needed; labels never carry user ids or text)",
                         "responses": {"200": {"description": "the text exposition",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}},
                                       **_errors(501)}},
        "GET /healthz": {"summary": "liveness (no key needed)",
                         "responses": {"200": {"description": "ok", "content": _json(obj)}}},
    }
    return docs, components


def finish(doc: dict[str, Any], components: dict[str, Any], *, keys: bool) -> dict[str, Any]:
    """Add the component schemas and (when keys are configured) the bearer scheme to ``doc``."""
    comp = doc.setdefault("components", {})
    comp.setdefault("schemas", {}).update(components)
    if keys:
        comp["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                              "description": "an API key from the config's server.api_keys"}}
        for path, ops in doc.get("paths", {}).items():
            if path not in ("/healthz", "/metrics"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
    return doc
