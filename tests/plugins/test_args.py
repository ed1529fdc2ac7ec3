"""Reward-guided decoding (ARGS) with a personalized linear reward head."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from persona_mw.errors import ConfigError
from persona_mw.plugins.args import fit_head
from persona_mw.types import GenerationParams, Message

P = {"max_tokens": 8, "temperature": 0.0}
CHOICE = {"kind": "choice", "user": "ana", "prompt": "Why is the sky blue?",
          "chosen": "Sunlight scatters off air; blue scatters most.",
          "rejected": ["The sky appears blue because of Rayleigh scattering, in which shorter wavelengths are "
                       "scattered much more strongly by the molecules of the atmosphere."]}


def test_fit_head_separates_two_classes() -> None:
    rng = np.random.default_rng(0)
    d = 16
    direction = rng.normal(size=d)
    pos = rng.normal(size=(200, d)) + 0.5 * direction
    neg = rng.normal(size=(300, d)) - 0.5 * direction
    theta, bias = fit_head(pos, neg)
    acc = ((pos @ theta + bias > 0).mean() + (neg @ theta + bias < 0).mean()) / 2
    assert acc > 0.9
    assert np.dot(theta, direction) / np.linalg.norm(theta) / np.linalg.norm(direction) > 0.8


def test_feedback_trains_a_head_and_weight_zero_is_plain_greedy(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw("pipeline: [{use: args, weight: 0, top_k: 10}]\n", backend=local_backend)
    mw.feedback(CHOICE)
    st = mw.store.get_profile("user:ana").extra["args"]
    assert st["pairs"] == 1 and len(st["theta"]) == local_backend.model.config.hidden_size
    assert st["train_accuracy"] > 0.5
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    plain = asyncio.run(local_backend.generate([Message(role="user", content="How do fridges work?")],
                                               params=GenerationParams(**P)))[0].text
    assert reply.text == plain
    assert "top-10, w=0" in next(s for s in reply.trace.steps if s.hook == "persona_decoding").summary
    mw.forget("ana")
    prof = mw.store.get_profile("user:ana")
    assert prof is None or "args" not in prof.extra


def test_black_box_backend_is_a_config_error(make_mw: Any) -> None:
    with pytest.raises(ConfigError, match="white-box"):
        make_mw("pipeline: [{use: args}]\n")
