"""The lean decode step (``adapters/transformers/lean.py``): bit-identical logits to transformers' forward
on the real packaged model, for every dtype; and transformers' forward wherever anything hooks the model."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from persona_mw import models
from persona_mw.adapters.transformers import TransformersBackend
from persona_mw.adapters.transformers.lean import decoder_for
from persona_mw.adapters.transformers.steering import forward_last
from persona_mw.logits import residual_hook
from persona_mw.types import GenerationParams, Message

torch = pytest.importorskip("torch")
from transformers import DynamicCache  # noqa: E402  # after the importorskip

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Write a short story about a lighthouse keeper.", "Hi",
           "Explain how a refrigerator works to a ten-year-old, please."]


def _reference_step(model: Any, ids: Any, mask: Any, cache: Any) -> Any:
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1].to(torch.float32)


def _both(model: Any, tok: Any, prompts: list[str], steps: int) -> tuple[list[Any], list[Any]]:
    """Logits of ``steps`` greedy decode steps by transformers' forward and by the lean step."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref, lean_out = [], []
    with torch.inference_mode():
        got = decoder_for(model)
        assert got is not None and got[1] == {}
        lean = got[0]
        c1, c2 = DynamicCache(config=model.config), DynamicCache(config=model.config)
        first = _reference_step(model, enc["input_ids"], enc["attention_mask"], c1)
        _reference_step(model, enc["input_ids"], enc["attention_mask"], c2)
        mask, nxt = enc["attention_mask"], first.argmax(-1, keepdim=True)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            ref.append(_reference_step(model, nxt, mask, c1))
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -1:]
            lean_out.append(lean.step(nxt, mask, positions, c2))
            nxt = ref[-1].argmax(-1, keepdim=True)
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(c1.layers, c2.layers, strict=True))
    return ref, lean_out


