"""Forget and export: everything stored about a user is exported as JSON, then deleted everywhere —
events, memories, vectors, profiles, graph node and edges, prompts, steering state, traces, jobs —
and the groups they belonged to are recomputed without them. The SQLite file itself is inspected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from persona_mw import UnknownUserError
from persona_mw.types import Memory
from persona_mw.plugins.profile import EXTRA_KEY, refit_profiles

from tests.conftest import store_bytes, store_cells, store_tables

CONFIG = """
pipeline:
  - use: stated
  - use: profile
    features: {embedding: false, ngram_dim: 128, char_ngrams: null}
    discover_groups: false
graph:
  groups:
    team: {stated: ["Team rule: cite sources"], members: [ana, bob, cy]}
    solo: {members: [ana]}
"""


def secret(tag: str) -> str:
    return f"qx{tag}zz"  # unique strings to grep the database file for


def populate(mw: Any, user: str) -> list[str]:
    """Every kind of thing persona-mw keeps about a user; returns the unique strings used."""
    s = [secret(f"{user}{i}") for i in range(9)]
    mw.feedback(kind="stated", user=user, text=f"I like {s[0]} style")
    mw.feedback(kind="stated", user=user, context="work", text=f"At work: {s[1]}")
    for i in range(3):
        mw.feedback(kind="choice", user=user, prompt=f"q{i} {s[2]}", chosen=f"short answer {s[3]} number {i}",
                    rejected=[f"a much longer and more verbose answer {s[4]} number {i} with detail"])
    mw.feedback(kind="edit", user=user, prompt="q", before=f"before {s[5]}", after=f"after {s[5]} fixed")
    mw.chat(user=user, messages=f"hello {s[6]}")
    mw.update_profile(f"user:{user}", lambda p: (setattr(p, "prompt", f"You help {s[7]}"),
                                                 p.extra.update({"steering": {"vector": [0.1, 0.2], "note": s[7]}})))
    mw.store.add_memory(Memory(owner=f"user:{user}", text=f"has a cat named {s[8]}", embedding=[0.5, 0.25]))
    mw.store.add_job(f"job-{user}", user, "after_turn", {"request": {"note": s[6]}})
    return s


def all_cells(url: str) -> list[tuple[str, str]]:
    assert {"nodes", "edges", "profiles", "memories", "feedback", "traces", "jobs"} <= set(store_tables(url))
    return store_cells(url)


def test_export_then_forget_leaves_nothing(make_mw: Any, tmp_path: Path, store_url) -> None:
    db = store_url()
    mw = make_mw(CONFIG, db=db)
    ana = populate(mw, "ana")
    populate(mw, "bob")
    populate(mw, "cy")
    refit_profiles(mw)
    team_before = mw.store.get_profile("group:team").weights
    assert mw.store.get_profile("group:solo").extra.get(EXTRA_KEY)  # pooled from ana alone

    exported = mw.export_user("ana")
    text = json.dumps(exported)  # JSON all the way down
    for part in ("nodes", "edges", "profiles", "memories", "feedback", "traces", "jobs"):
        assert exported[part], f"export lacks {part}"
    for s in ana:
        assert s in text, f"export lacks {s}"
    assert {e["dst"] for e in exported["edges"]} >= {"group:team", "group:solo"}

    counts = mw.forget("ana")
    assert counts["feedback"] == 6 and counts["memories"] == 1 and counts["jobs"] == 1 and counts["traces"] >= 1
    with pytest.raises(UnknownUserError):
        mw.export_user("ana")
    # group statistics recomputed without ana: the same as a fresh refit over what is left
    team_after = mw.store.get_profile("group:team").weights
    assert team_after != team_before
    refit_profiles(mw)
    assert mw.store.get_profile("group:team").weights == pytest.approx(team_after)
    solo = mw.store.get_profile("group:solo")
    assert solo is None or (not solo.weights and EXTRA_KEY not in solo.extra)
    # the others are untouched and still personalized
    assert "qxbob0zz" in mw.chat(user="bob", messages="hi").text
    mw.close()

    cells = all_cells(db)
    for table, cell in cells:
        assert not any(s in cell for s in ana), f"{table} still holds ana's data: {cell[:120]}"
        assert cell != "ana" and not cell.startswith("user:ana"), f"{table} still names ana: {cell[:120]}"
    # and not in the file's free pages or the write-ahead log either (secure_delete + checkpoint); on
    # Postgres store_bytes is every cell again (dead row versions are VACUUM's, not readable through SQL)
    raw = store_bytes(db)
    for s in ana:
        assert s.encode() not in raw, f"{s} is still in the database file"
    assert b"qxbob0zz" in raw  # the grep itself works


def test_forget_over_http_and_unknown_user(make_mw: Any) -> None:
    import httpx

    from persona_mw.server import create_app, serve_in_thread

    mw = make_mw(CONFIG)
    populate(mw, "ana")
    with serve_in_thread(create_app(mw)) as url:
        assert secret("ana0") in httpx.get(f"{url}/v1/users/ana").text
        r = httpx.delete(f"{url}/v1/users/ana")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert httpx.get(f"{url}/v1/users/ana").status_code == 404
        assert httpx.delete(f"{url}/v1/users/ana").status_code == 404


def test_forget_clears_memory_indexes_in_process(make_mw: Any) -> None:
    """A user who comes back under the same id after forget starts empty: no memory of the old one
    survives in the memory plugin's in-process indexes."""
    pytest.importorskip("persona_mw.plugins.memory")
    mw = make_mw("pipeline:\n  - use: memory\n    embedder: false\n    mode: bm25\n    store_turns: true\n")
    mw.chat(user="ana", messages=f"my locker code is {secret('locker')}")
    mw.drain()
    assert secret("locker") in mw.chat(user="ana", messages="what is my locker code?").text
    mw.drain()
    mw.forget("ana")
    assert secret("locker") not in mw.chat(user="ana", messages="what is my locker code?").text


def test_forget_refits_the_users_groups_without_moving_anyone_elses_membership(make_mw: Any) -> None:
    """A forget refits global and the groups the user was in from what is left, and does not run group
    discovery again (which would re-cluster every other user at each forget)."""
    mw = make_mw("pipeline:\n  - use: profile\n    features: {embedding: false, ngram_dim: 64, char_ngrams: null}\n"
                 "    min_users: 6\n    max_groups: 3\n")
    users = [f"u{i}" for i in range(8)]
    for i, user in enumerate(users):
        short = i % 2 == 0
        for j in range(3):
            long = f"a much longer, more detailed and verbose answer about topic {j} with many words"
            mw.feedback(kind="choice", user=user, prompt=f"q{j}", chosen=f"brief {j}" if short else long,
                        rejected=[long if short else f"brief {j}"])
    summary = refit_profiles(mw)
    assert summary["groups"]["k"] >= 2, summary

    def auto_groups() -> dict[str, list[str]]:
        return {u: sorted(e.dst for e in mw.store.edges_from(f"user:{u}") if e.dst.startswith("group:auto-"))
                for u in users}

    before = auto_groups()
    (group,) = before["u0"]
    pairs_before = mw.store.get_profile(group).extra[EXTRA_KEY]["pairs"]
    mw.forget("u0")
    after = auto_groups()
    assert after == {u: g for u, g in before.items() if u != "u0"} | {"u0": []}
    assert mw.store.get_profile(group).extra[EXTRA_KEY]["pairs"] == pairs_before - 3  # u0's 3 comparisons left
