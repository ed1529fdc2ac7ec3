"""The one small contract every LLM backend implements, translated at the boundary.

A backend maps its own exceptions onto ``persona_mw.errors.BackendError`` and its subclasses
(``raise BackendTimeout(...) from exc``) so the pipeline's failure policies see one vocabulary.

Optional: ``special_tokens() -> tuple[str, ...]``, every control token of the backend's tokenizer (a local
model's; ``TransformersBackend`` has it, a remote one cannot know them). ``Turn.quote`` hands them to
``persona_mw.privacy.quote_data`` so stored text never carries one into a prompt; the built-in turn markers
of the common template families are defused with or without it.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol, runtime_checkable

from pydantic import BaseModel

from persona_mw.types import Candidate, Decoding, GenerationParams, Message


class Capabilities(BaseModel):
    """What a backend can do. ``white_box``: exposes tokenizer, logits and hidden states."""

    white_box: bool = False
    streaming: bool = True
    max_context: int | None = None
    batched_candidates: bool = False
    # OpenAI tool calling: GenerationParams.tools / tool_choice reach the model and its tool calls come
    # back in Candidate.meta["tool_calls"] (the litellm backend); the local model has none.
    tools: bool = False


@runtime_checkable
class Backend(Protocol):
    name: str
    capabilities: Capabilities

    async def generate(
        self,
        messages: list[Message],
        *,
        n: int = 1,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> list[Candidate]:
        """Return ``n`` candidates for the chat ``messages`` (one batch where the backend can)."""
        ...

    def stream(
        self,
        messages: list[Message],
        *,
        params: GenerationParams | None = None,
        decoding: list[Decoding] | None = None,
    ) -> AsyncIterator[str]:
        """Yield the answer's text in pieces as it is generated."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (exact for local models, an estimate for remote ones)."""
        ...

    async def aclose(self) -> None: ...


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters a token for English prose)."""
    return max(1, (len(text) + 3) // 4) if text else 0


def messages_as_dicts(messages: list[Message]) -> list[dict[str, object]]:
    return [m.model_dump(exclude_none=True) for m in messages]
