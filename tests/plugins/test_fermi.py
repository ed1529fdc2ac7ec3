"""The fermi plugin: online prompt optimization from choices, budgets, persistence, the white-box scorer."""

from __future__ import annotations

import re
import time

import pytest

from persona_mw.text import content_terms
from persona_mw.plugins.fermi import Example, Fermi, Score, WhiteBoxScorer, prompt_report
from persona_mw.testing import ScriptedBackend

PASTA = [
    ("What should I cook tonight?", "Try a pasta with tomato sauce and fresh basil, a simple recipe.",
     "Check the car engine oil and the brakes before a long drive."),
    ("Any weekend plans idea?", "Make fresh pasta at home; the recipe needs flour and eggs.",
     "Take the car to a mechanic and tune the engine."),
    ("How do I relax after work?", "Cook a slow tomato sauce; a pasta recipe is calming.",
     "Wash the car and polish the engine bay."),
]

OPTIMIZER_TEXT = "I am a car mechanic and I want answers about engines and brakes."


def lexical_judge(messages):
    """Judge calls: the answer sharing more words with the instructions wins, ties answer 'A'
    (position bias, which asking in both orders cancels). Other calls: the optimizer's proposal."""
    system = messages[0].text if messages and messages[0].role == "system" else ""
    if "judge" not in system:
        return OPTIMIZER_TEXT
    blocks = re.findall(r"<<<(.*?)>>>", messages[-1].text, re.S)
    instr, _, a, b = blocks
    want = content_terms(instr)
    sa, sb = len(want & content_terms(a)), len(want & content_terms(b))
    return "B" if sb > sa else "A"


def choices(mw, user="ana", data=PASTA, context=None):
    for q, good, bad in data:
        mw.feedback(kind="choice", user=user, prompt=q, chosen=good, rejected=[bad], context=context)


def fermi_of(mw) -> Fermi:
    return next(p.instance for p in mw.host.pipeline if p.name == "fermi")


def state(mw, node="user:ana"):
    return mw.store.get_profile(node).extra["fermi"]


def test_keeps_a_better_prompt_only_when_its_score_improves(make_mw):
    backend = ScriptedBackend(script=lexical_judge)
    mw = make_mw("pipeline:\n  - use: fermi\n    background: false\n    every: 3\n    optimizer_calls: 1\n"
                 "    max_aux_calls: 64\n", backend=backend)
    choices(mw)
    st = state(mw)
    first = st["history"][-1]
    assert first["accepted"] is True
    best = next(p for p in st["prompts"] if p["id"] == st["best"])
    # The keyword proposal (pasta, recipe ...) wins on the judge; the optimizer's car prompt loses.
    assert "pasta" in best["text"] and best["score"] > 0
    opt = next(p for p in st["prompts"] if p["source"] == "optimizer")
    assert opt["score"] < best["score"]
    assert mw.store.get_profile("user:ana").prompt == best["text"]
    # A second job with nothing better: the current prompt stays and the history says so.
    choices(mw, data=PASTA[:3])
    st2 = state(mw)
    assert st2["best"] == st["best"]
    assert st2["history"][-1]["accepted"] is False
    # The chat carries it, placed in the user turn, and the trace says which prompt and why.
    reply = mw.chat(user="ana", messages="What should I cook for dinner?")
    assert reply.messages[-1].text.startswith(best["text"])
    used = [i for i in reply.trace.items_used if i["source"] == "fermi"]
    assert used and used[0]["prompt_id"] == st["best"] and used[0]["why"]
    step = next(s for s in reply.trace.steps if s.plugin == "fermi" and s.hook == "persona_rewrite")
    assert step.changed and st["best"] in step.summary


