"""``persona-mw eval locomo|prefeval`` on tiny synthetic data in the real layouts (real store, real MiniLM)."""

from __future__ import annotations

import gzip
import json

import pytest

from persona_mw.cli import main
from persona_mw.eval.locomo import evidence_ids, recall
from persona_mw.plugins.preference_fit import clauses, fit_scores


def _gz(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(obj, fh)


# ------------------------------------------------------------------------------------ locomo


@pytest.fixture
def locomo_dir(tmp_path):
    conv = {
        "speaker_a": "Ana", "speaker_b": "Ben",
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": [
            {"speaker": "Ana", "dia_id": "D1:1", "text": "Hi Ben! I adopted a greyhound called Pixel last week."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "Congrats! I started learning the cello in March."},
            {"speaker": "Ana", "dia_id": "D1:3", "text": "Nice. My sister moved to Lisbon for work."},
        ],
        "session_2_date_time": "10:00 am on 2 June, 2023",
        "session_2": [
            {"speaker": "Ben", "dia_id": "D2:1", "text": "I played my first cello recital yesterday.",
             "blip_caption": "a photo of a cello on a stage"},
            {"speaker": "Ana", "dia_id": "D2:2", "text": "Pixel chewed my running shoes, sadly."},
        ],
    }
    qa = [
        {"question": "What is the name of Ana's greyhound?", "answer": "Pixel", "evidence": ["D1:1"], "category": 4},
        {"question": "Which instrument does Ben play and when was his recital?", "answer": "cello",
         "evidence": ["D1:2", "D2:1"], "category": 1},
        # one evidence id that no turn has: recall can reach at most 1/2
        {"question": "Where did Ana's sister move?", "answer": "Lisbon", "evidence": ["D1:3; D9:9"], "category": 3},
        {"question": "no evidence", "answer": "x", "evidence": [], "category": 2},
    ]
    _gz(tmp_path / "locomo" / "locomo10.json.gz", [{"sample_id": "conv-x", "conversation": conv, "qa": qa}])
    return tmp_path / "locomo"


def test_recall_by_hand():
    assert evidence_ids({"evidence": ["D1:3; D9:9", "D2:1"]}) == ["D1:3", "D9:9", "D2:1"]
    ranked = [["D2:1"], ["x"], ["D1:3", "D1:4"]]
    assert recall(["D1:3", "D2:1"], ranked, 1) == 0.5
    assert recall(["D1:3", "D2:1"], ranked, 3) == 1.0
    assert recall(["D9:9"], ranked, 3) == 0.0


