"""The steering loop of the transformers backend on the real SmolLM2-135M-Instruct.

Streams share one batch with their own KV caches; the cached loop must give the tokens of a naive
loop that re-runs the full forward every step, and a neutral steering must give plain greedy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persona_mw.errors import BackendError
from persona_mw.types import Decoding, GenerationParams, Message
from persona_mw.plugins.contrast import amulet_combine, linear_combine

Q = [Message(role="user", content="How does a refrigerator keep food cold?")]
SYS = [Message(role="system", content="Answer in one short sentence."), *Q]
P = GenerationParams(max_tokens=10, temperature=0.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def gen(backend: Any, messages: list[Message], decoding: list[Decoding] | None = None, *, cache: bool = True,
        max_tokens: int = 10) -> list[Any]:
    backend.steering_cache = cache
    try:
        return run(backend.generate(messages, params=P.model_copy(update={"max_tokens": max_tokens}),
                                    decoding=decoding or []))
    finally:
        backend.steering_cache = True


def tokens(backend: Any, text: str) -> list[int]:
    return backend.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def plain(local_backend: Any) -> str:
    return gen(local_backend, SYS)[0].text


def test_neutral_stream_reproduces_plain_greedy(local_backend: Any, plain: str) -> None:
    # A stream that the combine function ignores: the answer row alone decides, in a 2-row batch
    # where the answer row is the longer prompt (the stream is left-padded).
    d = Decoding(source="t", streams=[Q], combine=lambda main, streams: main)
    got = gen(local_backend, SYS, [d])[0]
    assert tokens(local_backend, got.text) == tokens(local_backend, plain)
    assert got.meta["streams"] == 1 and got.meta["steered"] == ["t"]


@pytest.mark.parametrize("combine", [linear_combine(0.0, 0.8), amulet_combine(0.0)], ids=["linear", "amulet"])
def test_strength_zero_contrast_is_plain_greedy(local_backend: Any, plain: str, combine: Any) -> None:
    got = gen(local_backend, SYS, [Decoding(source="c", streams=[Q], combine=combine)])[0]
    assert got.text == plain


@pytest.mark.parametrize("combine", [linear_combine(3.0, 0.8), amulet_combine(2.0)], ids=["linear", "amulet"])
def test_cached_equals_naive_uncached_reference(local_backend: Any, combine: Any) -> None:
    d = Decoding(source="c", streams=[Q], combine=combine)
    cached = gen(local_backend, SYS, [d])[0]
    naive = gen(local_backend, SYS, [d], cache=False)[0]
    assert cached.tokens == naive.tokens and cached.text == naive.text


def test_reward_guided_zero_weight_is_plain_and_cached_equals_naive(local_backend: Any) -> None:
    import torch

    plain_q = gen(local_backend, Q)[0].text
    theta = torch.randn(local_backend.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    zero = Decoding(source="a", token_reward=lambda h: h @ theta, reward_top_k=10, reward_weight=0.0)
    assert gen(local_backend, Q, [zero])[0].text == plain_q
    strong = Decoding(source="a", token_reward=lambda h: h @ theta, reward_top_k=10, reward_weight=0.5)
    cached = gen(local_backend, Q, [strong])[0]
    naive = gen(local_backend, Q, [strong], cache=False)[0]
    assert cached.text == naive.text
    assert cached.text != plain_q  # a random head that strong changes the greedy path
    assert cached.meta["reward_top_k"] == 10


def test_per_request_decodings_in_one_batch_match_separate_calls(local_backend: Any) -> None:
    d1 = Decoding(source="c", streams=[Q], combine=linear_combine(2.0, 0.8))
    other = [Message(role="user", content="Name a fruit.")]
    d2 = Decoding(source="c", streams=[[Message(role="system", content="Be formal."), *other]],
                  combine=linear_combine(0.0, 0.8))
    together = run(local_backend.generate_steered([(SYS, [d1]), (other, [d2])], params=P))
    alone = [gen(local_backend, SYS, [d1])[0].text, gen(local_backend, other, [d2])[0].text]
    assert [c.index for c in together] == [0, 1]
    assert [c.text for c in together] == alone


def test_streaming_a_steered_answer_concatenates_to_the_generated_text(local_backend: Any) -> None:
    d = Decoding(source="c", streams=[Q], combine=linear_combine(2.0, 0.8))
    text = gen(local_backend, SYS, [d])[0].text

    async def collect() -> list[str]:
        return [p async for p in local_backend.stream(SYS, params=P, decoding=[d])]

    pieces = run(collect())
    assert len(pieces) > 1 and "".join(pieces) == text


def test_reward_guidance_with_streams_is_refused(local_backend: Any) -> None:
    a = Decoding(source="a", token_reward=lambda h: h[:, 0], reward_top_k=4)
    c = Decoding(source="c", streams=[Q], combine=linear_combine(1.0, 0.8))
    with pytest.raises(BackendError, match="cannot be combined"):
        gen(local_backend, SYS, [a, c])
