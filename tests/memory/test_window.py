"""mode="fused" (the default): stored turns searched alone and with their session neighbours, score fusion,
exact provenance, per user; the windows follow writes, forgets and reloads; ``WindowRetriever`` wraps it."""

from __future__ import annotations

import pytest

from persona_mw.memory import MemoryManager
from persona_mw.memory.window import WindowRetriever
from persona_mw.store import open_store


@pytest.fixture
def store(store_url):
    s = open_store(store_url())
    yield s
    s.close()


def turn(text, mid, speaker):
    return {"role": "user", "content": text, "id": mid, "speaker": speaker}


def _fill(mm):
    mm.add_raw("ana", [turn("I adopted a greyhound last week.", "D1:1", "Ana"),
                       turn("Lovely! What is the greyhound called?", "D1:2", "Ben"),
                       turn("Pixel.", "D1:3", "Ana")], session_date="8 May 2023")
    mm.add_raw("ana", [turn("The weather was grim on the coast.", "D2:1", "Ben"),
                       turn("We walked on the beach anyway.", "D2:2", "Ana")], session_date="9 June 2023")
    mm.add_raw("ben", [turn("My greyhound is called Rocket.", "X:1", "Ben")], session_date="9 June 2023")


@pytest.fixture(params=[False, True], ids=["bm25-only", "minilm"])
def emb(request):
    if not request.param:
        return None
    from persona_mw.embeddings import default_embedder

    return default_embedder()


def test_neighbours_find_a_turn_that_alone_says_little(store, emb):
    mm = MemoryManager(store, embedder=emb)
    _fill(mm)
    hits = mm.search("ana", "What is the greyhound called?", k=3)  # default mode: fused
    provs = [h.memory.provenance for h in hits]
    assert ["D1:3"] in provs                      # found through its neighbour's words
    assert all(p[0].startswith("D1:") for p in provs)  # session 2 windows do not borrow session 1 words
    assert ["X:1"] not in provs                   # another user's turn never comes back
    want = {"node", "bm25_turn", "bm25_window"} | ({"dense_turn", "dense_window"} if emb else set())
    assert set(hits[0].why) - {"hop", "prf", "links"} == want
    assert hits[0].why.get("hop") == (1 if emb else None)  # the default second hop needs the dense vectors
    assert mm.search("nobody", "greyhound") == []
    # a fresh manager (indexes loaded from the store) ranks exactly as the incrementally built one
    fresh = MemoryManager(store, embedder=emb)
    assert [(h.memory.id, round(h.score, 4)) for h in fresh.search("ana", "What is the greyhound called?", k=5)] == \
        [(h.memory.id, round(h.score, 4)) for h in mm.search("ana", "What is the greyhound called?", k=5)]
    # the old class is a thin wrapper over the same search
    assert [h.memory.id for h in WindowRetriever(mm).search("ana", "What is the greyhound called?", k=3)] == \
        [h.memory.id for h in hits]


def test_windows_follow_later_turns_and_forgets(store):
    mm = MemoryManager(store, embedder=None)
    mm.add_raw("ana", [turn("Rain all day on the coast.", "D0:1", "Ben"), turn("Sunny here.", "D0:2", "Ana")],
               session_date="1 May 2023", window=0)
    mm.add_raw("ana", [turn("What is your cat called?", "D1:1", "Ben")], session_date="8 May 2023", window=0)
    mm.add_raw("ana", [turn("Pixel.", "D1:2", "Ana")], session_date="8 May 2023", window=0)  # a later call
    first = mm.search("ana", "cat called", k=2)
    assert {h.memory.provenance[0] for h in first} == {"D1:1", "D1:2"}
    assert {h.memory.provenance[0] for h in mm.search("ana", "Rain", k=4) if h.why["bm25_window"] > 0} == \
        {"D0:1", "D0:2"}  # a window stops at the session's end: D1:1 does not borrow D0:2's neighbour
    # the reply's window has the question's words, and the question's window grew to include the reply
    # that came in a later call
    assert len(mm.bm25_window.search("user:ana", "cat called", 5)) == 2
    assert len(mm.bm25_window.search("user:ana", "Pixel", 5)) == 2
    q = next(h.memory for h in first if h.memory.provenance == ["D1:1"])
    mm.forget("ana", q.id)
    assert mm.bm25_window.search("user:ana", "cat called", 5) == []  # gone, and gone from the reply's window
    assert mm.search("ana", "Pixel", k=1)[0].memory.provenance == ["D1:2"]
    mm.forget("ana")
    assert mm.search("ana", "Pixel") == [] and mm.bm25_window.size("user:ana") == 0


def test_fused_respects_kinds_and_scope(store):
    mm = MemoryManager(store, embedder=None)
    mm.add_raw("ana", [turn("I play the cello on Sundays.", "a", "Ana")])
    mm.remember("ana", "Ana likes cello music", provenance=["p"])
    assert {h.memory.kind for h in mm.search("ana", "cello", k=5)} == {"episode", "preference"}
    assert {h.memory.kind for h in mm.search("ana", "cello", k=5, kinds=("episode",))} == {"episode"}
    assert mm.search("bob", "cello", k=5) == []