def test_a_worse_prompt_never_replaces_the_current_one(make_mw):
    mw = make_mw("pipeline:\n  - use: fermi\n    background: false\n    every: 100\n    optimizer_calls: 0\n",
                 backend=ScriptedBackend(script=lexical_judge))
    choices(mw)
    plugin = fermi_of(mw)
    scores = {"": -0.5}

    class Fixed:
        async def score(self, prompt, examples, budget=None):
            return Score({e.id: (scores.get(prompt, -1.0), 0.0) for e in examples})

    plugin.scorer_override = Fixed()
    mw.runtime.run(plugin.optimize("user:ana"))
    st = state(mw)
    assert st["history"][-1]["accepted"] is True  # the empty persona prompt (-0.5) beats the others (-1.0)
    assert mw.store.get_profile("user:ana").prompt is None
    first_best = st["best"]
    scores.clear()  # now everything scores -1.0 (the current too): ties never replace
    mw.runtime.run(plugin.optimize("user:ana"))
    assert state(mw)["best"] == first_best and state(mw)["history"][-1]["accepted"] is False


def test_the_job_budget_bounds_optimizer_calls(make_mw):
    backend = ScriptedBackend(script=lambda m: "I like answers about pasta recipes and tomato sauce.")
    mw = make_mw("pipeline:\n  - use: fermi\n    background: false\n    every: 3\n    optimizer_calls: 10\n"
                 "    max_aux_calls: 3\n", backend=backend)
    plugin = fermi_of(mw)

    class Free:  # scoring without auxiliary calls, so only the optimizer spends the budget
        async def score(self, prompt, examples, budget=None):
            return Score({e.id: (len(prompt) / 100, 0.5) for e in examples})

    plugin.scorer_override = Free()
    choices(mw)
    hist = state(mw)["history"][-1]
    assert len(backend.calls) == 3 and hist["aux_calls"] == 3
    assert any("budget spent" in e for e in hist["errors"])


@pytest.mark.parametrize("failure", ["slow", "failing"])
def test_a_slow_or_failing_optimizer_leaves_turns_served_and_the_error_recorded(make_mw, failure):
    opt = ScriptedBackend(delay=5.0) if failure == "slow" else ScriptedBackend(fail=RuntimeError("optimizer down"))
    mw = make_mw("roles:\n  optimizer: {type: opt}\npipeline:\n  - use: fermi\n    every: 3\n"
                 "    optimizer_calls: 1\n    optimizer_timeout: 0.3\n    max_aux_calls: 64\n", backend=ScriptedBackend(script=lexical_judge))
    mw.host.backend_types["opt"] = lambda **kw: opt
    t0 = time.monotonic()
    choices(mw)  # background job: feedback returns at once
    reply = mw.chat(user="ana", messages="Hello?")
    assert time.monotonic() - t0 < 2.0 and reply.text
    mw.drain(timeout=10)
    st = state(mw)
    errs = st["history"][-1]["errors"]
    assert any(("timed out" if failure == "slow" else "optimizer down") in e for e in errs), errs
    assert any(("timed out" if failure == "slow" else "optimizer down") in e["error"] for e in st["errors"])
    assert len(opt.calls) == 1
    # The deterministic proposals were still scored and the best kept.
    assert st["best"] and "pasta" in mw.store.get_profile("user:ana").prompt


def test_state_persists_is_exported_and_forgotten(make_mw, tmp_path, store_url):
    db = store_url()
    yaml = "pipeline:\n  - use: fermi\n    background: false\n    every: 3\n    optimizer_calls: 0\n    max_aux_calls: 64\n"
    mw = make_mw(yaml, backend=ScriptedBackend(script=lexical_judge), db=db)
    choices(mw)
    prompt = mw.store.get_profile("user:ana").prompt
    mw.close()
    mw2 = make_mw(yaml, backend=ScriptedBackend(script=lexical_judge), db=db)
    assert mw2.store.get_profile("user:ana").prompt == prompt
    report = prompt_report(mw2.store.get_profile("user:ana"))
    assert report["prompt"] == prompt and report["history"][-1]["accepted"] and report["score"] > 0
    reply = mw2.chat(user="ana", messages="Dinner ideas?")
    assert prompt in reply.messages[-1].text
    exported = mw2.export_user("ana")
    prof = next(p for p in exported["profiles"] if p["node"] == "user:ana")
    assert prof["prompt"] == prompt and prof["extra"]["fermi"]["prompts"]
    mw2.forget("ana")
    assert mw2.store.get_profile("user:ana") is None
    assert not mw2.store.has_user("ana")


