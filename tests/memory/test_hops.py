"""The second hop of ``MemoryManager.search(mode="fused")`` on the real SQLite store and real MiniLM."""

from __future__ import annotations

import pytest

from persona_mw.errors import RequestError
from persona_mw.memory import MemoryManager
from persona_mw.memory.hops import DEFAULT_HOPS, HopSettings, names
from persona_mw.store import open_store

HOPS = {"prf_k": 1, "prf_weight": 0.5, "link_weight": 2.0, "session_penalty": 0.0}


@pytest.fixture(scope="module")
def minilm():
    from persona_mw.embeddings import default_embedder

    emb = default_embedder()
    emb.embed(["warm up"])
    return emb


@pytest.fixture
def mm(store_url, minilm):
    store = open_store(store_url())
    m = MemoryManager(store, embedder=minilm)
    say = [
        ("1 May 2023", [("My sister Lucia lives in Lisbon now.", "D1:1"), ("The concert was loud.", "D1:2")]),
        ("3 June 2023", [("We watched live jazz in the park where I live.", "D2:1"),
                         ("Live music is the best thing about where I live.", "D2:2"),
                         ("The band lives on the road, they said.", "D2:3")]),
        ("9 July 2023", [("Lucia bought a red bicycle last week.", "D3:1"),
                         ("The weather was rainy all week.", "D3:2")]),
    ]
    for date, turns in say:
        m.add_raw("ana", [{"role": "user", "content": t, "id": i} for t, i in turns], session_date=date)
    # another user mentions the same name: the second hop never crosses users
    m.add_raw("ben", [{"role": "user", "content": "Lucia painted my fence blue.", "id": "B1:1"}], session_date="2 May 2023")
    yield m
    store.close()


def test_names_drop_sentence_words():
    assert names("My sister Lucia lives in Lisbon. The band played; What a day") == {"lucia", "lisbon"}


def test_names_read_possessives_as_the_name():
    assert names("What do Melanie's kids like? Is it James\u2019 dog, or Chris' car?") == {"melanie", "james", "chris"}
    assert names("It's late. That's it! Let's go, Ana's here.") == {"ana"}  # sentence words stay out


def test_second_hop_finds_the_linked_memory(mm):
    query = "Where does my sister live?"
    first = mm.search("ana", query, k=3, hops={})
    assert "D3:1" not in [p for h in first for p in h.memory.provenance]  # one hop: the "live" turns crowd it out
    assert all("hop" not in h.why for h in first)
    hits = mm.search("ana", query, k=3, hops=HOPS)
    by_id = {h.memory.provenance[0]: h for h in hits}
    assert by_id["D1:1"].why["hop"] == 1  # the first hop found the sister
    assert "D3:1" in by_id and by_id["D3:1"].why["hop"] == 2  # the second hop followed her name
    assert by_id["D3:1"].why["links"] == ["lucia"]
    assert all(h.memory.owner == "user:ana" and "B1:1" not in h.memory.provenance for h in hits)


def test_session_spread(mm):
    hits = mm.search("ana", "Where do I live and listen to live music?", k=3,
                     hops={"session_penalty": 100.0})
    dates = [h.memory.meta.get("date") or h.memory.meta.get("date_text") for h in hits]
    assert len(set(dates)) == 3  # one per session, however the first hop scored them
    plain = mm.search("ana", "Where do I live and listen to live music?", k=3, hops={})
    assert len({h.memory.meta.get("date") or h.memory.meta.get("date_text") for h in plain}) < 3


def test_default_and_bad_settings(mm):
    assert not HopSettings().active and not HopSettings.of({}).active  # {}: one hop
    assert mm.hops == DEFAULT_HOPS and DEFAULT_HOPS.active  # None: the cross-validated default
    assert [h.memory.id for h in mm.search("ana", "sister", k=3)] == [
        h.memory.id for h in mm.search("ana", "sister", k=3, hops=DEFAULT_HOPS)]
    assert all("hop" in h.why for h in mm.search("ana", "sister", k=3))
    assert all("hop" not in h.why for h in mm.search("ana", "sister", k=3, hops={}))
    with pytest.raises(RequestError) as err:
        mm.search("ana", "sister", hops={"depth": 3})
    assert err.value.field == "hops" and "depth" in str(err.value)