def test_eval_locomo_cli(locomo_dir, tmp_path, capsys):
    # no --store: the command's default, a SQLite store of its own per run, under any PERSONA_MW_TEST_STORE
    # (--store on Postgres: test_eval_locomo_through_postgres)
    out = tmp_path / "locomo.json"
    assert main(["eval", "locomo", "--data", str(locomo_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "locomo" and res["config"]
    m = res["metrics"]
    assert m["questions"] == 3  # the question without evidence is skipped
    for suffix in ("", ":hybrid", ":bm25", ":dense"):
        for k in (5, 10, 25):
            assert f"R@{k}{suffix}" in m
        assert f"R@10/single-hop{suffix}" in m and f"R@10/multi-hop{suffix}" in m
    # Five turns in the store: the top 25 hold every turn, so recall is what provenance allows:
    # 1 for the greyhound and the cello questions, 1/2 for the sister (D9:9 does not exist).
    assert m["R@25"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-3)
    assert m["R@25/open-domain"] == pytest.approx(0.5)
    assert m["R@25:hybrid"] == pytest.approx(m["R@25"], abs=1e-3)
    assert m["R@5/single-hop:bm25"] == 1.0  # "greyhound" is in one turn only
    assert "R@10" in capsys.readouterr().out


def test_eval_locomo_through_postgres(locomo_dir, tmp_path, capsys, pg_server):
    """--store DSN: the same recall as SQLite, the store-served modes too, and the run's schema dropped."""
    import psycopg

    out = tmp_path / "pg.json"
    assert main(["eval", "locomo", "--data", str(locomo_dir), "--out", str(out), "--store", pg_server]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert m["R@25"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-3)  # as on SQLite (test above)
    for mode in ("hybrid@store", "bm25@store", "dense@store"):
        assert f"R@25:{mode}" in m
    assert m["R@5/single-hop:bm25@store"] == 1.0  # "greyhound": found by Postgres full-text too
    assert "***" in res["config"]["store"] or "@" not in res["config"]["store"]
    with psycopg.connect(pg_server) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'locomo_%'").fetchall()
    assert left == []


def test_eval_locomo_bad_input(tmp_path, locomo_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "locomo", "--data", str(tmp_path / "empty")]) == 2
    assert main(["eval", "locomo", "--data", str(locomo_dir), "--conversations", "conv-nope"]) == 2
    assert "conv-nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ prefeval

ITEMS = {
    "food": [
        ("I'm allergic to peanuts, so I avoid any dish with peanuts or peanut butter.",
         "What should I pack for a quick lunch?",
         ["Pack a turkey sandwich with an apple and some yogurt.",
          "Pack a peanut butter and jelly sandwich.",
          "Bring Thai noodles with a rich peanut sauce.",
          "Take a bag of honey roasted peanuts."]),
        ("I really dislike horror movies and prefer lighthearted comedies.",
         "Which film should we watch tonight?",
         ["Watch a lighthearted comedy about a family road trip.",
          "Watch a terrifying horror movie about a haunted house.",
          "Watch a slasher horror film with jump scares.",
          "Watch a zombie horror movie marathon."]),
    ],
    "travel": [
        ("I hate flying and would rather travel by train.",
         "How should I get from Paris to Berlin?",
         ["Take the scenic high-speed train from Paris to Berlin.",
          "Book a cheap direct flight from Paris to Berlin.",
          "Fly with a budget airline and a layover.",
          "Take a short flight on a business-class airplane."]),
    ],
}


@pytest.fixture
def prefeval_dir(tmp_path):
    root = tmp_path / "prefeval" / "benchmark_dataset"
    for topic, rows in ITEMS.items():
        _gz(root / "explicit_preference" / f"{topic}.json.gz",
            [{"preference": p, "question": q, "explanation": "-"} for p, q, _ in rows])
        _gz(root / "mcq_options" / f"{topic}.json.gz",
            [{"preference": p, "question": q, "classification_task_options": o} for p, q, o in rows])
        _gz(root / "implicit_preference" / "choice-based" / f"{topic}.json.gz", [
            {"preference": p, "question": q, "conversation": {
                "query": "Any suggestions for the weekend?",
                "assistant_options": f"1. {o[1]} 2. {o[0]}",
                "user_selection": f"I'll go with option 2. {p}",
                "assistant_acknowledgment": "Understood."}} for p, q, o in rows])
        _gz(root / "implicit_preference" / "persona-driven" / f"{topic}.json.gz", [
            {"preference": p, "question": q, "persona": "someone", "conversation": {
                "0": {"user": "Hello! I just moved to a new city.", "assistant": "Welcome! How can I help?"},
                "1": {"user": f"Good question. {p}", "assistant": "Noted, thanks for telling me."}}}
            for p, q, o in rows])
    turns = []
    for j in range(12):
        turns.append({"conversation_id": str(j), "conversation": [
            {"role": "user", "content": f"Convert this SQL query number {j} to pandas: SELECT * FROM t WHERE x > {j}"},
            {"role": "assistant", "content": f"Use df[df.x > {j}] to filter the frame."}]})
    _gz(root / "filtered_inter_turns.json.gz", turns)
    return tmp_path / "prefeval"


def test_clauses_and_lexical_fit():
    assert clauses("I have a strong aversion to online courses and prefer in-person classes.") == [
        ("avoid", "I have a strong aversion to online courses"), ("like", "prefer in-person classes.")]
    assert clauses("Trains instead of planes.") == [("like", "Trains"), ("avoid", "planes.")]
    # an avoid statement whose clauses carry no cue keeps the statement's polarity
    assert clauses("Spicy food.", "avoid") == [("avoid", "Spicy food.")]
    s = fit_scores([("I avoid peanuts.", "avoid")], ["A peanut bar", "An apple"], embeddings=False)
    assert s[1] > s[0]
    assert fit_scores([], ["a", "b"]) == [0.0, 0.0]


def test_eval_prefeval_cli(prefeval_dir, tmp_path):
    out = tmp_path / "prefeval.json"
    assert main(["eval", "prefeval", "--data", str(prefeval_dir), "--turns", "0,10", "--seed", "1",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["benchmark"] == "prefeval" and m["items"] == 3
    for form in ("explicit", "choice", "persona"):
        for n in (0, 10):
            for name in (f"acc/{form}@N{n}", f"pref_recall/{form}@N{n}", f"acc/{form}@N{n}:no_memory",
                         f"acc/{form}@N{n}:random", f"acc/{form}@N{n}:bm25_top5", f"pref_recall/{form}@N{n}:bm25_top5"):
                assert 0.0 <= m[name] <= 1.0, name
            assert m[f"pref_recall/{form}@N{n}:no_memory"] == 0.0
    # the explicit statements are pinned memories: always in the prompt, whatever N
    assert m["pref_recall/explicit@N0"] == 1.0 and m["pref_recall/explicit@N10"] == 1.0
    # blatant options: reading the preference with its polarity picks the right one every time
    assert m["acc/explicit@N0"] == 1.0 and m["acc/explicit@N10"] == 1.0
    assert m["acc/explicit@N0:random"] == 0.25
    assert m["acc/explicit@N0:no_memory"] == 0.25  # nothing to read: four-way ties, credited 1/4 each
    # the items behind a pref_recall below 1 are listed (none here for explicit)
    assert isinstance(res["recall_misses"], list)
    assert not [x for x in res["recall_misses"] if x["form"] == "explicit"]
    recall = {f"{form}@N{n}": m[f"pref_recall/{form}@N{n}"] for form in ("explicit", "choice", "persona") for n in (0, 10)}
    for key, r in recall.items():
        form, n = key.split("@N")
        missed = [x for x in res["recall_misses"] if x["form"] == form and x["turns"] == int(n)]
        assert len(missed) == round((1 - r) * m["items"]), key


def test_eval_prefeval_bad_input(prefeval_dir, tmp_path, capsys):
    assert main(["eval", "prefeval", "--data", str(prefeval_dir), "--topics", "nope"]) == 2
    assert main(["eval", "prefeval", "--data", str(prefeval_dir), "--turns", "0,500"]) == 2
    assert main(["eval", "prefeval", "--data", str(prefeval_dir), "--forms", "telepathy"]) == 2
    assert main(["eval", "prefeval", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "telepathy" in err and "fewer than" in err


def test_eval_locomo_folds(locomo_dir, tmp_path):
    """--folds K: per fold the hop setting chosen on the other folds, mean and spread of every metric."""
    out = tmp_path / "cv.json"
    assert main(["eval", "locomo", "--data", str(locomo_dir), "--out", str(out), "--folds", "3"]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["config"]["folds"] == 3 and res["unit"] == "question"  # one conversation: folds over questions
    assert len(res["folds"]) == 3 and sum(f["questions"] for f in res["folds"]) == 3
    for f in res["folds"]:
        assert f["chosen"] in res["grid"] and {"prf_k", "prf_weight", "link_weight", "speaker_weight",
                                                 "session_penalty"} <= set(f["chosen"])
        assert "R@10" in f["test"] and "R@10" in f["test_no_hops"]
    for name in ("cv/R@10", "cv/R@10:sd", "cv/R@25:no_hops", "cv/R@25:sd:no_hops"):
        assert name in m, name
    # five turns, k = 25: every fold's test question gets what provenance allows, hops or not
    assert m["cv/R@25"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-3)
    assert res["selected_on_all_dev"] in res["grid"]
    # the grid offers the focus and the list spread, after every setting without them (which win ties)
    grid = res["grid"]
    assert grid[0] == {"prf_k": 0, "prf_weight": 0.0, "link_weight": 0.0, "speaker_weight": 0.0, "session_penalty": 0.0}
    plain = [i for i, g in enumerate(grid) if not g.get("focus_weight") and not g.get("list_penalty")]
    assert plain == list(range(len(plain))) and len(plain) < len(grid)
    assert {g.get("focus_weight", 0.0) for g in grid} >= {0.0, 2.0, 4.0} and any(g.get("list_penalty") for g in grid)


def test_eval_locomo_folds_bad(locomo_dir, capsys):
    assert main(["eval", "locomo", "--data", str(locomo_dir), "--folds", "1"]) == 2
    assert "--folds" in capsys.readouterr().err


def test_fold_of_conversations_then_questions():
    from persona_mw.eval.locomo import fold_of

    assert [fold_of(c, 0, 2, 4) for c in range(4)] == [0, 1, 0, 1]  # enough conversations: by conversation
    assert {fold_of(0, q, 5, 2) for q in range(10)} == set(range(5))  # too few: questions dealt round-robin