def test_the_capture_hooks_transformers_leaves_behind_do_not_switch_the_lean_step_off() -> None:
    """A forward asked for hidden states installs transformers' output-capturing hooks on the layers for
    good (a reward-guided search's reference does); they act only while a capture runs, so the lean step
    still applies, bit for bit, and stands aside while one runs."""
    from transformers.utils.output_capturing import _active_collector

    model, tok = models.load(MODEL, dtype="float32")
    model = copy.deepcopy(model)  # the shared model keeps no hooks from this test
    enc = tok([PROMPTS[0]], return_tensors="pt")
    with torch.inference_mode():
        model(**enc, output_hidden_states=True)
    assert any(m._forward_hooks for m in model.modules())  # transformers left its hooks installed
    ref, got = _both(model, tok, [PROMPTS[0]], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    with torch.inference_mode():
        assert decoder_for(model) is not None
        token = _active_collector.set({"hidden_states": []})
        try:
            assert decoder_for(model) is None  # a capture is running: transformers' forward records it
        finally:
            _active_collector.reset(token)


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4", "bfloat16"])
def test_lean_step_is_bit_identical_to_transformers_forward(dtype: str) -> None:
    """Batch of one (no mask in attention) and a left-padded batch of three (boolean mask, packed GQA):
    every step's logits and the cache are equal bit for bit; for int8/int4 this includes the fused
    q/k/v and gate/up products against transformers' separate ones."""
    model, tok = models.load(MODEL, dtype=dtype)
    for prompts in ([PROMPTS[0]], PROMPTS):
        ref, got = _both(model, tok, prompts, steps=6)
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert torch.equal(a, b), (dtype, len(prompts), i, float((a - b).abs().max()))
    if dtype in ("int8", "int4"):
        with torch.inference_mode():
            got = decoder_for(model)
        assert got is not None and all(f is not None for f in got[0].fused)
        att = model.model.layers[0].self_attn
        # The modules' weights are row slices of the fused tensor: one copy in memory.
        fused_ptr = att.q_proj.qweight.untyped_storage().data_ptr()
        assert att.k_proj.qweight.untyped_storage().data_ptr() == fused_ptr


def test_a_hooked_model_takes_transformers_forward_and_gets_the_hooks_effect() -> None:
    """Steering vectors, LoRA adapters and capture hooks are forward hooks: with one registered anywhere,
    the lean step stands aside, so the hook's effect is in the logits."""
    model, tok = models.load(MODEL, dtype="float32")
    backend = TransformersBackend(MODEL)
    backend._model, backend._tokenizer = model, tok
    enc = tok([PROMPTS[0]], return_tensors="pt")
    push = torch.randn(model.config.hidden_size) * 4

    def add(module: Any, args: Any, output: Any) -> Any:
        return (output[0] + push, *output[1:]) if isinstance(output, tuple) else output + push

    def run(hooked: bool, lean: bool) -> Any:
        backend.lean_step = lean
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = forward_last(backend, enc["input_ids"], enc["attention_mask"], cache)
            mask = torch.cat([enc["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            handle = model.model.layers[10].register_forward_hook(add) if hooked else None
            try:
                if hooked:
                    assert decoder_for(model) is None
                return forward_last(backend, logits.argmax(-1, keepdim=True), mask, cache)
            finally:
                if handle is not None:
                    handle.remove()

    plain, hooked, hooked_reference = run(False, True), run(True, True), run(True, False)
    assert torch.equal(hooked, hooked_reference)
    assert not torch.equal(plain, hooked)
    with torch.inference_mode():
        assert decoder_for(model) is not None  # the hook is gone: lean again


def test_lean_step_stands_aside_for_autograd_a_replaced_module_and_other_architectures() -> None:
    model, _ = models.load(MODEL, dtype="float32")
    assert decoder_for(model) is None  # autograd on: training must see transformers' graph
    mutable = copy.deepcopy(model)
    with torch.inference_mode():
        assert decoder_for(mutable) is not None
        mutable.model.layers[3].mlp.down_proj = torch.nn.Linear(1536, 576, bias=False)  # e.g. a wrapped layer
        assert decoder_for(mutable) is None
        mutable.model.layers[3].mlp.down_proj = torch.nn.Identity()
        assert decoder_for(mutable) is None
    del mutable
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with torch.inference_mode():
        assert decoder_for(gpt2) is None


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_backend_answers_are_the_same_with_and_without_the_lean_step(dtype: str) -> None:
    """Through the continuous batch (two requests at once, different prompt lengths), greedy answers
    with the lean step equal those of transformers' forward on every step."""
    backend = TransformersBackend(MODEL, max_new_tokens=24, dtype=dtype)
    asks = [[Message(role="user", content=p)] for p in PROMPTS[:2]]

    async def answers() -> list[str]:
        got = await asyncio.gather(*(backend.generate(a, params=GenerationParams(max_tokens=24)) for a in asks))
        return [c[0].text for c in got]

    lean = asyncio.run(answers())
    steps = backend.scheduler.steps
    backend.lean_step = False
    reference = asyncio.run(answers())
    assert lean == reference and all(lean)
    assert backend.scheduler.steps > steps  # the reference really decoded


def test_residual_adds_and_the_hidden_state_are_computed_in_the_lean_step_bit_for_bit() -> None:
    """A steering vector (the ``vectors`` plugin's marked residual-add hook) keeps the lean step and gives
    the logits transformers' forward gives with the hook; ``hidden`` is transformers' last hidden state."""
    model, tok = models.load(MODEL, dtype="int4")
    backend = TransformersBackend(MODEL, dtype="int4")
    backend._model, backend._tokenizer = model, tok
    tok.padding_side = "left"
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    push = torch.randn(model.config.hidden_size) * 3

    def run(lean: bool, hooked: bool) -> tuple[Any, Any]:
        backend.lean_step = lean
        cache = DynamicCache(config=model.config)
        handles = [model.model.layers[7].register_forward_hook(residual_hook(push)),
                   model.model.layers[7].register_forward_hook(residual_hook(-0.5 * push))] if hooked else []
        try:
            with torch.inference_mode():
                if hooked and lean:
                    got = decoder_for(model)
                    assert got is not None and list(got[1]) == [7] and len(got[1][7]) == 2
                logits = forward_last(backend, enc["input_ids"], enc["attention_mask"], cache)
                mask = torch.cat([enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
                return forward_last(backend, logits.argmax(-1, keepdim=True), mask, cache, hidden=True)
        finally:
            for h in handles:
                h.remove()

    (lean_logits, lean_hidden), (ref_logits, ref_hidden) = run(True, True), run(False, True)
    assert torch.equal(lean_logits, ref_logits) and torch.equal(lean_hidden, ref_hidden)
    plain_logits, plain_hidden = run(True, False)
    assert torch.equal(plain_logits, run(False, False)[0]) and not torch.equal(plain_logits, lean_logits)
    assert plain_hidden.shape == (2, model.config.hidden_size)


def test_steering_vectors_join_the_continuous_batch_and_steer_only_their_own_rows() -> None:
    """A request carrying a steering vector (the ``vectors`` plugin's marked hook) shares a batch with a
    plain one: the steered answer equals the hooked reference path's (transformers' generate with the hook
    on every row), and the plain answer equals that prompt's answer alone."""
    from persona_mw.plugins.vectors import add_vector_hook
    from persona_mw.types import Decoding

    backend = TransformersBackend(MODEL, max_new_tokens=20)
    model, tok = models.load(MODEL)
    backend._model, backend._tokenizer = model, tok
    torch.manual_seed(1)
    steer = [Decoding(source="vectors", activation_hooks=[add_vector_hook(9, torch.randn(576).tolist(), 6.0)])]
    ask_a, ask_b = [Message(role="user", content=PROMPTS[0])], [Message(role="user", content=PROMPTS[2])]
    params = GenerationParams(max_tokens=20)

    async def batch() -> tuple[str, str]:
        a, b = await asyncio.gather(backend.generate(ask_a, params=params, decoding=steer),
                                    backend.generate(ask_b, params=params))
        return a[0].text, b[0].text

    peak = backend.scheduler.peak_batch
    steered, plain = asyncio.run(batch())
    assert backend.scheduler.peak_batch >= 2 > peak  # they really shared a step
    backend.lean_step = False  # the reference: not schedulable, transformers' generate with the hook
    reference = asyncio.run(backend.generate(ask_a, params=params, decoding=steer))[0].text
    alone = asyncio.run(backend.generate(ask_b, params=params))[0].text
    unsteered = asyncio.run(backend.generate(ask_a, params=params))[0].text
    assert steered == reference and plain == alone
    assert steered != unsteered  # the vector did something


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_requests_with_different_lora_adapters_share_one_batch_and_match_their_hooked_answers(dtype: str) -> None:
    """Three requests at once: two with different LoRA adapters (the ``lora`` plugin's marked hook) and one
    with none decode in one continuous batch; each answer equals its reference on the path before (not
    schedulable: transformers' generate with that request's adapter hooks), and the plain one its answer
    alone. The lean step's per-row deltas equal the hooked forward's bit for bit."""
    from persona_mw.plugins import _lora
    from persona_mw.types import Decoding

    model, tok = models.load(MODEL, dtype=dtype)
    backend = TransformersBackend(MODEL, max_new_tokens=16, dtype=dtype)
    backend._model, backend._tokenizer = model, tok
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.2") and n.endswith(("q_proj", "v_proj",
                                                                                                    "down_proj"))]
    assert len(names) >= 12  # layers 2 and 20-29, three projections each

    def adapter(seed: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for n in names:
            lin = model.get_submodule(n)
            weights[n] = (torch.randn(4, lin.in_features, generator=g) * 0.05,
                          torch.randn(lin.out_features, 4, generator=g) * 0.05)
        return _lora.Adapter(weights, r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))

    ads = [adapter(1), adapter(2)]
    decs = [[Decoding(source="lora", activation_hooks=[_lora.adapter_hook(ad)])] for ad in ads] + [[]]
    asks = [[Message(role="user", content=p)] for p in PROMPTS]
    params = GenerationParams(max_tokens=16)

    async def together() -> list[str]:
        got = await asyncio.gather(*(backend.generate(a, params=params, decoding=d) for a, d in zip(asks, decs)))
        return [c[0].text for c in got]

    peak = backend.scheduler.peak_batch
    batched = asyncio.run(together())
    assert backend.scheduler.peak_batch >= 3 > peak
    backend.lean_step = False  # the reference: each request alone, its hooks on transformers' generate
    reference = [asyncio.run(backend.generate(a, params=params, decoding=d))[0].text for a, d in zip(asks, decs)]
    assert batched == reference
    assert len(set(batched[:2] + [asyncio.run(backend.generate(asks[0], params=params))[0].text])) == 3

    # The deltas themselves: one step of the lean path with per-row LoRA == the hooked forward.
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    row_lora = {n: [(0, 1, *ads[0].weights[n]), (1, 2, *ads[1].weights[n])] for n in names}
    outs = []
    for lean in (True, False):
        backend.lean_step = lean
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            first = forward_last(backend, enc["input_ids"], enc["attention_mask"], cache)
            mask = torch.cat([enc["attention_mask"], torch.ones(3, 1, dtype=torch.long)], dim=1)
            outs.append(forward_last(backend, first.argmax(-1, keepdim=True), mask, cache, row_lora=row_lora))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_reward_guided_search_runs_in_the_batch_with_the_same_tokens_as_its_own_loop(dtype: str) -> None:
    """An ``args`` request (top-k candidates scored by a reward on their hidden states) shares the continuous
    batch with a plain request: its answer equals the one of its own loop (``reward.py``, before), the
    plain one its answer alone, and the reward really moved the answer."""
    import numpy as np

    from persona_mw.plugins.args import head_reward
    from persona_mw.types import Decoding

    model, tok = models.load(MODEL, dtype=dtype)
    backend = TransformersBackend(MODEL, max_new_tokens=16, dtype=dtype)
    backend._model, backend._tokenizer = model, tok
    theta = np.random.default_rng(0).standard_normal(model.config.hidden_size) * 0.05
    args = [Decoding(source="args", token_reward=head_reward(theta, 0.0), reward_top_k=6, reward_weight=2.0)]
    ask_a, ask_b = [Message(role="user", content=PROMPTS[0])], [Message(role="user", content=PROMPTS[2])]
    params = GenerationParams(max_tokens=16)

    async def together() -> tuple[Any, Any]:
        a, b = await asyncio.gather(backend.generate(ask_a, params=params, decoding=args),
                                    backend.generate(ask_b, params=params))
        return a[0], b[0]

    peak = backend.scheduler.peak_batch
    guided, plain = asyncio.run(together())
    assert backend.scheduler.peak_batch >= 2 > peak and guided.meta["batched"]
    assert guided.meta["steered"] == ["args"] and guided.meta["reward_top_k"] == 6
    backend.batching = False  # the reference: the own loop of reward.py, request alone
    reference = asyncio.run(backend.generate(ask_a, params=params, decoding=args))[0]
    alone = asyncio.run(backend.generate(ask_b, params=params))[0].text
    unguided = asyncio.run(backend.generate(ask_a, params=params))[0].text
    assert "batched" not in reference.meta
    assert guided.text == reference.text and plain.text == alone
    assert guided.text != unguided


def test_generate_steered_takes_requests_with_different_marked_hooks_and_refuses_unmarked_ones() -> None:
    from persona_mw.errors import BackendError
    from persona_mw.plugins.vectors import add_vector_hook
    from persona_mw.types import Decoding

    model, tok = models.load(MODEL)
    backend = TransformersBackend(MODEL, max_new_tokens=12)
    backend._model, backend._tokenizer = model, tok
    torch.manual_seed(3)
    decs = [[Decoding(source="vectors", activation_hooks=[add_vector_hook(8, torch.randn(576).tolist(), 6.0)])]
            for _ in range(2)]
    asks = [[Message(role="user", content=p)] for p in PROMPTS[:2]]
    params = GenerationParams(max_tokens=12)
    got = asyncio.run(backend.generate_steered(list(zip(asks, decs)), params=params))
    alone = [asyncio.run(backend.generate(a, params=params, decoding=d))[0].text for a, d in zip(asks, decs)]
    assert [c.index for c in got] == [0, 1] and [c.text for c in got] == alone
    unmarked = [[Decoding(source="x", activation_hooks=[lambda m, i=i: []])] for i in range(2)]
    with pytest.raises(BackendError, match="different activation hooks"):
        asyncio.run(backend.generate_steered(list(zip(asks, unmarked)), params=params))


def test_per_batch_caches_never_hand_a_new_request_the_previous_requests_vectors_or_adapters() -> None:
    """The scheduler caches each batch composition's per-row vectors and LoRA deltas. Keyed on ``id(job)``,
    a freed request's id is soon reused by a new one, which then got the old request's steering or
    adapter (another user's). Keys are per-job serial numbers."""
    import threading
    from concurrent.futures import Future
    from types import SimpleNamespace

    from persona_mw.adapters.transformers.scheduler import Job, Scheduler

    sched = Scheduler(SimpleNamespace(), 8, 8, 64)  # type: ignore[arg-type]  # only the caches are used
    job: Any = None
    reused = 0
    for i in range(60):
        fut, ev = Future(), threading.Event()  # made first, so the new job can take the freed one's memory
        old = id(job)
        sched.active = []
        job = None
        job = Job([], [], {}, fut, ev)
        reused += id(job) == old
        job.enc = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
        job.adds = [(0, torch.full((4,), float(i)))]
        job.loras = [SimpleNamespace(weights={"m": (torch.full((2, 4), float(i)), torch.zeros(4, 2))})]
        sched.active = [job]
        adds, lora = sched._adds(), sched._lora()
        assert adds is not None and float(adds[0][0][0, 0, 0]) == float(i)
        assert lora is not None and float(lora["m"][0][2][0, 0]) == float(i)
        del adds, lora
    assert reused > 0  # the situation the keys must survive did occur
