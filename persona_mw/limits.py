"""Resource limits (``limits:`` in the config): what one request may carry and one user may hold.

Requests over ``max_messages`` / ``max_message_chars`` / ``max_request_chars`` are refused with a
``RequestError`` naming the limit (HTTP 400). A personalized prompt over ``max_prompt_tokens`` is
trimmed, oldest turns first (system messages and the last user turn are kept), and the trace gets
a ``trimmed: ...`` flag; if even that does not fit, the request is refused.
"""

from __future__ import annotations

from typing import Any

from persona_mw.config import LimitsConfig
from persona_mw.errors import RequestError
from persona_mw.types import ChatRequest, Turn

__all__ = ["bound_trace", "check_groups", "check_request", "trim_prompt"]


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
