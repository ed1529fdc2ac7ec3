"""Resource limits (``limits:`` in the config): what one request may carry and one user may hold.

Requests over ``max_messages`` / ``max_message_chars`` / ``max_request_chars`` are refused with a
``RequestError`` naming the limit (HTTP 400). A personalized prompt over ``max_prompt_tokens`` is
trimmed, oldest turns first (system messages and the last user turn are kept), and the trace gets
a ``trimmed: ...`` flag; if even that does not fit, the request is refused.

``check_values`` is the boundary check of every value a client sends (HTTP bodies, ``ChatRequest``,
feedback events): JSON nested deeper than ``max_json_depth``, a lone UTF-16 surrogate in a string
or key (valid JSON, but not Unicode text: it cannot be stored, tokenized or sent back) and a
non-finite number (NaN, Infinity) are refused with a ``RequestError`` naming the field, before
anything is stored or any backend is called.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

from persona_mw.config import LimitsConfig
from persona_mw.errors import RequestError
from persona_mw.types import ChatRequest, Turn

__all__ = ["DEFAULT_MAX_JSON_DEPTH", "bound_trace", "check_groups", "check_request", "check_values", "trim_prompt"]

DEFAULT_MAX_JSON_DEPTH = LimitsConfig().max_json_depth
_SURROGATE = re.compile("[\ud800-\udfff]")


def _field(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path) or "body"


def _anchor(path: list[str | int]) -> str:
    """Where a too-deep value starts: the field, list items and the key under each (``metadata``,
    ``tools.0.function``, ``messages.0.content.0.x``), not the hostile path itself."""
    out = path[:1]
    for prev, p in zip(path, path[1:]):
        if not (isinstance(p, int) or isinstance(prev, int)):
            break
        out.append(p)
    return _field(out)


def check_values(value: Any, *, max_depth: int = DEFAULT_MAX_JSON_DEPTH, root: list[str | int] | None = None) -> None:
    """Refuse JSON-like data (dicts, lists, pydantic models) nested deeper than ``max_depth``, holding
    a lone surrogate in a string or key, or a NaN/Infinity: ``RequestError`` naming the field.

    Iterative (no recursion), so a hostile depth costs nothing but the walk up to the limit.
    """
    stack: list[tuple[Any, list[str | int], int]] = [(value, list(root or []), 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise RequestError(f"{_field(path)}: the text holds a lone UTF-16 surrogate (such as \\ud800), "
                                   "which is not valid Unicode", field=_field(path),
                                   hint="send UTF-8 text; pair surrogates or drop them")
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise RequestError(f"{_field(path)}: {v!r} is not a finite number", field=_field(path))
            continue
        if isinstance(v, BaseModel):
            items: Any = [(k, getattr(v, k, None)) for k in type(v).model_fields]
            items += list((v.model_extra or {}).items())
        elif isinstance(v, dict):
            items = v.items()
        elif isinstance(v, (list, tuple)):
            items = enumerate(v)
        else:
            continue
        if depth >= max_depth:
            # The full path of a hostile nesting is as long as the nesting: name where it starts.
            where = _anchor(path)
            raise RequestError(f"{where}: JSON nested deeper than {max_depth} levels (limits.max_json_depth)",
                               field=where, hint="flatten the value or raise limits.max_json_depth")
        for k, x in items:
            if isinstance(k, str) and _SURROGATE.search(k):
                raise RequestError(f"{_field(path)}: a key holds a lone UTF-16 surrogate, which is not valid "
                                   "Unicode", field=_field(path))
            stack.append((x, [*path, k], depth + 1))


def check_groups(groups: Any, limits: LimitsConfig) -> None:
    """``groups`` (a request's list, validated or raw JSON) within ``max_groups_per_request``.

    Cheap enough to run on a raw body before validating it item by item (a 20,000-group body is
    refused without 20,000 pattern checks)."""
    if not isinstance(groups, (list, tuple)) or len(groups) <= limits.max_groups_per_request:
        return
    n = len({g if isinstance(g, str) else repr(g) for g in groups})  # duplicates count once
    if n > limits.max_groups_per_request:
        raise RequestError(f"too many groups: {n} (limit {limits.max_groups_per_request})",
                           field="groups", hint="raise limits.max_groups_per_request, or join groups "
                           "for good (PUT /v1/users/{user}/groups/{group}) instead of naming them per request")


def check_request(req: ChatRequest, limits: LimitsConfig) -> None:
    check_groups(req.groups, limits)
    check_values(req, max_depth=limits.max_json_depth)
    if len(req.messages) > limits.max_messages:
        raise RequestError(f"too many messages: {len(req.messages)} (limit {limits.max_messages})",
                           field="messages", hint="raise limits.max_messages or send fewer turns")
    total = 0
    for i, m in enumerate(req.messages):
        n = len(m.text)
        if n > limits.max_message_chars:
            raise RequestError(f"message {i} has {n} characters (limit {limits.max_message_chars})",
                               field=f"messages.{i}.content", hint="raise limits.max_message_chars")
        total += n
    if total > limits.max_request_chars:
        raise RequestError(f"the messages have {total} characters in all (limit {limits.max_request_chars})",
                           field="messages", hint="raise limits.max_request_chars")


def bound_trace(trace: Any, limits: LimitsConfig) -> None:
    """Cap what a trace carries back to the caller and into the store (``limits.max_trace_*``)."""
    cap, chars = limits.max_trace_items, limits.max_trace_text_chars
    cut = False

    def short(text: str) -> str:
        nonlocal cut
        if len(text) > chars:
            cut = True
            return text[:chars] + "..."
        return text

    if len(trace.items_used) > cap:
        trace.items_used, cut = trace.items_used[:cap], True
    for item in trace.items_used:
        for k, v in list(item.items()):
            if isinstance(v, str):
                item[k] = short(v)
    for step in trace.steps:
        step.summary = short(step.summary or "")
        if step.error:
            step.error = short(step.error)
    if len(trace.flags) > cap:
        trace.flags, cut = trace.flags[:cap], True
    trace.flags = [short(f) for f in trace.flags]
    if cut:
        trace.flags.append(f"trace_truncated: limits.max_trace_items={cap}, max_trace_text_chars={chars}")


def _tokens(turn: Turn, messages: list[Any]) -> int:
    return sum(turn.count_tokens(m.text) + 4 for m in messages)


def trim_prompt(turn: Turn, limits: LimitsConfig) -> None:
    """Drop the oldest non-system turns until ``turn.messages`` fits ``max_prompt_tokens``."""
    cap = limits.max_prompt_tokens
    if cap is None:
        return
    msgs = list(turn.messages)
    before = _tokens(turn, msgs)
    if before <= cap:
        return
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=len(msgs) - 1)
    dropped = 0
    i = 0
    while _tokens(turn, msgs) > cap and i < len(msgs):
        if msgs[i].role == "system" or msgs[i] is turn.messages[last_user]:
            i += 1
            continue
        del msgs[i]
        dropped += 1
    after = _tokens(turn, msgs)
    if after > cap:
        raise RequestError(f"the personalized prompt needs {after} tokens even without earlier turns "
                           f"(limit {cap})", field="messages", hint="raise limits.max_prompt_tokens")
    turn.messages = msgs
    turn.trace.flags.append(f"trimmed: dropped {dropped} oldest message(s), {before} -> {after} tokens "
                            f"(limits.max_prompt_tokens={cap})")
