"""``Decoding.stream_adapters`` (the ``lora`` plugin's ``mixing: logits``) on the real SmolLM2-135M-Instruct:
each stream row decodes with its own adapter, in the continuous batch and in the own steering loop, and the
answer is the greedy choice of ``sum_n w_n log_softmax(stream_n)`` computed by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from persona_mw.types import Decoding, GenerationParams, Message

torch = pytest.importorskip("torch")
from persona_mw.plugins import _lora  # noqa: E402
from persona_mw.plugins.lora import mix_logits  # noqa: E402

Q = [Message(role="user", content="Name three fruits.")]
OTHER = [Message(role="user", content="What is the capital of France?")]
P = GenerationParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def backend(local_backend: Any) -> Iterator[Any]:
    asyncio.run(local_backend.load())
    yield local_backend
    local_backend.batching = True


def adapter(model: Any, seed: int, scale: float = 0.3) -> _lora.Adapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in (18, 22, 26, 29):
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}"
            lin = model.get_submodule(name)
            weights[name] = (torch.randn(4, lin.in_features, generator=g) * scale,
                             torch.randn(lin.out_features, 4, generator=g) * scale)
    return _lora.Adapter(weights, r=4, alpha=4.0, targets=("q_proj", "v_proj"))


def by_hand(backend: Any, adapters: list[Any], weights: list[float], steps: int) -> str:
    """Greedy decoding of the mixture with full forwards and the adapters installed one at a time."""
    model, tok = backend._model, backend.tokenizer
    ids = backend._encode([backend.format_prompt(Q)])["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            total = None
            for ad, w in zip(adapters, weights):
                hs = _lora.install(model, ad)
                try:
                    logits = model(input_ids=ids).logits[0, -1].float()
                finally:
                    for h in hs:
                        h.remove()
                part = w * logits.log_softmax(-1)
                total = part if total is None else total + part
            t = int(total.argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return str(tok.decode(out, skip_special_tokens=True)).strip()


def gen(backend: Any, decoding: list[Decoding], messages: list[Message] = Q) -> str:
    return str(asyncio.run(backend.generate(messages, params=P, decoding=decoding))[0].text).strip()


def mixed(a1: Any, a2: Any, w: list[float]) -> Decoding:
    return Decoding(source="lora", streams=[Q, Q], stream_adapters=[a1, a2], combine=mix_logits(w))


def test_one_stream_with_an_adapter_decodes_as_the_adapter_on_the_answer(backend: Any) -> None:
    a1 = adapter(backend._model, 1)
    base = gen(backend, [])
    on_answer = gen(backend, [Decoding(source="lora", activation_hooks=[_lora.adapter_hook(a1)])])
    assert on_answer != base  # the adapter changes the answer, so the comparison below means something
    stream = gen(backend, [Decoding(source="lora", streams=[Q], stream_adapters=[a1],
                                    combine=lambda main, scores: scores[:, 0, :])])
    assert stream == on_answer


@pytest.mark.parametrize("batching", [True, False])  # the continuous batch / the own steering loop
def test_two_adapters_mixed_at_the_logits_match_the_mixture_by_hand(backend: Any, batching: bool) -> None:
    a1, a2 = adapter(backend._model, 1), adapter(backend._model, 2)
    backend.batching = batching
    try:
        got = gen(backend, [mixed(a1, a2, [0.6, 0.4])])
        assert got == by_hand(backend, [a1, a2], [0.6, 0.4], P.max_tokens)
        only_first = gen(backend, [mixed(a1, a2, [1.0, 0.0])])
    finally:
        backend.batching = True
    assert only_first == by_hand(backend, [a1], [1.0], P.max_tokens)


def test_a_mixed_request_beside_a_plain_one_leaves_it_the_base_model(backend: Any) -> None:
    a1, a2 = adapter(backend._model, 1), adapter(backend._model, 2)
    plain_alone = gen(backend, [], OTHER)
    mix_alone = gen(backend, [mixed(a1, a2, [0.5, 0.5])])

    async def both() -> tuple[str, str]:
        m, p = await asyncio.gather(backend.generate(Q, params=P, decoding=[mixed(a1, a2, [0.5, 0.5])]),
                                    backend.generate(OTHER, params=P))
        return str(m[0].text).strip(), str(p[0].text).strip()

    peak = backend.scheduler.peak_batch
    mix_together, plain_together = asyncio.run(both())
    assert (mix_together, plain_together) == (mix_alone, plain_alone)
    assert backend.scheduler.peak_batch >= min(peak, 3) or backend.scheduler.peak_batch >= 2


def test_a_stream_adapter_count_that_does_not_match_the_streams_is_a_clear_error(backend: Any) -> None:
    from persona_mw.errors import BackendError

    bad = Decoding(source="lora", streams=[Q, Q], stream_adapters=[adapter(backend._model, 1)],
                   combine=mix_logits([0.5, 0.5]))
    with pytest.raises(BackendError, match="1 stream adapters for 2 streams"):
        gen(backend, [bad])
