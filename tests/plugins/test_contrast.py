"""The contrast plugin (Linear Alignment / Amulet) through the Middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persona_mw.errors import ConfigError
from persona_mw.plugins.contrast import set_strength, without_block
from persona_mw.types import GenerationParams, Message

P = {"max_tokens": 8, "temperature": 0.0}


def plain_answer(backend: Any, messages: list[Message]) -> str:
    return asyncio.run(backend.generate(messages, params=GenerationParams(**P)))[0].text


@pytest.mark.parametrize("mode,placement", [("linear", "user_suffix"), ("amulet", "user_suffix"),
                                            ("linear", "system")])
def test_strength_zero_reproduces_plain_greedy(make_mw: Any, local_backend: Any, mode: str, placement: str) -> None:
    mw = make_mw(f"pipeline: [{{use: contrast, mode: {mode}, strength: 0, placement: {placement}}}]\n",
                 backend=local_backend)
    mw.state("Keep your answers short and concise.", user="ana")
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    holder = reply.messages[0] if placement == "system" else reply.messages[-1]
    assert holder.role == ("system" if placement == "system" else "user")
    assert "short and concise" in holder.text and "How do fridges work?" in reply.messages[-1].text
    assert reply.text == plain_answer(local_backend, reply.messages)
    step = next(s for s in reply.trace.steps if s.hook == "persona_decoding")
    assert step.changed and f"{mode}, r=0" in step.summary


def test_per_user_strength_and_a_user_without_preferences(make_mw: Any, local_backend: Any) -> None:
    mw = make_mw("pipeline: [{use: contrast, strength: 3}]\n", backend=local_backend)
    mw.state("Keep your answers short and concise.", user="ana")
    set_strength(mw, "user:ana", 0.0)
    reply = mw.chat(user="ana", messages="How do fridges work?", params=P)
    # ana's own r=0 carries her whole scope weight only in part: the rest is the config's 3.
    step = next(s for s in reply.trace.steps if s.hook == "persona_decoding")
    assert "r=" in step.summary and "r=3" not in step.summary
    bob = mw.chat(user="bob", messages="How do fridges work?", params=P)  # nothing stated: plain decoding
    assert bob.text == plain_answer(local_backend, [Message(role="user", content="How do fridges work?")])
    assert "no stated preferences" in next(s for s in bob.trace.steps if s.hook == "persona_decoding").summary


def test_black_box_backend_is_a_config_error(make_mw: Any) -> None:
    with pytest.raises(ConfigError, match="white-box backend"):
        make_mw("pipeline: [{use: contrast}]\n")  # ScriptedBackend: white_box=False


def test_black_box_backend_with_skip_policy_is_skipped_in_the_trace(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: contrast, on_error: skip}]\n")
    mw.state("Be brief.", user="ana")
    reply = mw.chat(user="ana", messages="Hi")
    step = next(s for s in reply.trace.steps if s.hook == "persona_decoding")
    assert step.skipped and "white-box" in (step.error or "")


def test_set_strength_rejects_out_of_range(make_mw: Any) -> None:
    from persona_mw.errors import RequestError

    mw = make_mw("pipeline: [{use: contrast, on_error: skip}]\n")
    with pytest.raises(RequestError, match="strength"):
        set_strength(mw, "user:ana", -1)


def test_without_block_removes_only_the_inserted_block() -> None:
    block = "The user's preferences:\n- Be brief."
    msgs = [Message(role="system", content="You are helpful.\n\n" + block), Message(role="user", content="Hi")]
    assert [m.text for m in without_block(msgs, block)] == ["You are helpful.", "Hi"]
    alone = [Message(role="system", content=block), Message(role="user", content="Hi")]
    assert [m.role for m in without_block(alone, block)] == ["user"]


@pytest.mark.slow
def test_memory_and_contrast_show_a_preference_once_and_the_model_answers(make_mw: Any,
                                                                          local_backend: Any) -> None:
    """Both plugins used to inject the stated preference (memory's pinned copy and contrast's block):
    twice in the prompt, and the 135M model parroted "The user's preferences: ..." instead of answering."""
    mw = make_mw("pipeline:\n  - {use: memory, embedder: false}\n  - {use: contrast}\n", backend=local_backend)
    pref = "Answer in one short sentence."
    mw.state(pref, user="ana")
    reply = mw.chat(user="ana", messages="Why is the sky blue?", params={"max_tokens": 16, "temperature": 0.0})
    prompt = "\n".join(m.text for m in reply.messages)
    assert prompt.count(pref) == 1, prompt
    assert "The user's preferences:" in reply.messages[-1].text  # contrast's "with" prompt has it
    assert "The user's preferences" not in reply.text and reply.text.strip(), reply.text
    # The memory plugin still places what only it knows (a fact it was told), just not the pinned copy.
    mw.memory.remember("ana", "Ana lives in Lisbon.", kind="fact", polarity=None)
    reply = mw.chat(user="ana", messages="Where do I live?", params={"max_tokens": 8, "temperature": 0.0})
    assert "Lisbon" in reply.messages[-1].text and "\n".join(m.text for m in reply.messages).count(pref) == 1
