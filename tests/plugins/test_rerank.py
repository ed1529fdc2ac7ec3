"""rerank: best-of-n in one backend call, weighted rewards, per-node scope weights, failure policy."""

from __future__ import annotations

import pytest

from persona_mw import ConfigError, PluginError
from persona_mw.plugins import rewards as rw
from persona_mw.text import sentences, words
from persona_mw.testing import ScriptedBackend


@pytest.fixture
def fixed_rewards(monkeypatch):
    """Two test rewards with known scores, registered like built-ins (before the host starts)."""
    calls = []

    def a(candidates):
        calls.append("a")
        return [0.1, 0.9, 0.5, 0.3][: len(candidates)]

    async def b(turn, candidates, options):
        calls.append(("b", options))
        return [1.0, 0.0, 0.7, 0.2][: len(candidates)]

    def per_node(turn, candidates):
        return {"user:ana": [1.0, 0.0, 0.0, 0.0], "global": [0.0, 0.0, 0.0, 1.0]}

    def broken(candidates):
        raise RuntimeError("reward model offline")

    for name, fn in {"a": a, "b": b, "per_node": per_node, "broken": broken}.items():
        monkeypatch.setitem(rw.BUILTIN_REWARDS, name, fn)
    return calls


def test_weighted_combination_picks_argmax_and_traces_all_scores(make_mw, fixed_rewards):
    backend = ScriptedBackend()
    mw = make_mw("pipeline:\n  - use: rerank\n    n: 4\n    rewards: {a: 2.0, b: 1.0}\n"
                 "    options: {b: {k: 1}}\n", backend=backend)
    r = mw.chat(user="ana", messages="hello")
    assert len(backend.calls) == 1  # all four candidates from ONE backend call
    total = [round((2 * x + y) / 3, 4) for x, y in zip([0.1, 0.9, 0.5, 0.3], [1.0, 0.0, 0.7, 0.2])]
    assert r.trace.scores == {"a": [0.1, 0.9, 0.5, 0.3], "b": [1.0, 0.0, 0.7, 0.2], "rerank:total": total}
    assert r.trace.selected == 1 and r.text == "hello [1]"
    assert r.choices[0].meta["scores"]["rerank:total"] == total[1]
    assert len(r.choices) == 1  # the request asked for one answer
    assert ("b", {"k": 1}) in fixed_rewards
    step = next(s for s in r.trace.steps if s.hook == "persona_select")
    assert step.plugin == "rerank" and "picked 1 of 4" in step.summary
    assert "scores:" in r.trace.render()


def test_request_n_returns_all_candidates_best_first(make_mw, fixed_rewards):
    mw = make_mw("pipeline:\n  - use: rerank\n    rewards: {b: 1}\n")
    r = mw.chat(user="ana", messages="hi", n=4)
    assert [c.text for c in r.choices][0] == "hi [0]" and len(r.choices) == 4


def test_per_node_rewards_use_the_scope_weights(make_mw, fixed_rewards):
    mw = make_mw("graph: {prior_strength: 1}\npipeline:\n  - use: rerank\n    rewards: {per_node: 1}\n")
    mw.feedback(kind="stated", user="ana", text="x")  # 1 event: user weight 1/(1+1) = 0.5
    r = mw.chat(user="ana", messages="q")
    w_user = 0.5
    assert r.trace.scores["per_node"] == [round(w_user, 4), 0.0, 0.0, round(1 - w_user, 4)]
    for _ in range(7):  # more own evidence: the user's node outweighs global
        mw.feedback(kind="stated", user="ana", text="x")
    r = mw.chat(user="ana", messages="q")
    assert r.trace.selected == 0 and r.trace.scores["per_node"][0] > 0.8


def test_unknown_reward_is_a_config_error_naming_it(make_mw):
    with pytest.raises(ConfigError) as ei:
        make_mw("pipeline:\n  - use: rerank\n    rewards: {stlye: 1.0}\n")
    msg = str(ei.value)
    assert "'stlye'" in msg and "did you mean 'style'" in msg and ":3:" in msg


def test_options_for_unlisted_reward_and_bad_weights_are_config_errors(make_mw):
    with pytest.raises(ConfigError, match="judge"):
        make_mw("pipeline:\n  - use: rerank\n    rewards: {style: 1}\n    options: {judge: {mode: pairwise}}\n")
    with pytest.raises(ConfigError, match="rewards"):
        make_mw("pipeline:\n  - use: rerank\n    rewards: {}\n")


