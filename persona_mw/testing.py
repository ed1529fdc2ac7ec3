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
        return estimate_tokens(text)

    async def aclose(self) -> None:
        return None


class HookRecorder:
    """A plugin that records every per-turn hook call it sees (name and the turn's user)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        from persona_mw.manager import hookimpl

        def make(stage: str) -> Callable[..., None]:
            def impl(turn: Any = None) -> None:
                self.calls.append(stage)

            impl.__name__ = stage
            return hookimpl(impl)

        from persona_mw.hookspecs import LEARNING_STAGES, TURN_STAGES

        for stage in list(TURN_STAGES) + list(LEARNING_STAGES):
            if stage == "persona_feedback":
                def fb(event: Any) -> None:
                    self.calls.append("persona_feedback")

                fb.__name__ = stage
                setattr(self, stage, hookimpl(fb))
            else:
                setattr(self, stage, make(stage))


@contextlib.contextmanager
def registered(mw: Any, plugin: object, name: str | None = None) -> Iterator[object]:
    """Register ``plugin`` on ``mw`` for the duration of the block (it runs before the YAML ones)."""
    pname = mw.host.pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        mw.host.pm.unregister(name=pname)


__all__ = ["HookRecorder", "ScriptedBackend", "echo_last_user", "registered"]
