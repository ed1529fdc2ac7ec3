"""The profile plugin: Bradley-Terry preferences per graph node, shrunk toward groups."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from persona_mw.errors import RequestError
from persona_mw.features import style_vector
from persona_mw.text import count_syllables, flesch_kincaid_grade, style_features
from persona_mw.types import ChatRequest, Message

PIPE = """
pipeline:
  - use: profile
    features: {embedding: false, ngram_dim: 512}
    discover_groups: {discover}
"""

SHORT = ["Use a fan.", "Boil it.", "Yes, daily.", "Try tea.", "Sleep more.", "Walk it off.", "Ask a friend.",
         "Read the manual.", "Restart it.", "Drink water."]
LONG = [
    "There are several considerations here. First, think carefully about the overall context; then, "
    "step by step, weigh each option, consider the trade-offs in detail, and finally decide what fits best.",
    "A thorough answer needs background: historically, people approached this in many different ways, "
    "and each approach has advantages and disadvantages that we can examine one by one in some depth.",
    "Let me explain in detail. The mechanism involves multiple stages, and understanding every stage "
    "helps: the first prepares, the second transforms, and the third consolidates the final result.",
    "To give a complete picture, we should look at the causes, the consequences, and the alternatives, "
    "and then compare them systematically so that the recommendation is well supported by evidence.",
]


def _choice(user, chosen, rejected, **kw):
    return {"kind": "choice", "user": user, "prompt": "q", "chosen": chosen, "rejected": [rejected], **kw}


def _req(user, groups=()):
    return ChatRequest(user=user, groups=list(groups), messages=[Message(role="user", content="hi")])


def _prefers_short(mw, user, groups=()):
    from persona_mw.plugins.profile import score_texts

    mw.graph.ensure_user(_req(user, groups))
    scope, profiles = mw.graph.resolve(_req(user, groups))
    s = score_texts(scope, profiles, "q", ["Keep it short.", LONG[0]])
    return s[0] > s[1], scope


def test_style_features_are_interpretable():
    assert count_syllables("cat") == 1 and count_syllables("banana") == 3 and count_syllables("table") == 2
    easy = "The cat sat. The dog ran. We had fun."
    hard = ("Institutional considerations necessitate comprehensive reevaluation of organizational "
            "responsibilities notwithstanding contemporaneous administrative inefficiencies.")
    assert flesch_kincaid_grade(hard) > flesch_kincaid_grade(easy) + 8
    f = style_features("# Title\n\n- one\n- two\n\n```py\nx = 1\n```\nIt's great, isn't it!")
    assert f["headings"] >= 1 and f["bullet_lines"] == 2 and f["code_blocks"] == 1
    assert f["contraction_rate"] > 0 and f["exclamation_rate"] > 0
    v = style_vector(hard)
    assert v.shape == (19,) and np.all(np.abs(v) < 1)


def test_features_and_embeddings_work_offline():
    """No socket may be opened: features and the packaged MiniLM load from the wheel only."""
    code = r"""
import socket
def refuse(*a, **k):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
import numpy as np
from persona_mw.features import FeatureSpec, Featurizer
from persona_mw.embeddings import default_embedder
f = Featurizer(FeatureSpec())
X = f.transform(["Hello there, friend.", "A formal reply, therefore."])
assert X.shape == (2, f.dim) and f.dim == 19 + 4096 + 384, X.shape
e = default_embedder().embed(["Hello there, friend."])
assert abs(float(np.linalg.norm(e[0])) - 1.0) < 1e-3
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": "/tmp"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_new_user_inherits_group_then_diverges(make_mw):
    from persona_mw.plugins.profile import refit_profiles

    mw = make_mw(PIPE.replace("{discover}", "false"))
    for i in range(5):  # the team prefers short answers
        u = f"member{i}"
        mw.graph.ensure_user(_req(u, ["team"]))
        for j in range(6):
            mw.feedback(_choice(u, SHORT[(i + j) % len(SHORT)], LONG[j % len(LONG)]))
    refit_profiles(mw)
    short, scope = _prefers_short(mw, "newbie", ["team"])
    assert short and scope.granularity == "group"
    assert scope.weight_of("group:team") > 0.8
    # the same decision is what a real turn's trace reports
    assert mw.chat(user="newbie", groups=["team"], messages="hi").trace.granularity == "group"
    for j in range(25):  # the newcomer keeps choosing the long answers
        mw.feedback(_choice("newbie", LONG[j % len(LONG)], SHORT[j % len(SHORT)]))
    short, scope = _prefers_short(mw, "newbie", ["team"])
    assert not short and scope.granularity == "user"
    assert scope.evidence["user:newbie"] == 25
    trace = mw.chat(user="newbie", groups=["team"], messages="hi").trace
    assert trace.granularity == "user" and trace.evidence["user:newbie"] == 25
    prof = mw.store.get_profile("user:newbie")
    assert prof.extra["profile"]["pairs"] == 25 and len(prof.weights) == len(prof.uncertainty) == 19 + 512
    # a full refit agrees with the online updates
    refit_profiles(mw)
    short, scope = _prefers_short(mw, "newbie", ["team"])
    assert not short and scope.granularity == "user"