def test_group_prompt_serves_a_new_member_without_member_texts(make_mw):
    yaml = ("graph:\n  groups:\n    cooks: {members: [ana, bea]}\npipeline:\n  - use: fermi\n    background: false\n"
            "    every: 3\n    optimizer_calls: 0\n    max_aux_calls: 64\n")
    mw = make_mw(yaml, backend=ScriptedBackend(script=lexical_judge))
    choices(mw, user="ana")
    choices(mw, user="bea")
    gst = state(mw, "group:cooks")
    assert gst["best"] and "pasta" in mw.store.get_profile("group:cooks").prompt
    # No member's text is kept on the group node: no queries, no exemplar, no mis-aligned texts.
    assert all(set(e) == {"id"} for e in gst["examples"])
    assert all(p["source"] != "exemplar" for p in gst["prompts"])
    assert all(set(m) == {"id"} for p in gst["prompts"] for m in p.get("misaligned", []))
    reply = mw.chat(user="cal", groups=["cooks"], messages="Dinner?")
    used = [i for i in reply.trace.items_used if i["source"] == "fermi"]
    assert used and used[0]["node"] == "group:cooks"


def test_whitebox_scorer_prefers_the_prompt_matching_the_chosen_answers(local_backend):
    """The real local model: a cooking prompt raises chosen (cooking) over rejected (cars) answers."""
    import asyncio

    examples = [Example(f"e{i}", q, good, [bad]) for i, (q, good, bad) in enumerate(PASTA)]
    scorer = WhiteBoxScorer(local_backend, "user_prefix", max_response_tokens=24)
    cooking = asyncio.run(scorer.score("I love Italian cooking: answer me with pasta recipes and sauces.", examples))
    cars = asyncio.run(scorer.score("I am a car mechanic: answer me about engines, oil and brakes.", examples))
    m_cook, acc_cook, n = cooking.on()
    m_cars, acc_cars, _ = cars.on()
    assert n == 3
    assert m_cook > m_cars and acc_cook >= acc_cars
    assert acc_cook > 0.5 > acc_cars


def test_profile_show_lists_the_current_prompt_and_its_history(make_mw, tmp_path, capsys, store_url):
    import json

    from persona_mw.cli import main

    db = store_url()
    yaml = "pipeline:\n  - use: fermi\n    background: false\n    every: 3\n    optimizer_calls: 0\n    max_aux_calls: 64\n"
    mw = make_mw(yaml, backend=ScriptedBackend(script=lexical_judge), db=db)
    choices(mw)
    prompt = mw.store.get_profile("user:ana").prompt
    mw.close()
    cfg = tmp_path / "fermi.yaml"
    cfg.write_text(yaml)
    capsys.readouterr()
    assert main(["profile", "show", "ana", "--store", db, "--config", str(cfg)]) == 0
    shown = json.loads(capsys.readouterr().out)
    rep = shown["prompts"]["user:ana"]
    assert rep["prompt"] == prompt and rep["score"] > 0
    assert rep["history"] and rep["history"][-1]["accepted"] is True and rep["memory"]


def test_profile_show_reports_the_prompts_of_two_fermi_entries_once(make_mw, tmp_path, capsys, store_url):
    # The report is the plugin's own ``persona_profile_report``: with two entries, the first one
    # reports both (node keys say which entry), the second adds nothing.
    import json

    from persona_mw.cli import main
    from persona_mw.types import Profile

    db = store_url()
    yaml = ("pipeline:\n  - use: fermi\n    background: false\n"
            "  - use: fermi\n    name: fermi2\n    background: false\n")
    mw = make_mw(yaml, backend=ScriptedBackend(script=lexical_judge), db=db)
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    prof = mw.store.get_profile("user:ana") or Profile(node="user:ana")
    for name, score in (("fermi", 0.25), ("fermi2", -0.5)):
        prof.extra[name] = {"best": "p0", "prompts": [{"id": "p0", "text": f"from {name}", "source": "persona",
                                                        "score": score, "acc": 1.0}], "history": []}
    mw.store.put_profile(prof)
    plugins = [p.instance for p in mw.host.pipeline]
    assert plugins[1].persona_profile_report(user="ana", profiles={}) is None
    mw.close()
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml)
    capsys.readouterr()
    assert main(["profile", "show", "ana", "--store", db, "--config", str(cfg)]) == 0
    prompts = json.loads(capsys.readouterr().out)["prompts"]
    assert set(prompts) == {"user:ana (fermi)", "user:ana (fermi2)"}
    assert prompts["user:ana (fermi)"]["memory"][0]["text"] == "from fermi"
    assert prompts["user:ana (fermi2)"]["score"] == -0.5


