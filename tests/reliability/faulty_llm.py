"""A faulty OpenAI-compatible server for loopback tests: the model name picks the fault.

``ok`` echoes the prompt; ``slow`` answers after 5 s; ``e500`` / ``e503`` always fail;
``flaky503`` and ``flaky429`` fail the first two calls (429 with ``Retry-After: 1``) then answer;
``malformed`` answers 200 with a body that is not a completion; ``nopersonal`` refuses (400) any
prompt holding a personalization block, like a provider's content filter would.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from persona_mw.types import Message


def echo(messages: list[dict[str, Any]]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def faulty_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    calls: Counter[str] = Counter()

    def error(status: int, msg: str, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": {"message": msg, "type": "server_error"}}, status_code=status, headers=headers)

    async def chat(request: Request) -> Any:
        body = await request.json()
        model = body["model"]
        calls[model] += 1
        n = calls[model]
        if model == "slow":
            await asyncio.sleep(5)
        elif model == "e500":
            return error(500, "internal error")
        elif model == "e503" or (model == "flaky503" and n <= 2):
            return error(503, "overloaded")
        elif model == "flaky429" and n <= 2:
            return error(429, "rate limited", {"Retry-After": "1"})
        elif model == "malformed":
            return PlainTextResponse("<html>gateway hiccup</html>", status_code=200)
        elif model == "nopersonal" and any("preferences of mine" in str(m.get("content")) for m in body["messages"]):
            return error(400, "prompt rejected by content filter")
        text = echo(body["messages"])
        if body.get("stream"):
            from starlette.responses import StreamingResponse

            async def events() -> Any:
                base = {"id": "f", "object": "chat.completion.chunk", "created": 0, "model": model}
                yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                         "content": text},
                                                                  "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {},
                                                                  "finish_reason": "stop"}]}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"id": "f", "object": "chat.completion", "created": 0, "model": model,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.calls = calls
    return app


__all__ = ["Message", "faulty_app"]
