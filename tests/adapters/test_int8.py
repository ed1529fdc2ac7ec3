"""int8 weight-only loading (``dtype: int8``, opt-in): close to float32 logits, and a row's result does not
depend on its batch mates beyond rounding (no per-batch activation scale)."""

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


def test_int8_is_a_dtype_setting_and_unknown_dtype_names_the_choices() -> None:
    # float32 stays the default: the white-box loops' exactness tests (cached == uncached Amulet)
    # do not hold under int8 (see docs/notes/decode.md).
    assert TransformersBackend().dtype == "float32"
    assert create(dtype="int8").dtype == "int8"
    with pytest.raises(ConfigError, match="int8"):
        create(dtype="int4")


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
