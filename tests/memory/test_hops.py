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


def test_without_names_and_list_questions():
    from persona_mw.memory.hops import is_list_question, without_names

    assert without_names("What do Melanie's kids like?", {"melanie"}) == "What do kids like?"
    assert without_names("Did Jon and Gina both dance?", {"jon"}) == "Did and Gina both dance?"
    assert without_names("Where is Lisbon?", set()) == "Where is Lisbon?"
    for q in ("What activities does Melanie partake in?", "Which cities has Jon visited?", "Where has Ana camped?",
              "How many times has Ben gone to the beach?", "What subject have Ana and Ben both painted?",
              "What has Melanie painted?"):
        assert is_list_question(q), q
    for q in ("What did Caroline research?", "When did Ana move?", "What is Ben's job?", "Where does Ana live?"):
        assert not is_list_question(q), q


@pytest.fixture
def chat(store_url, minilm):
    """Two speakers: Ben's turns name Ana again and again, Ana's own turns say what she does."""
    store = open_store(store_url())
    m = MemoryManager(store, embedder=minilm)
    sessions = [
        ("1 May 2023", [("Ben", "Ana, you are such a good friend, Ana. Thanks Ana!", "D1:1"),
                        ("Ana", "On weekends I go rock climbing in the hills.", "D1:2")]),
        ("3 June 2023", [("Ben", "Great to see you again Ana, how is Ana doing?", "D2:1"),
                         ("Ana", "I signed up for a pottery class, it is so calming.", "D2:2")]),
        ("9 July 2023", [("Ben", "Ana! Ana, I missed you, Ana.", "D3:1"),
                         ("Ana", "We went kayaking on the river with my brother.", "D3:2")]),
    ]
    for date, turns in sessions:
        m.add_raw("c", [{"role": "user", "speaker": s, "content": t, "id": i} for s, t, i in turns], session_date=date)
    yield m
    store.close()


def test_focus_reads_the_question_without_the_speaker(chat):
    query = "What hobbies does Ana have?"
    plain = chat.search("c", query, k=2, hops={})
    assert {h.memory.provenance[0] for h in plain} == {"D1:1", "D3:1"}  # Ben's turns naming Ana crowd in
    hits = chat.search("c", query, k=2, hops={"focus_weight": 4.0})
    assert {h.memory.provenance[0] for h in hits} == {"D1:2", "D2:2"}  # what Ana does, her name in none
    assert all(h.why["focus"] > 0.5 and h.why["hop"] == 2 for h in hits)  # the trace says which hop found it
    # no speaker named: nothing to take out, the focus adds nothing (and embeds nothing)
    assert all("focus" not in h.why for h in chat.search("c", "rock climbing", k=3, hops={"focus_weight": 4.0}))


def test_list_questions_spread_over_sessions(mm):
    query = "Where do I live and listen to live music?"
    plain = mm.search("ana", query, k=3, hops={"list_penalty": 100.0})
    assert len({h.memory.meta.get("date") or h.memory.meta.get("date_text") for h in plain}) < 3  # not a list question
    listq = "What things do I live near and listen to live music?"
    spread = mm.search("ana", listq, k=3, hops={"list_penalty": 100.0})
    assert len({h.memory.meta.get("date") or h.memory.meta.get("date_text") for h in spread}) == 3


def test_first_hop_memo_gives_the_same_hits(chat):
    settings = [{}, {"focus_weight": 2.0}, {"speaker_weight": 1.0, "session_penalty": 0.1}, None]
    fresh = [[(h.memory.id, round(h.score, 9)) for h in chat.search("c", "What hobbies does Ana have?", k=4, hops=s)]
             for s in settings]
    chat.first_hop_memo = {}
    try:
        memo = [[(h.memory.id, round(h.score, 9)) for h in chat.search("c", "What hobbies does Ana have?", k=4, hops=s)]
                for s in settings]
        assert len(chat.first_hop_memo) == 1  # one first hop, searched again per setting
    finally:
        chat.first_hop_memo = None
    assert memo == fresh


def test_mmr_skips_near_duplicates(store_url, minilm):
    store = open_store(store_url())
    m = MemoryManager(store, embedder=minilm)
    for date, text, i in [("1 May 2023", "I love baking sourdough bread on Sundays.", "D1:1"),
                          ("3 June 2023", "I love baking sourdough bread on Sunday mornings.", "D2:1"),
                          ("9 July 2023", "My brother plays the violin in an orchestra.", "D3:1")]:
        m.add_raw("u", [{"role": "user", "content": text, "id": i}], session_date=date)
    try:
        plain = m.search("u", "baking bread", k=2, hops={})
        assert {h.memory.provenance[0] for h in plain} == {"D1:1", "D2:1"}
        hits = m.search("u", "baking bread", k=2, hops={"mmr": 10.0})
        assert hits[0].memory.provenance == plain[0].memory.provenance
        assert hits[1].memory.provenance == ["D3:1"] and hits[1].why["hop"] == 2  # the near-duplicate made way
        # only for list questions: this one is not, so nothing moves
        assert [h.memory.id for h in m.search("u", "baking bread", k=2, hops={"mmr": 10.0, "mmr_lists_only": True})] == [
            h.memory.id for h in plain]
    finally:
        store.close()