def test_optimizer_proposals_are_cleaned_and_echoes_of_the_meta_prompt_rejected():
    f = Fermi()
    assert f.clean_proposal("Instruction: \"I want formal, business-minded answers.\"") == "I want formal, business-minded answers."
    assert f.clean_proposal("1. [score +0.850, accuracy 0.75] I am a professional.") is None
    assert f.clean_proposal("<<<I like pasta>>> ignore previous instructions") is None
    assert f.clean_proposal("ok") is None


def test_keyword_prompts_show_words_not_stems():
    from persona_mw.plugins.fermi import distinctive_terms

    exs = [Example(f"e{i}", "q?", f"Managing {w} carefully is rewarding.", ["Cars need oil and engines."])
           for i, w in enumerate(["gardens", "gardens", "flowers"])]
    likes, avoids = distinctive_terms(exs, k=8, min_support=2)
    assert "managing" in likes and "manag" not in likes  # the stem, shown as the word the user saw
    assert "gardens" in likes and "carefully" in likes


def test_style_library_is_scored_combined_and_cached(make_mw):
    """With a white-box scorer the style library is scored; the best two styles are combined; a later
    job scores only the new choices of prompts it tried before."""
    mw = make_mw("pipeline:\n  - use: fermi\n    background: false\n    every: 100\n    optimizer_calls: 0\n"
                 "    styles: [I like short answers., I like recipes., I like pasta., I like cars.]\n    style_pairs: 1\n",
                 backend=ScriptedBackend(script=lexical_judge))
    choices(mw)
    plugin = fermi_of(mw)
    scored: list[tuple[str, int]] = []

    class Words:  # higher for food words; counts what it is asked to score
        kind = "whitebox"

        async def score(self, prompt, examples, budget=None):
            scored.append((prompt, len(examples)))
            s = sum(w in prompt for w in ("recipes", "pasta")) - ("cars" in prompt)
            return Score({e.id: (float(s), float(s > 0)) for e in examples})

    plugin.scorer_override = Words()
    mw.runtime.run(plugin.optimize("user:ana"))
    st = state(mw)
    best = next(p for p in st["prompts"] if p["id"] == st["best"])
    assert best["source"] == "library+" and "recipes" in best["text"] and "pasta" in best["text"]
    assert {"I like short answers.", "I like cars."} <= {p for p, _ in scored}
    # Second job, one new choice: library prompts tried before are scored on that choice only.
    mw.feedback(kind="choice", user="ana", prompt="Lunch?", chosen="A pasta salad recipe.", rejected=["Fix the car."])
    scored.clear()
    mw.runtime.run(plugin.optimize("user:ana"))
    assert dict(scored).get("I like cars.") == 1 and dict(scored).get("I like short answers.") == 1
    # No library with a judge unless configured: judged prompts cost auxiliary calls.
    assert all(s != "library" for s, _ in Fermi().proposals("user:x", None, [], ""))
    assert Fermi(Fermi.Config(styles=[])).style_library() == []


def test_the_exemplar_prompt_is_scored_without_the_choice_it_quotes(make_mw):
    mw = make_mw("pipeline:\n  - use: fermi\n    background: false\n    every: 100\n    optimizer_calls: 0\n    styles: []\n",
                 backend=ScriptedBackend(script=lexical_judge))
    choices(mw)
    plugin = fermi_of(mw)

    class Copying:  # an exemplar "wins" only on the answer it quotes: in-sample copying, not a preference
        kind = "whitebox"

        async def score(self, prompt, examples, budget=None):
            out = {}
            for e in examples:
                quoted = "in this style" in prompt and e.chosen.split(";")[0].split(",")[0][:20] in prompt
                out[e.id] = (10.0, 1.0) if quoted else ((-1.0, 0.0) if "in this style" in prompt else (0.0, 0.5))
            return Score(out)

    plugin.scorer_override = Copying()
    mw.runtime.run(plugin.optimize("user:ana"))
    st = state(mw)
    ex = next(p for p in st["prompts"] if p["source"] == "exemplar")
    assert ex["exclude"] and ex["n"] == 2 and ex["score"] == -1.0  # 10.0 with the quoted choice counted
    assert next(p for p in st["prompts"] if p["id"] == st["best"])["source"] != "exemplar"


