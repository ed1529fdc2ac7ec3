"""``persona-mw eval style``: metrics, the satisfaction arithmetic, the method registry, a real run."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import pytest

from persona_mw.cli import main
from persona_mw.eval import style
from persona_mw.eval.style import (
    METHODS,
    SimUser,
    StyleRun,
    evaluate,
    make_users,
    metric,
    repetition,
    satisfaction,
    satisfied,
    tone_score,
)

PLAIN = ("The heart pumps blood through the body. Blood carries oxygen to the cells. "
         "The lungs give the blood fresh oxygen.")
EXPERT = ("The myocardium generates rhythmic contractions that propel oxygenated blood through the systemic "
          "circulation; pulmonary capillaries facilitate alveolar gas exchange, consequently replenishing "
          "haemoglobin saturation.")
SHORT = "The heart pumps blood."
WARM = "Wow, your heart is amazing! It's a super pump that keeps you going, friend!"


@pytest.fixture
def dsp_dir(tmp_path):
    items = [{"query": q, "responses": {"academy": "a", "business": "b", "entertainment": "c", "literature": "d",
                                        "normal": "e"}}
             for q in ("What is a rainbow?", "How do plants grow?", "Why is the sky blue?")]
    d = tmp_path / "dsp"
    d.mkdir()
    with gzip.open(d / "domain_specific_preference.test.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(items, fh)
    return d


def test_metrics_move_the_right_way():
    assert metric("reading", EXPERT) - metric("reading", PLAIN) > 5
    assert metric("length", SHORT) < metric("length", PLAIN)
    assert tone_score(WARM) > 10 > 0 > tone_score("Therefore, the objective is, however, significant.")
    assert tone_score("") == 0.0
    assert repetition("a b c a b c a b c") > 0.5 and repetition(PLAIN) == 0.0 and repetition("one two") == 0.0


def test_satisfaction_arithmetic_on_hand_made_answers():
    # reading: EXPERT vs PLAIN moves up a lot; length: SHORT vs PLAIN is < 1/1.2; tone: WARM vs PLAIN up.
    assert satisfied("reading", "expert", EXPERT, PLAIN) and not satisfied("reading", "simple", EXPERT, PLAIN)
    assert satisfied("length", "concise", SHORT, PLAIN) and not satisfied("length", "detailed", SHORT, PLAIN)
    assert satisfied("tone", "warm", WARM, PLAIN) and not satisfied("tone", "formal", WARM, PLAIN)
    # The same answer as the baseline satisfies nothing: the margin must be met.
    assert not any(satisfied(d, s, PLAIN, PLAIN) for d, sides in style.SIDES.items() for s in sides)
    # Exactly the margin counts; just under it does not.
    assert satisfied("length", "detailed", "w " * 12, "w " * 10) and not satisfied("length", "detailed", "w " * 11, "w " * 10)

    u_expert = SimUser("u0", {"reading": "expert", "length": "detailed", "tone": "formal"})
    u_simple = SimUser("u1", {"reading": "simple", "length": "concise", "tone": "warm"})
    base = [PLAIN, PLAIN]
    answers = [[EXPERT, PLAIN],  # u0: p0 reading yes, length yes (longer), tone: EXPERT has formal words -> yes
               [SHORT, WARM]]    # u1: p0 reading? length yes, tone no; p1 length yes, tone yes
    got = satisfaction([u_expert, u_simple], answers, base)
    by_hand = {
        "reading": [satisfied("reading", "expert", EXPERT, PLAIN), False,
                    satisfied("reading", "simple", SHORT, PLAIN), satisfied("reading", "simple", WARM, PLAIN)],
        "length": [satisfied("length", "detailed", EXPERT, PLAIN), False, True, satisfied("length", "concise", WARM, PLAIN)],
        "tone": [satisfied("tone", "formal", EXPERT, PLAIN), False, satisfied("tone", "warm", SHORT, PLAIN), True],
    }
    for d, flags in by_hand.items():
        assert got[d] == pytest.approx(sum(flags) / 4)
    assert got["all"] == pytest.approx(sum(sum(f) for f in by_hand.values()) / 12)
    assert got["reading"] == pytest.approx(0.25 + 0.25 * by_hand["reading"][2] + 0.25 * by_hand["reading"][3])
    # The control: the same answers judged against the opposite sides.
    flipped = [SimUser(u.id, {d: style.opposite(d, s) for d, s in u.sides.items()}) for u in (u_expert, u_simple)]
    assert satisfaction([u_expert, u_simple], answers, base, against=True) == satisfaction(flipped, answers, base)
    assert satisfaction([u_expert, u_simple], answers, base, against=True)["reading"] < got["reading"]


def test_users_are_seeded_and_state_one_side_per_dimension():
    a, b = make_users(6, seed=0), make_users(6, seed=0)
    assert a == b and len({json.dumps(u.sides, sort_keys=True) for u in a}) == 6
    for u in a:
        assert set(u.sides) == {"reading", "length", "tone"} and len(u.statements()) == 3
    assert make_users(6, seed=1) != a


def test_metrics_work_offline_without_textstat():
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network disabled')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "from persona_mw.eval.style import metric, tone_score\n"
        f"print(round(metric('reading', {EXPERT!r}), 2), tone_score('Hi friend!'))\n"
        "assert 'textstat' not in sys.modules and 'nltk' not in sys.modules and 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[0]) > 12


def test_method_registry_and_extra_modules(monkeypatch):
    for name in ("none", "stated", "bpo", "rerank4", "corrector", "pipeline"):
        assert name in METHODS

    @style.method("test_echo")
    def echo(run):
        return [[p for p in run.prompts] for _ in run.users]

    try:
        assert METHODS["test_echo"] is echo
    finally:
        METHODS.pop("test_echo")
    # A missing extra module is skipped; a broken one is not hidden.
    monkeypatch.setattr(style, "EXTRA_METHOD_MODULES", ("persona_mw.eval.no_such_module",))
    style.load_methods()
    monkeypatch.setattr(style, "EXTRA_METHOD_MODULES", ("persona_mw.eval.style",))
    style.load_methods()


def test_bad_input_is_a_clean_error(dsp_dir, tmp_path, capsys):
    assert main(["eval", "style", "--data", str(tmp_path / "missing")]) == 2
    assert main(["eval", "style", "--data", str(dsp_dir), "--prompts", "2", "--users", "1",
                 "--methods", "none,nope"]) == 2
    assert "unknown eval style method" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "style", "--data", str(tmp_path / "empty")]) == 2


@pytest.mark.slow
def test_real_model_run_reports_every_metric(dsp_dir, local_backend, tmp_path):
    from persona_mw.eval.style import load_prompts

    prompts = load_prompts(dsp_dir, 2)
    assert prompts == ["What is a rainbow?", "How do plants grow?"]  # file order
    run = StyleRun(prompts, make_users(2, seed=0), max_new_tokens=16, backend=local_backend)
    try:
        metrics, answers = evaluate(run, ["none", "stated", "pipeline"])
    finally:
        run.close()
    for m in ("none", "stated", "pipeline"):
        for base in ("satisfaction", "satisfaction_reading", "satisfaction_length", "satisfaction_tone", "ppl",
                     "ppl_personal", "against", "repetition", "seconds_per_answer", "tokens_per_second"):
            assert f"{base}:{m}" in metrics, f"{base}:{m}"
        assert all(a.strip() for row in answers[m] for a in row)
        assert 1.0 < metrics[f"ppl:{m}"] < 1000 and math.isfinite(metrics[f"ppl:{m}"])
        assert 1.0 < metrics[f"ppl_personal:{m}"] < 1000
    # Same answers, another context: the two perplexities differ.
    assert metrics["ppl_personal:none"] != metrics["ppl:none"]
    assert metrics["satisfaction:none"] == 0.0  # the baseline never moves away from itself
    assert answers["none"][0] == answers["none"][1]  # computed once per prompt
    # The pipeline went through the Middleware: the user's stated preferences reached the prompt.
    assert answers["pipeline"] != answers["none"]