def test_groups_are_discovered_from_choices(make_mw):
    from persona_mw.plugins.profile import refit_profiles

    mw = make_mw(PIPE.replace("{discover}", "true"))
    for i in range(12):
        likes_short = i % 2 == 0
        for j in range(8):
            s, lg = SHORT[(i + j) % len(SHORT)], LONG[(i + j) % len(LONG)]
            mw.feedback(_choice(f"u{i}", s if likes_short else lg, lg if likes_short else s))
    summary = refit_profiles(mw)
    assert summary["groups"]["k"] >= 2
    groups = {i: [e.dst for e in mw.store.edges_from(f"user:u{i}") if e.dst.startswith("group:auto-")] for i in range(12)}
    assert all(len(g) == 1 for g in groups.values())
    for i in range(12):
        for j in range(12):
            if i % 2 != j % 2:
                assert groups[i] != groups[j]
    gid = groups[0][0]
    gprof = mw.store.get_profile(gid)
    assert gprof.weights and gprof.evidence >= 8
    # a new member of a discovered group inherits its taste
    assert _prefers_short(mw, "fresh", [gid.split(":", 1)[1]])[0]


def test_concurrent_writers_all_recorded_and_refit(make_mw):
    from persona_mw.plugins.profile import refit_profiles

    mw = make_mw(PIPE.replace("{discover}", "false"))
    errors = []

    def write(i):
        try:
            mw.feedback(_choice("busy", f"short answer {i}", LONG[i % len(LONG)]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert mw.store.count_feedback("busy") == 100
    assert mw.store.get_profile("user:busy").extra["profile"]["pairs"] == 100
    mw.rebuild("busy")
    prof = mw.store.get_profile("user:busy")
    assert prof.evidence == 100 and prof.extra["profile"]["pairs"] == 100
    refit_profiles(mw)
    prof = mw.store.get_profile("user:busy")
    assert prof.extra["profile"]["pairs"] == 100 and prof.extra["profile"]["fit"] == "batch"
    assert _prefers_short(mw, "busy")[0]


@pytest.mark.parametrize("event,field", [
    ({"kind": "choice", "user": "m", "prompt": "q", "rejected": ["b"]}, "chosen"),
    ({"kind": "choice", "user": "m", "prompt": "q", "chosen": "a", "rejected": []}, "rejected"),
    ({"kind": "rating", "user": "m", "prompt": "q", "response": "a", "rating": 7}, "rating"),
    ({"kind": "edit", "user": "m", "before": "same", "after": "same"}, "edit"),
    ({"kind": "choice", "user": "bad user!", "prompt": "q", "chosen": "a", "rejected": ["b"]}, "user"),
])
def test_malformed_feedback_names_the_field_and_stores_nothing(make_mw, event, field):
    mw = make_mw(PIPE.replace("{discover}", "false"))
    with pytest.raises(RequestError) as info:
        mw.feedback(event)
    assert field in str(info.value)
    assert mw.store.list_feedback() == []
    assert mw.store.get_profile("user:m") is None


def test_ratings_and_edits_update_the_profile(make_mw):
    mw = make_mw(PIPE.replace("{discover}", "false"))
    for j in range(6):
        mw.feedback({"kind": "rating", "user": "r", "prompt": "q", "response": LONG[j % 4], "rating": 0.0})
        mw.feedback({"kind": "rating", "user": "r", "prompt": "q", "response": SHORT[j], "rating": 1.0})
        mw.feedback({"kind": "edit", "user": "r", "before": LONG[j % 4], "after": SHORT[j]})
    mw.feedback({"kind": "rating", "user": "r", "prompt": "q", "response": "meh", "rating": 0.5})  # neutral: no pair
    assert mw.store.get_profile("user:r").extra["profile"]["pairs"] == 18
    assert _prefers_short(mw, "r")[0]


def test_profile_reward_is_registered(make_mw):
    from persona_mw.manager import PluginHost
    from persona_mw.plugins.profile import profile_reward
    from persona_mw.types import Candidate, Turn

    host = PluginHost(autoload=False)
    assert host.reward_fns["profile"] is profile_reward
    mw = make_mw(PIPE.replace("{discover}", "false"))
    for j in range(8):
        mw.feedback(_choice("rw", SHORT[j], LONG[j % 4]))
    req = _req("rw")
    mw.graph.ensure_user(req)
    turn = Turn(request=req)
    turn.scope, turn.profiles = mw.graph.resolve(req)
    scores = profile_reward(turn=turn, candidates=[Candidate(text=LONG[1]), Candidate(text="Short one.")])
    assert len(scores) == 2 and scores[1] > scores[0]
    # no fitted node in scope: neutral scores
    empty = Turn(request=_req("nobody"))
    assert profile_reward(turn=empty, candidates=[Candidate(text="a")]) == [0.0]
