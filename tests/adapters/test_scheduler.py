"""Continuous batching (``adapters/transformers/scheduler.py``) on the real SmolLM2-135M-Instruct:
requests that join a running batch mid-way decode exactly what they decode alone (greedy, token for
token); per-request stop strings; a cancelled stream frees its rows; a full queue is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from persona_mw.adapters.transformers import TransformersBackend
from persona_mw.errors import BackendOverloaded
from persona_mw.types import GenerationParams, Message

PROMPTS = [
    [Message(role="user", content="What is the capital of France?")],
    [Message(role="user", content="Write a haiku about rain.")],
    [Message(role="user", content="Explain gravity in one long paragraph, with detail and examples please.")],
]
SHORT = GenerationParams(max_tokens=8)


@pytest.fixture(scope="module")
def backend(local_backend: TransformersBackend) -> Iterator[TransformersBackend]:
    asyncio.run(local_backend.load())
    yield local_backend
    local_backend.batching = True


@pytest.fixture(scope="module")
def alone(backend: TransformersBackend) -> list[str]:
    """Each prompt decoded alone by ``model.generate`` (the path before the scheduler)."""
    backend.batching = False
    try:
        return [asyncio.run(backend.generate(m, params=SHORT))[0].text for m in PROMPTS]
    finally:
        backend.batching = True


def test_requests_joining_mid_way_decode_what_they_decode_alone(backend: TransformersBackend,
                                                                alone: list[str]) -> None:
    async def main() -> tuple[str, list[str], int]:
        sched = backend.scheduler
        steps_before = sched.steps
        pieces: list[str] = []
        joined: list[asyncio.Task[Any]] = []
        async for piece in backend.stream(PROMPTS[0], params=SHORT):
            pieces.append(piece)
            if not joined:  # the first request is decoding: the others join its batch now
                joined = [asyncio.create_task(backend.generate(m, params=SHORT)) for m in PROMPTS[1:]]
        rest = await asyncio.gather(*joined)
        return "".join(pieces), [c[0].text for c in rest], sched.steps - steps_before

    first, rest, steps = asyncio.run(main())
    assert [first, *rest] == alone
    assert backend.scheduler.peak_batch >= 2  # they really shared steps
    assert steps < 3 * SHORT.max_tokens  # fewer steps than one request after another


def test_prompts_arriving_together_are_encoded_in_one_forward(backend: TransformersBackend,
                                                             alone: list[str]) -> None:
    """Requests admitted in the same step share one left-padded prefill; each gets its row of the
    cache and decodes what it decodes alone (greedy), one with several samples among them."""
    before = backend.scheduler.grouped_prefills

    async def main() -> list[Any]:
        plain = [backend.generate(m, params=SHORT) for m in PROMPTS]
        sampled = backend.generate(PROMPTS[1], n=2, params=GenerationParams(max_tokens=8, seed=4))
        return list(await asyncio.gather(*plain, sampled))

    *answers, samples = asyncio.run(main())
    assert backend.scheduler.grouped_prefills - before >= 2
    assert [a[0].text for a in answers] == alone
    again = _sampled_n(backend, PROMPTS[1], 2, GenerationParams(max_tokens=8, seed=4))
    assert [c.text for c in samples] == again  # the seeded samples of the request alone


def _sampled_n(backend: TransformersBackend, messages: list[Message], n: int, params: GenerationParams) -> list[str]:
    return [c.text for c in asyncio.run(backend.generate(messages, n=n, params=params))]


def test_stop_strings_are_per_request(backend: TransformersBackend, alone: list[str]) -> None:
    stop = alone[0].split()[2]  # a word from the middle of the first answer

    async def main() -> list[Any]:
        cut = backend.generate(PROMPTS[0], params=GenerationParams(max_tokens=8, stop=[stop]))
        plain = backend.generate(PROMPTS[1], params=SHORT)
        return list(await asyncio.gather(cut, plain))

    (cut,), (plain,) = asyncio.run(main())
    assert stop not in cut.text and alone[0].startswith(cut.text) and cut.finish_reason == "stop"
    assert plain.text == alone[1]


def test_a_cancelled_stream_frees_its_rows(backend: TransformersBackend, alone: list[str]) -> None:
    async def main() -> tuple[int, str]:
        before = backend.scheduler.steps
        long = backend.stream(PROMPTS[2], params=GenerationParams(max_tokens=200))
        await long.__anext__()
        other = asyncio.create_task(backend.generate(PROMPTS[1], params=SHORT))
        await long.aclose()  # the client went away
        (answer,) = await other
        while backend.scheduler._scheduled:  # the step that finished ``other`` may still be ending
            await asyncio.sleep(0.05)
        return backend.scheduler.steps - before, answer.text

    steps, text = asyncio.run(asyncio.wait_for(main(), timeout=600))
    assert text == alone[1]
    sched = backend.scheduler
    assert not sched.active and not sched.prefilling and sched.cache is None  # its rows are gone
    assert steps < 60  # it did not decode its 200 tokens


def test_a_full_queue_is_refused_with_a_retry_delay(local_backend: TransformersBackend) -> None:
    b = TransformersBackend(model=local_backend.model_name, max_new_tokens=8, max_batch=1, max_queue=1)

    async def main() -> BackendOverloaded:
        running = asyncio.create_task(b.generate(PROMPTS[0]))
        await asyncio.sleep(0)
        while not b.scheduler.active and not b.scheduler.prefilling:  # the first holds the only row
            await asyncio.sleep(0.05)
        waiting = asyncio.create_task(b.generate(PROMPTS[1]))
        await asyncio.sleep(0)
        with pytest.raises(BackendOverloaded) as refused:
            await b.generate(PROMPTS[2])
        await asyncio.gather(running, waiting)  # the admitted ones still finish
        return refused.value

    err = asyncio.run(main())
    assert err.retry_after_s >= 1 and "max_queue 1" in str(err)


def _sampled(backend: TransformersBackend, batching: bool, messages: list[Message], params: GenerationParams,
             decoding: list[Any] | None = None) -> list[Any]:
    backend.batching = batching
    try:
        return asyncio.run(backend.generate(messages, n=3, params=params, decoding=decoding))
    finally:
        backend.batching = True


def test_n_sampled_answers_join_the_batch_with_generate_s_samples(backend: TransformersBackend) -> None:
    """Best-of-n candidates share the running batch (the prompt encoded once, n rows) and, seeded, are
    the answers ``model.generate`` with ``num_return_sequences`` gives: one draw for all rows per step,
    a row that ended fed the pad token, stop strings per row."""
    params = GenerationParams(seed=11, max_tokens=10, temperature=0.9, top_p=0.9, stop=["."])
    reference = _sampled(backend, False, PROMPTS[1], params)
    assert not any(c.meta.get("batched") for c in reference)
    assert len({c.text for c in reference}) > 1

    async def main() -> tuple[list[Any], str]:
        pieces: list[str] = []
        task: asyncio.Task[Any] | None = None
        async for piece in backend.stream(PROMPTS[2], params=GenerationParams(max_tokens=16)):
            pieces.append(piece)
            if task is None:  # a long answer is decoding: the n-sampled request joins it
                task = asyncio.create_task(backend.generate(PROMPTS[1], n=3, params=params))
        assert task is not None
        return await task, "".join(pieces)

    peak_before = backend.scheduler.peak_batch
    backend.scheduler.peak_batch = 0
    try:
        got, _ = asyncio.run(main())
        assert backend.scheduler.peak_batch >= 2  # it shared steps with the streaming request
    finally:
        backend.scheduler.peak_batch = max(peak_before, backend.scheduler.peak_batch)
    assert all(c.meta.get("batched") for c in got)
    assert [c.index for c in got] == [0, 1, 2]
    assert [(c.text, c.finish_reason, c.tokens) for c in got] == [
        (c.text, c.finish_reason, c.tokens) for c in reference]


def test_n_sampled_answers_with_a_processor_that_reads_each_row(backend: TransformersBackend) -> None:
    """A logits processor sees each row's own tokens (an ended row's padded), as in ``model.generate``."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from persona_mw.types import Decoding

    class Recording(RepetitionPenaltyLogitsProcessor):
        def __init__(self) -> None:
            super().__init__(penalty=1.8)
            self.seen: list[list[list[int]]] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.seen.append(input_ids.tolist())
            return super().__call__(input_ids, scores)

    params = GenerationParams(seed=5, max_tokens=12, temperature=1.0, stop=["."])
    runs = []
    for batching in (False, True):
        proc = Recording()
        cands = _sampled(backend, batching, PROMPTS[0], params, [Decoding(source="test", logits_processors=[proc])])
        runs.append((cands, proc.seen))
    (reference, seen_reference), (got, seen) = runs
    assert all(c.meta.get("batched") for c in got)
    assert [c.text for c in got] == [c.text for c in reference]
    assert seen == seen_reference and len(seen) > 2 and len(seen[-1]) == 3
    plain = _sampled(backend, True, PROMPTS[0], params)
    assert [c.text for c in plain] != [c.text for c in got]  # the processor acted


def test_a_batch_call_larger_than_the_queue_is_one_request(local_backend: TransformersBackend) -> None:
    """``generate_batch`` of more prompts than ``max_queue`` is served (it counts as one request; the
    style eval sends 36 at once); seeded samples of one batch differ between copies of one prompt and
    are the same on a second call."""
    b = TransformersBackend(model=local_backend.model_name, max_new_tokens=10, max_batch=2, max_queue=1)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    params = GenerationParams(max_tokens=10, temperature=1.0, seed=9)
    first = asyncio.run(b.generate_batch(prompts, params=params))
    assert [c.index for c in first] == [0, 1, 2, 3] and all(c.meta["batched"] for c in first)
    assert len({first[0].text, first[2].text, first[3].text}) > 1  # copies of one prompt: own samples
    again = asyncio.run(b.generate_batch(prompts, params=params))
    assert [c.text for c in again] == [c.text for c in first]