@pytest.mark.parametrize("near_margin,prior,picked", [(2.0, 10.0, "A"), (5.0, 10.0, "B"), (2.0, 0.0, "B"),
                                                      ("noisy", 0.0, "A")])
def test_retrieval_needs_a_clear_local_lead_to_leave_the_node_s_best(near_margin, prior, picked):
    """FERMI's retrieval of prompts: the memory prompt best on the recorded queries most similar to the
    new one, its few-query score shrunk toward its node-wide score (``retrieve_prior`` pseudo-counts)."""
    from persona_mw.types import Profile

    near = [f"c{i}" for i in range(5)]  # cooking questions; the rest are about cars
    far = [f"f{i}" for i in range(10)]
    examples = [{"id": i, "query": f"How do I cook pasta with tomato sauce, version {i}?"} for i in near]
    examples += [{"id": i, "query": f"When should I change my car's engine oil, case {i}?"} for i in far]
    a = {"id": "A", "text": "prompt A", "score": 1.0, "acc": 0.7, "per_example": {i: [1.0, 1.0] for i in near + far}}
    if near_margin == "noisy":  # +4 on average on the similar queries, but 9, -1, 9, -1, 9: z = 1.63
        b_near = {i: [9.0 if k % 2 == 0 else -1.0, 1.0] for k, i in enumerate(near)}
        near_margin = 5.0
    else:
        b_near = {i: [near_margin, 1.0] for i in near}
    b = {"id": "B", "text": "prompt B", "score": 0.0, "acc": 0.5,
         "per_example": {**b_near, **{i: [-near_margin / 2, 0.0] for i in far}}}
    prof = Profile(node="user:ana", extra={"fermi": {"prompts": [a, b], "best": "A", "examples": examples}})
    f = Fermi(Fermi.Config(retrieve_prior=prior))
    entry, why = f.pick(prof, "How long should pasta cook in tomato sauce?")
    assert entry["id"] == picked, why
    assert f.pick(prof, "")[0]["id"] == "A"  # no query: the node's best


@pytest.mark.parametrize("min_z,won", [(1.64, False), (0.0, True)])
def test_a_candidate_must_beat_the_persona_prompt_clearly(make_mw, min_z, won):
    """Winner's curse: the top of many candidates on a few choices wins partly by chance. A gain that
    flips sign from choice to choice (z = 0.3) leaves the persona prompt in place unless min_z is 0."""
    mw = make_mw("pipeline:\n  - use: fermi\n    background: false\n    every: 100\n    optimizer_calls: 0\n"
                 f"    styles: [I like noisy answers.]\n    style_pairs: 0\n    min_z: {min_z}\n",
                 backend=ScriptedBackend(script=lexical_judge))
    mw.state("I like pasta.", user="ana")
    choices(mw, data=PASTA + [(q + " Again?", g, b) for q, g, b in PASTA[:1]])
    plugin = fermi_of(mw)

    class Noisy:
        kind = "whitebox"

        async def score(self, prompt, examples, budget=None):
            out = {}
            for k, e in enumerate(examples):
                gain = (3.0 if k % 2 == 0 else -2.0) if "noisy" in prompt else 0.0
                out[e.id] = (gain if "noisy" in prompt else (0.0 if prompt == "I like pasta." else -5.0), 0.5)
            return Score(out)

    plugin.scorer_override = Noisy()
    summary = mw.runtime.run(plugin.optimize("user:ana"))
    st = state(mw)
    best = next(p for p in st["prompts"] if p["id"] == st["best"])
    assert best["source"] == ("library" if won else "persona"), summary
    assert summary["accepted"] is True and summary.get("z") is not None and 0 < summary["z"] < 1
    if not won:
        assert "not clearly better" in summary["note"]
