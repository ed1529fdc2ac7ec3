"""The built-in rewards: style targets, polarity-aware stated similarity, the LLM judge's parsing."""

from __future__ import annotations

import asyncio
import re

import pytest

from persona_mw import Candidate, ChatRequest, Message, Profile, Scope, ScopeNode, StatedPreference, Turn
from persona_mw import text as _text
from persona_mw.plugins.rewards import judge_reward, parse_choice, parse_rating, stated_reward, style_reward
from persona_mw.testing import ScriptedBackend


def _turn(stated=(), persona=(), question="How do fridges work?"):
    req = ChatRequest(user="ana", messages=[Message(role="user", content=question)])
    prof = Profile(node="user:ana", persona=list(persona),
                   stated=[StatedPreference(text=t, polarity=p) for t, p in stated])
    scope = Scope(user="ana", granularity="user", nodes=[ScopeNode(id="user:ana", kind="user", weight=1.0)])
    return Turn(request=req, scope=scope, profiles={"user:ana": prof}, messages=list(req.messages))


def _cands(*texts):
    return [Candidate(text=t, index=i) for i, t in enumerate(texts)]


@pytest.mark.parametrize("text,polarity,expected", [
    ("Answer in one short sentence.", "like", {"sentences": 1.0, "max_words": 25.0}),
    ("Keep it under 50 words", "like", {"max_words": 50.0}),
    ("long answers", "avoid", {"max_words": 40.0}),
    ("Use bullet points", "like", {"bullets": 1.0}),
    ("no emojis", "like", {"emoji": 0.0}),
    ("Be formal", "like", {"formality": 1.0}),
    ("explain like I'm five", "like", {"max_grade": 7.0}),
    ("I love Python", "like", {}),
])
def test_style_targets_from_statements(text, polarity, expected):
    assert _text.style_targets(text, polarity) == expected


def test_style_reward_is_per_node_and_neutral_without_targets():
    cands = _cands("Fridges pump heat out.", "Fridges work by pumping heat. The refrigerant evaporates. Then it condenses.")
    got = style_reward(_turn([("Answer in one short sentence.", "like")]), cands)
    assert set(got) == {"user:ana"} and got["user:ana"][0] > got["user:ana"][1]
    assert style_reward(_turn(), cands) == [0.0, 0.0]


def test_stated_reward_is_polarity_aware():
    cands = _cands("Protein: chicken has 31 g per 100 g.", "Bacon and sausages are tasty processed meat.")
    turn = _turn([("Mention the protein content.", "like"), ("processed meat", "avoid")])
    got = stated_reward(turn, cands, {"embeddings": "off"})["user:ana"]
    assert got[0] > 0 > got[1]
    # "don't talk about processed meat" as a *like* statement is still an avoid.
    turn = _turn([("don't talk about processed meat", "like")])
    assert stated_reward(turn, cands, {"embeddings": "off"})["user:ana"][1] < 0


def test_parse_rating():
    assert parse_rating("8") == 8
    assert parse_rating("Rating: 7/10") == 7
    assert parse_rating("**9**") == 9
    assert parse_rating("On a scale of 1 to 10 I'd say 6.") == 6
    assert parse_rating("10") == 10
    assert parse_rating("I think it is great") is None
    assert parse_rating("3.5") is None or parse_rating("3.5") == 3


def test_parse_choice():
    assert parse_choice("2") == 2
    assert parse_choice("Answer 1.") == 1
    assert parse_choice("The second one") == 2
    assert parse_choice("1 or 2, hard to say") is None
    assert parse_choice("neither") is None


def _answer(prompt_text: str) -> str:
    return re.search(r"The answer:\n<<<(.*?)>>>", prompt_text, re.S).group(1)


def test_judge_pointwise_uses_the_persona_and_falls_back_on_garbage():
    seen = []

    def script(messages):
        seen.append(messages[-1].text)
        ans = _answer(messages[-1].text)
        return "garbage, no number" if "bad" in ans else str(min(10, 12 - len(ans.split())))

    backend = ScriptedBackend(script=script)
    turn = _turn([("Answer in one short sentence.", "like")], persona=["The user values brevity."])
    cands = _cands("Short answer.", "A much longer answer with many many more words in it.", "bad answer")
    scores = asyncio.run(judge_reward(turn, cands, lambda role: backend, {}))
    assert scores[0] == 1.0 and scores[1] < scores[0] and scores[2] == 0.5
    assert "The user values brevity." in seen[0] and "Wants: Answer in one short sentence." in seen[0]
    assert any("unparseable rating" in n and "2:" in n for n in turn._notes)


def test_judge_pairwise_asks_both_orders_and_counts_inconsistency_as_tie():
    def script(messages):
        text = messages[-1].text
        a = re.search(r"Answer 1:\n<<<(.*?)>>>", text, re.S).group(1)
        b = re.search(r"Answer 2:\n<<<(.*?)>>>", text, re.S).group(1)
        if "biased" in (a + b):
            return "1"  # always the first shown: position bias, cancelled by asking both orders
        return "1" if len(a) < len(b) else "2"

    backend = ScriptedBackend(script=script)
    turn = _turn()
    scores = asyncio.run(judge_reward(turn, _cands("short", "a longer one", "the longest answer here"),
                                      lambda role: backend, {"mode": "pairwise"}))
    assert len(backend.calls) == 6 and scores == [1.0, 0.5, 0.0]
    scores = asyncio.run(judge_reward(turn, _cands("biased a", "biased b"), lambda role: backend, {"mode": "pairwise"}))
    assert scores == [0.5, 0.5]


def test_judge_role_backend_is_used_in_the_pipeline(make_mw):
    judge = ScriptedBackend(script=lambda m: "9" if "[2]" in m[-1].text else "2")
    mw = make_mw("pipeline:\n  - use: rerank\n    rewards: {judge: 1}\n")
    # a configured judge role: plugins get role backends from the registry (PluginContext.backend)
    main = mw.backend
    mw.backends.build = lambda role: judge if role == "judge" else main
    r = mw.chat(user="ana", messages="hi")
    assert r.trace.selected == 2 and len(judge.calls) == 4
