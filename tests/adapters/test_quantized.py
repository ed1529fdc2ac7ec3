"""Quantized weight loading (``dtype: int8`` and ``dtype: int4``, opt-in): close to float32 logits, and a
row's result does not depend on its batch mates beyond rounding (no per-batch activation scale)."""

from __future__ import annotations

from typing import Any

import pytest

from persona_mw import models
from persona_mw.adapters.transformers import TransformersBackend, create
from persona_mw.errors import ConfigError

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator keeps food cold.",
]


def test_int8_linear_matches_float_matmul_and_rows_are_independent() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 48, bias=False))
    x = torch.randn(5, 7, 64)
    with torch.inference_mode():
        want = net(x)
    ref = [m.weight.detach().clone() for m in net]
    models.int8_weights(net)
    assert [type(m).__name__ for m in net] == ["Int8Linear", "Int8Linear"]
    with torch.inference_mode():
        got = net(x)
        alone = net(x[2:3, 3:4])
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
    # One row computed alone equals the same row inside a batch of 35.
    assert torch.allclose(alone[0, 0], got[2, 3], atol=1e-5, rtol=0)
    # The int8 values and scales reproduce the weight to half a step.
    step = net[0].scale.float()
    assert bool((step <= ref[0].abs().amax(dim=1) / 127 * 1.01).all())
    rebuilt = net[0].qweight.float() * step[:, None]
    assert bool(((rebuilt - ref[0]).abs() <= step[:, None] * 0.51).all())


def test_quantized_dtypes_are_settings_and_unknown_dtype_names_the_choices() -> None:
    # float32 stays the default: the white-box loops' exactness tests (cached == uncached Amulet)
    # do not hold under int8 (see docs/notes/decode.md).
    assert TransformersBackend().dtype == "float32"
    assert create(dtype="int8").dtype == "int8"
    assert create(dtype="int4").dtype == "int4"
    with pytest.raises(ConfigError, match="int8, int4"):
        create(dtype="int3")


def test_int8_model_agrees_with_float32_logits_on_fixed_prompts() -> None:
    """The stated tolerance: greedy (top-1) agreement >= 95% of positions over the prompts, and the
    float32 top-1 token within the int8 model's top 5 everywhere."""
    torch = pytest.importorskip("torch")
    m32, tok = models.load("smollm2-135m-instruct", dtype="float32")
    m8, _ = models.load("smollm2-135m-instruct", dtype="int8")
    agree = total = 0
    worst: Any = 0.0
    with torch.inference_mode():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            a = m32(input_ids=ids).logits[0]
            b = m8(input_ids=ids).logits[0]
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            top5 = b.topk(5, dim=-1).indices
            assert bool((top5 == a.argmax(-1)[:, None]).any(dim=-1).all()), text
            worst = max(worst, float((a - b).abs().max()))
    assert agree / total >= 0.95, (agree, total, worst)


def test_int4_linear_reproduces_weights_on_a_4bit_grid_and_rows_are_independent() -> None:
    """Weights that lie on a Q4_1 grid (as the packaged GGUF's do) come back up to the bfloat16 rounding of
    each group's scale and offset; a shape the kernel cannot take falls back to int8."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():  # put every group of 32 inputs on a 16-level grid: low + scale * q
        q = torch.randint(0, 16, (32, 2, 32)).float()
        q[..., 0], q[..., 1] = 0, 15  # each group spans its whole range, as Q4_1 quantizes
        low, scale = torch.randn(32, 2, 1) * 0.02, torch.rand(32, 2, 1) * 0.01 + 0.002
        lin.weight.copy_((low + scale * q).view(32, 64))
    odd = torch.nn.Linear(40, 24)  # 24 output rows: not a multiple of 16
    net = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(32, 48, bias=False), odd)
    ref = lin.weight.detach().clone()
    models.int4_weights(net)
    assert [getattr(m, "quant", None) for m in net] == ["int4", None, "int4", "int8"]
    with torch.inference_mode():
        eye = torch.eye(64, dtype=torch.bfloat16)
        rebuilt = net[0].matmul(eye).t()  # [out, in]: the weights the kernel multiplies by
        x = torch.randn(6, 64)
        got = net[0](x)
        alone = net[0](x[4:5])
    err = (rebuilt - ref).abs()
    # The 4-bit values are exact; what rounds (to bfloat16, 8 significant bits) is each group's scale and
    # offset and the kernel's output. A weight on the wrong level would be off by a whole step.
    step = scale.view(32, 2).repeat_interleave(32, dim=1)
    offset = (low.view(32, 2) + 8 * scale.view(32, 2)).abs().repeat_interleave(32, dim=1)
    bound = 2 ** -8 * (ref.abs() + offset + 8 * step)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool((bound < step / 2).all())  # so the bound does rule out a wrong level
    assert torch.allclose(alone[0], got[4], atol=1e-5, rtol=0)


def test_int4_model_agrees_with_float32_logits_on_fixed_prompts() -> None:
    """The stated tolerance for int4 (tighter than int8's: the packaged weights are 4-bit already):
    top-1 agreement >= 97% of positions, and the float32 top-1 token within int4's top 5 everywhere."""
    torch = pytest.importorskip("torch")
    m32, tok = models.load("smollm2-135m-instruct", dtype="float32")
    m4, _ = models.load("smollm2-135m-instruct", dtype="int4")
    kinds = {getattr(m, "quant", None) for m in m4.modules() if hasattr(m, "quant")}
    assert kinds == {"int4", "int8"}  # the decoder at 4 bits, the LM head at 8
    assert getattr(m4.lm_head, "quant", None) == "int8"
    agree = total = 0
    with torch.inference_mode():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            a = m32(input_ids=ids).logits[0]
            b = m4(input_ids=ids).logits[0]
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            top5 = b.topk(5, dim=-1).indices
            assert bool((top5 == a.argmax(-1)[:, None]).any(dim=-1).all()), text
    assert agree / total >= 0.97, (agree, total)
