"""The shared helpers in core (``persona_mw.text``, ``persona_mw.placement``, ``persona_mw.reward_set``)
give exactly what the code they replaced gave.

The expected values in ``tests/data/e70bffa_shared_pins.json`` were computed on commit e70bffa by
``tests/data/e70bffa_shared_pins.py`` with the old modules (``persona_mw.features``,
``persona_mw.plugins._text``, ``persona_mw.plugins._placement``, ``fermi.place``, the ``contrast``
rewrite, and ``rerank`` / ``corrector`` calling the rewards each in its own way).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from persona_mw import text
from persona_mw.features import NgramHasher, style_vector
from persona_mw.placement import place_block
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Candidate, Message

PINS: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "e70bffa_shared_pins.json").read_text("utf-8"))

TEXTS = [
    "The Eiffel Tower is a wrought iron tower in Paris. It was built in 1889!",
    "Hey, you're gonna love this: it's super easy 😀. Really? Yes!\n\n- one\n- two\n1. first\n2) second",
    "## Summary:\nTherefore, the consequently derived methodology is, however, unnecessarily complicated.\n\n"
    "```python\nprint(1)\n```\nUse `x` and `y`.",
    "¿Dónde está la biblioteca? Está cerca de la estación, y es muy grande.",
    "Привет, как дела? Всё хорошо.",
    "",
]
STATEMENTS = [("Answer in one short sentence.", "like"), ("no emojis", "like"),
              ("Use bullet points and a formal tone", "like"), ("Explain simply, like I'm five, with code", "like"),
              ("long detailed answers", "avoid"), ("under 50 words please", "like")]


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_profile_features_and_grade_are_the_old_values(i: int) -> None:
    t, old = TEXTS[i], PINS["features"][i]
    assert text.latin_words(t) == old["words"]
    assert text.flesch_kincaid_grade(t) == old["fk"]
    assert [text.count_syllables(w) for w in text.latin_words(t)] == old["syll"]
    assert text.style_features(t) == old["style"]
    assert [float(x) for x in style_vector(t)] == old["vector"]
    # float32 features: equal to one float32 rounding step (numpy 2.4.6 gives -0.0577192232 where the
    # pins, computed under an earlier numpy, have -0.0577192195 for one bucket of TEXTS[2])
    assert [float(x) for x in NgramHasher(64).transform_one(t)] == pytest.approx(old["hash"], rel=2e-7, abs=1e-9)


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_reward_and_language_features_are_the_old_values(i: int) -> None:
    t, old = TEXTS[i], PINS["text"][i]
    assert text.words(t) == old["words"]
    assert text.sentences(t) == old["sentences"]
    assert text.response_style(t) == old["style"]
    assert text.detect_language(t) == PINS["lang"][i]
    assert sorted(text.content_terms(t)) == PINS["terms"][i]
    assert [text.coverage(t, s) for s, _ in STATEMENTS] == PINS["coverage"][i]


def test_style_targets_fit_and_polarity_are_the_old_values() -> None:
    for (s, p), old, fits in zip(STATEMENTS, PINS["targets"], PINS["fit"]):
        assert [s, p, text.style_targets(s, p), list(text.polarity_of(s, p))] == old
        assert [text.style_fit(text.response_style(t), text.style_targets(s, p)) for t in TEXTS] == fits


def test_the_pins_are_not_trivial() -> None:
    """The fixed texts exercise what they should: grades differ, several languages, real targets."""
    assert len({round(f["fk"], 3) for f in PINS["features"]}) >= 5
    assert {"en", "es", "ru", "und"} <= set(PINS["lang"])
    assert all(t[2] for t in PINS["targets"])


def _msgs(raw: list[dict[str, str]]) -> list[Message]:
    return [Message(role=m["role"], content=m["content"]) for m in raw]  # type: ignore[arg-type]


def test_placement_gives_the_old_messages_for_stated_memory_and_fermi() -> None:
    from persona_mw.plugins.fermi import place

    assert len(PINS["place"]) == 2 * (3 * 3 + 1)
    for kind, raw, placement, note, expected in PINS["place"]:
        msgs = _msgs(raw)
        if kind == "block":
            got = place_block(msgs, "BLOCK", placement, system_note=note)
        else:
            got = place(msgs, "" if note == "" else "PROMPT", placement)
        assert [m.model_dump(mode="json") for m in got] == expected, (kind, placement, note)


def test_contrast_places_its_block_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    import persona_mw.plugins.contrast as contrast

    monkeypatch.setattr(contrast, "scope_preferences", lambda turn, inc: [("Be brief.", "like"), ("emojis", "avoid")])
    for raw, placement, expected in PINS["contrast"]:
        plugin = contrast.Contrast(contrast.Contrast.Config(placement=placement))
        turn = SimpleNamespace(scope=object(), stash={}, note=lambda s: None)
        got = plugin.persona_rewrite(turn, _msgs(raw))
        assert [m.model_dump(mode="json") for m in got] == expected
        # the "without" stream takes exactly that block out again
        plain = contrast.without_block(got, turn.stash[plugin._block])
        assert [m.text for m in plain] == [m["content"] for m in raw]


def test_place_block_rejects_an_unknown_placement_and_adds_nothing_for_an_empty_block() -> None:
    msgs = [Message(role="user", content="hi")]
    with pytest.raises(ValueError, match="sideways"):
        place_block(msgs, "B", "sideways")
    assert place_block(msgs, "", "system") == msgs


# --------------------------------------------------------------------------- rewards

CANDS = [
    "Sure! 😀 Here's a long and detailed walk through everything you could possibly want to know about tea, "
    "with lots of words.",
    "Green tea is lightly processed.",
    "- Green tea: unoxidised\n- Black tea: oxidised\nTherefore they differ.",
    "Tea comes from Camellia sinensis; black tea is fully oxidised, green tea is not, oolong sits between.",
]
GRAPH = "graph:\n  groups:\n    acme: {stated: ['Use bullet points.', 'Be formal.'], members: [ana]}\n"


class FixedCandidates(ScriptedBackend):
    async def generate(self, messages: list[Message], *, n: int = 1, params: Any = None,
                       decoding: Any = None) -> list[Candidate]:
        return [Candidate(text=c, index=i) for i, c in enumerate(CANDS[:n])]


def _user(mw: Any) -> None:
    mw.state("Keep your answers short and concise.", user="ana")
    mw.state("no emojis", user="ana")


def test_rerank_scores_are_the_old_ones(make_mw: Any) -> None:
    mw = make_mw(GRAPH + "pipeline:\n  - use: rerank\n    n: 4\n    rewards: {style: 1.0, stated: 0.5}\n",
                 backend=FixedCandidates())
    _user(mw)
    r = mw.chat(user="ana", messages="Tell me about tea.")
    assert r.trace.scores == PINS["rerank"]["scores"]
    assert r.text == PINS["rerank"]["text"]
    assert any("by node" in s.summary for s in r.trace.steps)  # per-node scope weights were used


def test_corrector_reward_is_the_old_one_and_equals_the_rerank_total(make_mw: Any) -> None:
    mw = make_mw(GRAPH + "pipeline:\n  - use: corrector\n    rewards: {style: 1.0, stated: 0.5}\n",
                 backend=FixedCandidates())
    _user(mw)
    plugin = next(p.instance for p in mw.host.pipeline if p.instance.name == "corrector")
    seen: dict[str, list[float]] = {}
    reward = plugin.reward

    async def spy(turn: Any, texts: list[str]) -> list[float]:
        seen["all"] = await reward(turn, CANDS)
        return await reward(turn, texts)

    plugin.reward = spy
    r = mw.chat(user="ana", messages="Tell me about tea.")
    assert r.trace.scores == PINS["corrector"]["trace"]
    assert seen["all"] == PINS["corrector"]["all"] == PINS["rerank"]["scores"]["rerank:total"]
