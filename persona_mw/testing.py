"""A test kit for plugin authors: a scripted backend, a hook recorder, ``registered(plugin)``.

For unit tests of plugin logic and for failure injection. The project's own proofs that
things work use the real local model, the real SQLite store and real servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from persona_mw.adapters.base import Capabilities, estimate_tokens
from persona_mw.types import Candidate, Decoding, GenerationParams, Message


def echo_last_user(messages: list[Message]) -> str:
    """The default script: repeat the last user message (shows exactly what the model saw)."""
    return next((m.text for m in reversed(messages) if m.role == "user"), "")


@dataclass
class ScriptedBackend:
    """A Backend answering from ``script(messages) -> str``, recording every call.

    ``delay`` (seconds) and ``fail`` (an exception to raise) inject slowness and failures.
    """

    script: Callable[[list[Message]], str] = echo_last_user
    name: str = "scripted"
    delay: float = 0.0
    fail: BaseException | None = None
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(white_box=False, batched_candidates=True))
    calls: list[list[Message]] = field(default_factory=list)

    async def generate(
        self,
        messages: list[Message],
        *,
        n: int = 1,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        self.calls.append(list(messages))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        text = self.script(messages)
        return [Candidate(text=text if n == 1 else f"{text} [{i}]", index=i, tokens=estimate_tokens(text))
                for i in range(n)]

    async def stream(
        self,
        messages: list[Message],
        *,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> AsyncIterator[str]:
        (cand,) = await self.generate(messages, n=1, params=params, decoding=decoding)
        words = cand.text.split(" ")
        for i, w in enumerate(words):
            yield w if i == 0 else " " + w

    def count_tokens(self, text: str) -> int:
        return int(estimate_tokens(text))

    async def aclose(self) -> None:
        return None


class HookRecorder:
    """A plugin that records every per-turn and learning hook call it sees (the hook's name), for each
    row of ``persona_mw.stages.STAGES`` in the ``turn`` and ``learning`` phases."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        from persona_mw import stages
        from persona_mw.manager import hookimpl

        def make(stage: str) -> Callable[[], None]:
            def impl() -> None:
                self.calls.append(stage)

            impl.__name__ = stage
            return hookimpl(impl)

        for row in stages.STAGES:
            if row.phase in ("turn", "learning"):
                setattr(self, row.hook, make(row.hook))


@contextlib.contextmanager
def registered(mw: Any, plugin: object, name: str | None = None) -> Iterator[object]:
    """Register ``plugin`` on ``mw`` for the duration of the block (it runs before the YAML ones)."""
    pname = mw.host.pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        mw.host.pm.unregister(name=pname)


def _fill(schema: dict[str, Any], words: list[str]) -> dict[str, Any]:
    """Arguments for a tool's JSON schema from the user's words: each string property gets the last
    capitalized word (else the last word), integers/numbers the word count, booleans true, arrays []."""
    caps = [w for w in words if w[:1].isupper()]
    word = (caps[1:] or words or [""])[-1]  # the sentence's first word is capitalized anyway
    out: dict[str, Any] = {}
    props = schema.get("properties") or {}
    for name in schema.get("required") or list(props):
        kind = (props.get(name) or {}).get("type")
        out[name] = {"integer": len(words), "number": float(len(words)), "boolean": True, "array": [],
                     "object": {}}.get(str(kind), word)
    return out


def tool_calling_llm() -> Any:
    """A tiny deterministic OpenAI-compatible chat endpoint with tool calling (Starlette app; serve it
    with ``persona_mw.server.serve_in_thread``). It records every request body in ``app.state.requests``
    and its headers in ``app.state.headers``.

    Rules: with ``tools`` (and ``tool_choice`` not ``"none"``) and no tool result after the last user
    message, it calls the tool ``tool_choice`` names (else the first) with arguments filled from the
    last user message (see ``_fill``); after a tool result it answers ``"<tool name> says: <result>"``;
    without tools it repeats the last user message. ``stream: true`` is answered as SSE. A stand-in for a tool-capable model (vLLM,
    Ollama, a hosted API) in examples and tests: no weights, no network."""
    import json as _json
    import re as _re

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    requests: list[dict[str, Any]] = []
    headers: list[dict[str, str]] = []

    def text_of(m: dict[str, Any]) -> str:
        c = m.get("content")
        return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))

    async def chat(request: Request) -> Any:
        body = await request.json()
        requests.append(body)
        headers.append(dict(request.headers))
        msgs = body.get("messages") or []
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
        tool_results = [m for m in msgs[last_user + 1:] if m.get("role") == "tool"]
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        message: dict[str, Any] = {"role": "assistant", "content": None}
        finish = "stop"
        if tools and choice != "none" and not tool_results:
            want = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
            fn = next((t["function"] for t in tools if t["function"]["name"] == want), tools[0]["function"])
            words = _re.findall(r"[\w'-]+", text_of(msgs[last_user]) if last_user >= 0 else "")
            args = _fill(fn.get("parameters") or {}, words)
            message["tool_calls"] = [{"id": f"call_{len(requests)}", "type": "function",
                                      "function": {"name": fn["name"], "arguments": _json.dumps(args)}}]
            finish = "tool_calls"
        elif tool_results:
            calls = {tc["id"]: tc["function"]["name"] for m in msgs for tc in m.get("tool_calls") or []}
            message["content"] = " ".join(f"{calls.get(m.get('tool_call_id'), 'the tool')} says: {text_of(m)}"
                                          for m in tool_results)
        else:
            message["content"] = text_of(msgs[last_user]) if last_user >= 0 else ""
        base = {"id": f"tool-llm-{len(requests)}", "created": 0, "model": body.get("model", "tool-llm")}
        if body.get("stream"):  # the answer in one delta (tool calls included), then the finish
            delta = {k: v for k, v in message.items() if v is not None}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(delta["tool_calls"])]
            chunks = [{**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                      {**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]
            return StreamingResponse(iter([f"data: {_json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]),
                                     media_type="text/event-stream")
        return JSONResponse({**base, "object": "chat.completion",
                             "choices": [{"index": 0, "finish_reason": finish, "message": message}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.requests = requests
    app.state.headers = headers
    return app


__all__ = ["HookRecorder", "ScriptedBackend", "echo_last_user", "registered", "tool_calling_llm"]
