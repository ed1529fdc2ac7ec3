"""The local white-box backend on the real packaged SmolLM2-135M-Instruct (loaded once per session)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from persona_mw import models
from persona_mw.adapters.base import Backend
from persona_mw.adapters.transformers import TransformersBackend, create
from persona_mw.errors import BackendError, ConfigError, ModelNotFound
from persona_mw.types import Decoding, GenerationParams, Message

REPO = Path(__file__).resolve().parents[2]
FRANCE = [Message(role="user", content="What is the capital of France? Answer in one sentence.")]
STORY = [Message(role="user", content="Write a short story about a lighthouse keeper.")]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(backend: TransformersBackend, messages: list[Message], **kw: Any) -> list[str]:
    return [piece async for piece in backend.stream(messages, **kw)]


class BanTokens:
    """A logits processor that makes some token ids impossible."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.calls = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.calls += 1
        scores[:, self.ids] = float("-inf")
        return scores


@pytest.fixture(scope="module")
def backend(local_backend: TransformersBackend) -> TransformersBackend:
    run(local_backend.load())
    return local_backend


@pytest.fixture(scope="module")
def greedy(backend: TransformersBackend) -> str:
    (cand,) = run(backend.generate(FRANCE))
    return str(cand.text)


# --------------------------------------------------------------------------- without the model