def test_reward_failure_fails_the_turn_by_default(make_mw, fixed_rewards):
    mw = make_mw("pipeline:\n  - use: rerank\n    rewards: {a: 1, broken: 1}\n")
    with pytest.raises(PluginError) as ei:
        mw.chat(user="ana", messages="hi")
    assert ei.value.plugin == "rerank" and "'broken'" in str(ei.value) and "offline" in str(ei.value)


def test_reward_failure_with_skip_drops_that_reward_and_says_so(make_mw, fixed_rewards):
    mw = make_mw("pipeline:\n  - use: rerank\n    on_error: skip\n    rewards: {a: 1, broken: 5}\n")
    r = mw.chat(user="ana", messages="hi")
    assert set(r.trace.scores) == {"a", "rerank:total"} and r.trace.selected == 1
    step = next(s for s in r.trace.steps if s.hook == "persona_score")
    assert "'broken' failed and was dropped" in step.summary
    assert any("broken" in f for f in r.trace.flags)


def test_normalize_zscore(make_mw, fixed_rewards):
    mw = make_mw("pipeline:\n  - use: rerank\n    normalize: zscore\n    rewards: {a: 1, b: 1}\n")
    r = mw.chat(user="ana", messages="hi")
    assert abs(sum(r.trace.scores["rerank:total"])) < 1e-3  # z-scores are centred


def test_style_and_stated_rewards_prefer_the_compliant_candidate(make_mw):
    answers = ["Sure! 😀 Here is a long answer. It has many sentences. It rambles on and on about fridges.",
               "A fridge pumps heat out of its box.",
               "Fridges move heat outside using a refrigerant. 😀",
               "- point one\n- point two"]

    class Fixed(ScriptedBackend):
        async def generate(self, messages, *, n=1, params=None, decoding=None):
            from persona_mw import Candidate

            self.calls.append(messages)
            return [Candidate(text=answers[i % 4], index=i) for i in range(n)]

    mw = make_mw("pipeline:\n  - use: stated\n  - use: rerank\n    rewards: {style: 1, stated: 1}\n"
                 "    options: {stated: {embeddings: 'off'}}\n", backend=Fixed())
    mw.feedback(kind="stated", user="ana", text="Answer in one short sentence.")
    mw.feedback(kind="stated", user="ana", text="no emojis")
    mw.feedback(kind="stated", user="ana", text="mention heat")
    r = mw.chat(user="ana", messages="How do fridges work?")
    assert r.text == answers[1], r.trace.render()
    assert r.trace.scores["stated"][1] > r.trace.scores["stated"][3]


@pytest.mark.slow
def test_best_of_4_on_the_real_model_serves_the_most_compliant(make_mw, local_backend):
    """A user who asked for one short sentence gets a candidate no other beats on both counts."""
    mw = make_mw("pipeline:\n  - use: stated\n  - use: rerank\n    n: 4\n    rewards: {style: 1.0}\n",
                 backend=local_backend)
    mw.feedback(kind="stated", user="ana", text="Answer in one short sentence.")
    r = mw.chat(user="ana", messages="How does a refrigerator keep food cold?", n=4, params={"seed": 7})
    style = r.trace.scores["style"]
    assert len(style) == 4 and len(r.trace.scores["rerank:total"]) == 4
    assert r.trace.selected == style.index(max(style))
    texts = [c.text for c in r.choices]  # n=4: the served one first, then the others
    served = (abs(len(sentences(texts[0])) - 1), len(words(texts[0])))
    for other in texts[1:]:
        o = (abs(len(sentences(other)) - 1), len(words(other)))
        assert not (o[0] <= served[0] and o[1] < served[1]), (texts, style)
    gen = next(s for s in r.trace.steps if s.hook == "persona_generate")
    assert gen.plugin == "rerank" and "4 candidate(s) from one call" in gen.summary


@pytest.mark.slow
def test_judge_on_the_real_model_scores_every_candidate(make_mw, local_backend):
    mw = make_mw("pipeline:\n  - use: rerank\n    n: 2\n    rewards: {judge: 1.0}\n", backend=local_backend)
    mw.feedback(kind="stated", user="ana", text="Answer in one short sentence.")
    r = mw.chat(user="ana", messages="Why is the sky blue?", params={"seed": 3, "max_tokens": 24})
    judge = r.trace.scores["judge"]
    assert len(judge) == 2 and all(0.0 <= x <= 1.0 for x in judge)
