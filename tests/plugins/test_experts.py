"""Expert logit arithmetic: prompt experts in the batch, and the shared-vocabulary check."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persona_mw import models
from persona_mw.errors import ConfigError, PluginError
from persona_mw.plugins.experts import set_weights, vocab_overlap
from persona_mw.types import GenerationParams, Message

P = {"max_tokens": 8, "temperature": 0.0}
CFG = """pipeline:
  - use: experts
    experts:
      - {name: concise, system: "Answer in one short sentence.", weight: 0}
      - {name: playful, system: "Be warm and playful.", weight: 0}
"""


def test_zero_weights_reproduce_plain_greedy_and_per_user_weights_steer(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw(CFG, backend=local_backend)
    q = "How do fridges work?"
    plain = asyncio.run(local_backend.generate([Message(role="user", content=q)],
                                               params=GenerationParams(**P)))[0].text
    reply = mw.chat(user="ana", messages=q, params=P)
    assert reply.text == plain
    # two experts, one row each; both anti-experts are the answer's own prompt (its row)
    assert "2 prompt stream(s)" in next(s for s in reply.trace.steps if s.hook == "persona_decoding").summary
    set_weights(mw, "user:ana", {"concise": 6.0})
    mw.state("anything", user="ana")  # evidence so ana's own node carries weight
    steered = mw.chat(user="ana", messages=q, params=P)
    assert "concise: w=0" not in next(s for s in steered.trace.steps if s.hook == "persona_decoding").summary


def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.resolve(name)))


def test_models_with_different_vocabularies_are_refused() -> None:
    if not models.is_cached("gemma3-270m"):
        pytest.skip("gemma3-270m is not cached offline")
    smol, gemma = _tokenizer("smollm2-135m-instruct"), _tokenizer("gemma3-270m")
    with pytest.raises(PluginError, match="do not share a vocabulary"):
        vocab_overlap(smol, gemma, "smollm2-135m-instruct", "gemma3-270m")
    assert vocab_overlap(smol, smol) == len(smol.get_vocab())


def test_duplicate_expert_names_and_black_box_backends_fail_at_startup(make_mw: Any, local_backend: Any) -> None:
    with pytest.raises(ConfigError, match="unique"):
        make_mw("pipeline: [{use: experts, experts: [{name: a}, {name: a}]}]\n", backend=local_backend)
    with pytest.raises(ConfigError, match="white-box"):
        make_mw(CFG)