def test_construction_is_lazy_and_checks_the_name() -> None:
    code = (
        "import sys; from persona_mw.adapters.transformers import TransformersBackend; "
        "b = TransformersBackend('smollm2'); c = b.capabilities; "
        "assert b.name == 'transformers:smollm2-135m-instruct', b.name; "
        "assert c.white_box and c.batched_candidates and c.max_context == 8192, c; "
        "assert 'torch' not in sys.modules, 'torch imported before first use'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    with pytest.raises(ModelNotFound, match="did you mean 'smollm2-135m-instruct'"):
        TransformersBackend("smollm-135m-instruct")


def test_create_validates_settings() -> None:
    b = create(model="smollm2", max_new_tokens=16, temperature=0.3)
    assert isinstance(b, TransformersBackend) and b.max_new_tokens == 16 and b.temperature == 0.3
    with pytest.raises(ConfigError, match="max_new_token") as info:
        create(max_new_token=16)
    assert "did you mean 'max_new_tokens'" in str(info.value)
    with pytest.raises(ConfigError, match="dtype"):
        create(dtype="int3")
    with pytest.raises(ConfigError, match="temperature"):
        create(temperature=-1)


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_is_a_white_box_backend(backend: TransformersBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.capabilities.white_box and backend.capabilities.max_context == 8192
    assert backend.model is models.load("smollm2")[0] and backend.tokenizer is models.load("smollm2")[1]
    text = "The capital of France is Paris."
    assert backend.count_tokens(text) == len(backend.tokenizer.encode(text, add_special_tokens=False))
    assert backend.count_tokens("") == 0


@pytest.mark.slow
def test_greedy_is_deterministic(backend: TransformersBackend, greedy: str) -> None:
    assert "Paris" in greedy
    (again,) = run(backend.generate(FRANCE))
    assert again.text == greedy and again.finish_reason == "stop" and again.index == 0
    assert again.tokens is not None and 0 < again.tokens < 48
    assert again.meta["sampled"] is False


@pytest.mark.slow
def test_n_candidates_in_one_batch(backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = backend.model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    params = GenerationParams(seed=7, max_tokens=12)
    monkeypatch.setattr(backend, "batching", False)  # model.generate's path
    cands = run(backend.generate(STORY, n=3, params=params))
    assert len(calls) == 1 and calls[0]["generation_config"].num_return_sequences == 3
    monkeypatch.setattr(backend, "batching", True)  # the continuous batch: 3 rows, the same samples
    batched = run(backend.generate(STORY, n=3, params=params))
    assert len(calls) == 1 and all(c.meta["batched"] for c in batched)
    assert [(c.index, c.text) for c in batched] == [(c.index, c.text) for c in cands]
    assert [c.index for c in cands] == [0, 1, 2]
    assert all(c.text and c.meta["sampled"] and c.meta["temperature"] == 0.7 for c in cands)
    assert len({c.text for c in cands}) > 1, "temperature 0 with n > 1 samples, so candidates differ"
    again = run(backend.generate(STORY, n=3, params=params))
    assert [c.text for c in again] == [c.text for c in cands], "a seed makes sampling reproducible"


@pytest.mark.slow
def test_stream_concatenates_to_the_greedy_answer(backend: TransformersBackend, greedy: str) -> None:
    pieces = run(collect(backend, FRANCE))
    assert len(pieces) > 1 and "".join(pieces) == greedy


@pytest.mark.slow
def test_stream_does_not_block_the_event_loop(backend: TransformersBackend) -> None:
    async def main() -> tuple[int, list[str]]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        pieces = await collect(backend, STORY, params=GenerationParams(max_tokens=24))
        done.set()
        await task
        return ticks, pieces

    ticks, pieces = run(main())
    assert pieces and ticks > 10


@pytest.mark.slow
def test_abandoned_stream_releases_the_model(backend: TransformersBackend, greedy: str) -> None:
    async def first_piece() -> str:
        agen = backend.stream(STORY, params=GenerationParams(max_tokens=200))
        piece = await agen.__anext__()
        await agen.aclose()
        return str(piece)

    assert run(first_piece())
    (cand,) = run(asyncio.wait_for(backend.generate(FRANCE), timeout=60))
    assert cand.text == greedy


@pytest.mark.slow
def test_a_logits_processor_changes_the_answer(backend: TransformersBackend, greedy: str) -> None:
    tok = backend.tokenizer
    banned = sorted({ids[0] for w in (" Paris", "Paris") if (ids := tok.encode(w, add_special_tokens=False))})
    ban = BanTokens(banned)
    (cand,) = run(backend.generate(FRANCE, decoding=[Decoding(source="test", logits_processors=[ban])]))
    assert ban.calls > 0
    assert cand.text != greedy and "Paris" not in cand.text
    # Processors from several Decodings are all applied.
    other = BanTokens([])
    run(backend.generate(FRANCE, params=GenerationParams(max_tokens=3),
                         decoding=[Decoding(logits_processors=[ban]), Decoding(logits_processors=[other])]))
    assert other.calls > 0


@pytest.mark.slow
def test_activation_hooks_run_and_are_removed(backend: TransformersBackend, greedy: str) -> None:
    seen: list[str] = []
    layer = "model.layers.0"

    def pair_hook(module: Any, args: Any, output: Any) -> None:
        seen.append("pair")

    def installer(model: Any) -> Any:
        return model.get_submodule(layer).register_forward_hook(lambda *a: seen.append("callable"))

    # transformers installs its own output-capturing hooks once (e.g. for hidden states); ours
    # are the ones that must be gone afterwards.
    before = dict(backend.model.get_submodule(layer)._forward_hooks)
    decoding = [Decoding(activation_hooks=[(layer, pair_hook), installer])]
    (cand,) = run(backend.generate(FRANCE, decoding=decoding))
    assert cand.text == greedy  # observing hooks change nothing
    assert "pair" in seen and "callable" in seen
    assert dict(backend.model.get_submodule(layer)._forward_hooks) == before


@pytest.mark.slow
def test_max_tokens_ends_with_length(backend: TransformersBackend) -> None:
    (cand,) = run(backend.generate(STORY, params=GenerationParams(max_tokens=5)))
    assert cand.finish_reason == "length" and cand.tokens == 5 and cand.text


@pytest.mark.slow
def test_stop_strings_cut_the_text(backend: TransformersBackend, greedy: str) -> None:
    params = GenerationParams(stop=[" is"])
    (cand,) = run(backend.generate(FRANCE, params=params))
    assert cand.finish_reason == "stop" and cand.text == greedy.split(" is")[0]
    assert "".join(run(collect(backend, FRANCE, params=params))) == cand.text


@pytest.mark.slow
def test_generate_batch_answers_each_prompt(backend: TransformersBackend, greedy: str) -> None:
    hello = [Message(role="user", content="Say hello.")]
    short = GenerationParams(max_tokens=16)  # the France answer is shorter than that
    (alone,) = run(backend.generate(hello, params=short))
    cands = run(backend.generate_batch([FRANCE, hello], params=short))
    assert [c.index for c in cands] == [0, 1]
    assert cands[0].text == greedy and cands[1].text == alone.text  # left padding is masked
    assert cands[0].meta["prompt_tokens"] != cands[1].meta["prompt_tokens"]


@pytest.mark.slow
def test_concurrent_calls_are_serialized(backend: TransformersBackend, greedy: str) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(*(backend.generate(FRANCE) for _ in range(3)))

    results = run(main())
    assert [r[0].text for r in results] == [greedy] * 3


@pytest.mark.slow
def test_failures_become_backend_errors(backend: TransformersBackend) -> None:
    def broken(input_ids: Any, scores: Any) -> Any:
        raise RuntimeError("boom")

    with pytest.raises(BackendError, match="boom") as info:
        run(backend.generate(FRANCE, decoding=[Decoding(logits_processors=[broken])]))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(BackendError, match="boom"):
        run(collect(backend, FRANCE, decoding=[Decoding(logits_processors=[broken])]))
    with pytest.raises(BackendError, match="neither callable"):
        run(backend.generate(FRANCE, decoding=[Decoding(activation_hooks=[42])]))
    # The backend still works afterwards: the lock was released.
    assert run(backend.generate(FRANCE, params=GenerationParams(max_tokens=2)))[0].tokens == 2


@pytest.mark.slow
def test_call_runs_on_the_torch_thread(backend: TransformersBackend) -> None:
    def logits_shape(model: Any, tok: Any, text: str) -> tuple[str, tuple[int, ...]]:
        ids = tok(text, return_tensors="pt")
        return threading.current_thread().name, tuple(model(**ids).logits.shape)

    name, shape = run(backend.call(logits_shape, "Hello there"))
    assert name.startswith("persona-mw-torch")
    assert shape[0] == 1 and shape[-1] == backend.model.config.vocab_size


GEMMA_HOWTO = "python -c \"import persona_mw.models as m; m.resolve('gemma3-270m')\""


@pytest.mark.slow
@pytest.mark.skipif(not models.is_cached("gemma3-270m"), reason=f"gemma3-270m not cached (one-time: {GEMMA_HOWTO})")
def test_a_base_model_gets_a_plain_prompt() -> None:
    gemma = TransformersBackend("gemma3-270m", max_new_tokens=24)
    ask = [
        Message(role="system", content="Answer briefly."),
        Message(role="user", content="What is the capital of France?"),
    ]
    assert gemma.format_prompt(ask) == "System: Answer briefly.\nUser: What is the capital of France?\nAssistant:"
    assert gemma.capabilities.max_context == 32768
    (cand,) = run(gemma.generate(ask))
    assert "Paris" in cand.text and "User:" not in cand.text  # the implicit "\nUser:" stop
    assert "".join(run(collect(gemma, ask))) == cand.text


def test_counting_tokens_on_other_threads_never_strips_a_batch_s_padding(local_backend):
    """Regression: count_tokens (request threads) and batch encoding (torch thread) shared one fast
    tokenizer, whose padding setting every call resets: a count landing between a batch's "pad" and
    its encoding left the batch unpadded ("Unable to create tensor ..."), seen in an eval run. With
    a tiny GIL switch interval the old code failed ~10 times a second here."""
    import sys
    import threading
    import time as _time

    be = local_backend
    be.tokenizer  # loaded
    errors: list[str] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            try:
                be.count_tokens("a short text to count, again and again")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=count) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        end = _time.monotonic() + 3.0
        n = 0
        while _time.monotonic() < end:
            try:
                enc = be._encode(["short", "a much longer prompt with many more words in it " * 5])
                assert enc["input_ids"].shape[0] == 2
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            n += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
    assert n > 10 and not errors, errors[:3]
