"""CAA steering vectors per graph node, learned from choices with the real local model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persona_mw.errors import ConfigError
from persona_mw.plugins.vectors import combined_vector
from persona_mw.types import GenerationParams, Message, Profile, Scope, ScopeNode, Turn, ChatRequest

P = {"max_tokens": 8, "temperature": 0.0}
CHOICE = {"kind": "choice", "user": "ana", "prompt": "Why is the sky blue?",
          "chosen": "Sunlight scatters off air; blue scatters most.",
          "rejected": ["The sky appears blue because of a phenomenon known as Rayleigh scattering, in which "
                       "shorter wavelengths of light are scattered much more strongly by the molecules of the "
                       "atmosphere than the longer wavelengths."]}


def plain_answer(backend: Any, text: str) -> str:
    msgs = [Message(role="user", content=text)]
    return asyncio.run(backend.generate(msgs, params=GenerationParams(**P)))[0].text


def test_feedback_learns_a_vector_that_steers_and_forget_removes_it(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw("pipeline: [{use: vectors, strength: 0}]\n", backend=local_backend)
    mw.feedback(CHOICE)
    st = mw.store.get_profile("user:ana").extra["vectors"]
    assert st["n"] == 1 and st["layer"] == 12 and len(st["sum"]) == local_backend.model.config.hidden_size
    assert st["model"] == "smollm2-135m-instruct"
    # strength 0: the hook adds a zero vector, plain greedy token for token
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    assert reply.text == plain_answer(local_backend, "How do fridges work?")
    assert "layer 12, strength 0" in next(s for s in reply.trace.steps if s.hook == "persona_decoding").summary
    mw.feedback({**CHOICE, "prompt": "What is rain?", "chosen": "Water falling from clouds.",
                 "rejected": ["Rain is liquid precipitation, consisting of water droplets that condense from "
                              "atmospheric water vapour and then become heavy enough to fall under gravity."]})
    assert mw.store.get_profile("user:ana").extra["vectors"]["n"] == 2  # a running sum: exact mean
    mw.forget("ana")
    prof = mw.store.get_profile("user:ana")
    assert prof is None or "vectors" not in prof.extra


def test_strength_changes_the_answer(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw("pipeline: [{use: vectors, strength: 12}]\n", backend=local_backend)
    mw.feedback(CHOICE)
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    assert reply.text != plain_answer(local_backend, "How do fridges work?")
    other = mw.chat(user="bob", messages="How do fridges work?", params=P)  # bob has no vector
    assert other.text == plain_answer(local_backend, "How do fridges work?")
    assert "no steering vector" in next(s for s in other.trace.steps if s.hook == "persona_decoding").summary


def test_vectors_combine_by_scope_weight() -> None:
    turn = Turn(request=ChatRequest(user="ana", messages=[Message(role="user", content="x")]))
    turn.scope = Scope(user="ana", granularity="user", nodes=[
        ScopeNode(id="user:ana", kind="user", weight=0.25), ScopeNode(id="group:g", kind="group", weight=0.5),
        ScopeNode(id="global", kind="global", weight=0.25)])
    turn.profiles = {
        "user:ana": Profile(node="user:ana", extra={"vectors": {"model": "m", "layer": 3, "sum": [4.0, 0.0], "n": 2}}),
        "group:g": Profile(node="group:g", extra={"vectors": {"model": "m", "layer": 3, "sum": [0.0, 1.0], "n": 1}}),
        "global": Profile(node="global", extra={"vectors": {"model": "other", "layer": 3, "sum": [9.0, 9.0], "n": 1}}),
    }
    vec, used = combined_vector(turn, "m", 3)
    assert used == {"user:ana": 0.25, "group:g": 0.5}  # another model's vector is never used
    assert vec == pytest.approx([2.0 * 0.25 / 0.75, 1.0 * 0.5 / 0.75])
    assert combined_vector(turn, "m", 4) == (None, {})


def test_black_box_backend_is_a_config_error(make_mw: Any) -> None:
    with pytest.raises(ConfigError, match="white-box"):
        make_mw("pipeline: [{use: vectors}]\n")
