"""The SQLite store on real files: round trips, schema versioning, concurrency, export and forget."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from persona_mw.errors import StoreError
from persona_mw.store import Edge, Store, open_store
from persona_mw.store.sqlite import SCHEMA_VERSION, SQLiteStore
from persona_mw.types import (
    ChoiceFeedback,
    EditFeedback,
    Memory,
    Profile,
    RatingFeedback,
    StatedFeedback,
    StatedPreference,
    Trace,
    TraceStep,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(db_path))
    yield s
    s.close()


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path))


def _count(path: Path, sql: str, *params: object) -> int:
    with _raw(path) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


def _populate(s: SQLiteStore, user: str, context: str = "coding") -> None:
    """One of every entity for ``user``."""
    un, ucn = f"user:{user}", f"user:{user}@context:{context}"
    s.add_edge(Edge(src=un, dst="group:acme", weight=0.5))
    s.add_edge(Edge(src=ucn, dst=un))
    s.add_edge(Edge(src=ucn, dst=f"context:{context}"))
    s.put_profile(Profile(node=un, weights=[0.1, 0.2], evidence=3, persona=[f"{user} likes tea"]))
    s.put_profile(Profile(node=ucn, persona=["terse"]))
    s.add_memory(Memory(owner=un, text=f"{user} lives in Lisbon", embedding=[0.5, -1.0]))
    s.add_memory(Memory(owner=ucn, text="uses Python", kind="preference", polarity="like"))
    s.append_feedback(StatedFeedback(user=user, text="short answers"))
    s.append_feedback(RatingFeedback(user=user, context=context, prompt="p", response="r", rating=0.8))
    s.save_trace(Trace(user=user, granularity="user"))


# --------------------------------------------------------------------------- round trips


def test_is_a_store(store: SQLiteStore) -> None:
    assert isinstance(store, Store)


def test_nodes_round_trip_and_idempotent(store: SQLiteStore) -> None:
    n = store.ensure_node("user:ana", {"name": "Ana"})
    assert (n.id, n.kind, n.meta) == ("user:ana", "user", {"name": "Ana"})
    again = store.ensure_node("user:ana", {"name": "other"})
    assert again == n  # INSERT OR IGNORE: the first one stays
    for node_id, kind in [("global", "global"), ("group:acme", "group"), ("context:coding", "context"),
                          ("user:ana@context:coding", "user_context")]:
        assert store.ensure_node(node_id).kind == kind
    assert store.get_node("user:nobody") is None
    assert [x.id for x in store.list_nodes("user")] == ["user:ana"]
    assert len(store.list_nodes()) == 5
    assert [x.id for x in store.list_nodes(limit=2, offset=1)] == ["global", "group:acme"]  # by id


@pytest.mark.parametrize("bad", ["ana", "user:", "", "team:x", "user:a b", "group:x@context:y", "user:x;--"])
def test_bad_node_ids_refused(store: SQLiteStore, bad: str) -> None:
    with pytest.raises(StoreError, match="node id"):
        store.ensure_node(bad)
    assert store.list_nodes() == []


def test_edges_round_trip(store: SQLiteStore) -> None:
    store.add_edge(Edge(src="user:ana", dst="group:acme", weight=0.3))
    store.add_edge(Edge(src="user:bob", dst="group:acme"))
    store.add_edge(Edge(src="user:ana", dst="group:acme", weight=0.7))  # upsert
    assert store.get_node("group:acme") is not None  # endpoints created
    assert store.edges_from("user:ana") == [Edge(src="user:ana", dst="group:acme", weight=0.7)]
    assert [e.src for e in store.edges_to("group:acme")] == ["user:ana", "user:bob"]
    assert len(store.edges_to("group:acme", limit=1)) == 1
    store.remove_edge("user:ana", "group:acme")
    assert store.edges_from("user:ana") == []


def test_profiles_round_trip(store: SQLiteStore) -> None:
    p = Profile(node="user:ana", weights=[0.25, -1.5], uncertainty=[1.0, 1.0], evidence=4,
                persona=["likes tea"], stated=[StatedPreference(text="be brief", polarity="avoid")],
                prompt="You help Ana.", extra={"plugin": {"k": [1, 2]}})
    store.put_profile(p)
    assert store.get_profile("user:ana") == p
    p2 = p.model_copy(update={"evidence": 5})
    store.put_profile(p2)
    assert store.get_profile("user:ana") == p2
    store.put_profile(Profile(node="global"))
    got = store.get_profiles(["user:ana", "global", "user:missing"])
    assert set(got) == {"user:ana", "global"} and got["user:ana"] == p2
    assert store.get_profile("user:missing") is None
    assert store.get_profiles([]) == {}


def test_memories_round_trip(store: SQLiteStore) -> None:
    m = Memory(owner="user:ana", text="lives in Lisbon", kind="fact", provenance=["msg-1"],
               embedding=[0.5, -0.25, 3.0], meta={"score": 1})
    store.add_memory(m)
    assert store.get_memory(m.id) == m  # these floats are exact in float32
    with pytest.raises(StoreError, match="already exists"):
        store.add_memory(m)
    new = Memory(owner="user:ana", text="lives in Porto", polarity="constraint")
    store.add_memory(new)
    store.update_memory(m.model_copy(update={"superseded_by": new.id}))
    assert [x.id for x in store.list_memories("user:ana")] == [new.id]
    assert {x.id for x in store.list_memories("user:ana", include_superseded=True)} == {m.id, new.id}
    assert store.get_memory(new.id).embedding is None  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="no memory"):
        store.update_memory(Memory(owner="user:ana", text="ghost"))
    assert store.delete_memory(new.id) is True
    assert store.delete_memory(new.id) is False
    assert store.get_memory(new.id) is None


def test_feedback_round_trip(store: SQLiteStore) -> None:
    events = [
        ChoiceFeedback(user="ana", context="coding", prompt="p", chosen="a", rejected=["b", "c"]),
        RatingFeedback(user="ana", prompt="p", response="r", rating=0.25, trace_id="trace-1"),
        EditFeedback(user="bob", before="x", after="y"),
        StatedFeedback(user="ana", context="coding", text="no emojis", polarity="avoid"),
    ]
    seqs = [store.append_feedback(e) for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert store.list_feedback() == events
    assert store.list_feedback(user="ana") == [events[0], events[1], events[3]]
    assert store.list_feedback(kinds=["edit", "stated"]) == [events[2], events[3]]
    assert store.list_feedback(since_seq=seqs[1]) == events[2:]
    assert store.list_feedback(user="ana", limit=1) == [events[0]]
    assert store.list_feedback(kinds=[]) == []
    assert store.count_feedback("ana") == 3
    assert store.count_feedback("ana", context="coding") == 2
    assert store.count_feedback("nobody") == 0


def test_duplicate_feedback_refused_and_nothing_changes(store: SQLiteStore, db_path: Path) -> None:
    first = StatedFeedback(id="fb-1", user="ana", text="tea")
    seq = store.append_feedback(first)
    with pytest.raises(StoreError, match="duplicate"):
        store.append_feedback(StatedFeedback(id="fb-1", user="ana", text="coffee"))
    assert store.list_feedback() == [first]
    assert _count(db_path, "SELECT COUNT(*) FROM feedback") == 1
    assert store.append_feedback(StatedFeedback(user="ana", text="more")) == seq + 1  # still writable


def test_feedback_ids_are_per_user(store: SQLiteStore) -> None:
    """Another user's id is a fresh id for eve (issue #17): no conflict confirms that ana used it."""
    store.append_feedback(StatedFeedback(id="fb-1", user="ana", text="tea"))
    store.append_feedback(StatedFeedback(id="fb-1", user="eve", text="coffee"))
    assert [e.text for e in store.list_feedback(user="eve")] == ["coffee"]
    assert [e.text for e in store.list_feedback(user="ana")] == ["tea"]
    with pytest.raises(StoreError, match="duplicate"):
        store.append_feedback(StatedFeedback(id="fb-1", user="eve", text="again"))


def test_user_nodes_are_matched_exactly(store: SQLiteStore) -> None:
    """user 'ana@evil' and its contexts are not nodes of 'ana' (issue #17: a prefix match said so)."""
    for n in ("user:ana", "user:ana@context:x", "user:ana@evil", "user:ana@evil@context:x", "user:anab"):
        store.ensure_node(n)
    assert store.list_user_nodes("ana") == ["user:ana", "user:ana@context:x"]
    assert store.list_user_nodes("ana@evil") == ["user:ana@evil", "user:ana@evil@context:x"]
    for bad in ("user:a:b", "group:a:b", "user:@x", "user:ana@context:", "group:"):
        with pytest.raises(StoreError):
            store.ensure_node(bad)


def test_traces_round_trip(store: SQLiteStore) -> None:
    t = Trace(user="ana", granularity="user", evidence={"user:ana": 2},
              steps=[TraceStep(plugin="p", hook="persona_gather", ms=1.5, changed=True)], flags=["x"])
    store.save_trace(t)
    assert store.get_trace(t.id) == t
    t.flags.append("y")
    store.save_trace(t)  # saving again replaces
    assert store.get_trace(t.id) == t
    assert store.get_trace("trace-missing") is None


def test_has_user(store: SQLiteStore) -> None:
    assert not store.has_user("ana")
    store.ensure_node("user:ana")
    store.append_feedback(StatedFeedback(user="bob", text="hi"))
    assert store.has_user("ana") and store.has_user("bob")
    assert not store.has_user("an") and not store.has_user("a%")


# --------------------------------------------------------------------------- file, schema, pragmas


def test_creates_parents_wal_and_schema_version(store: SQLiteStore, db_path: Path) -> None:
    assert db_path.exists()
    assert SCHEMA_VERSION >= 1
    with _raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"nodes", "edges", "profiles", "memories", "feedback", "traces"} <= tables


def test_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with SQLiteStore("~/pm/state.db") as s:
        s.ensure_node("global")
    assert (tmp_path / "pm" / "state.db").exists()


def test_newer_schema_refused(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    with _raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this persona-mw"):
        SQLiteStore(str(db_path))


def test_reopen_keeps_data_and_does_not_remigrate(db_path: Path) -> None:
    with SQLiteStore(str(db_path)) as s:
        _populate(s, "ana")
        before = s.export_user("ana")
    with SQLiteStore(str(db_path)) as s:
        assert s.export_user("ana") == before
        assert s.count_feedback("ana") == 2


def test_closed_store_raises(db_path: Path) -> None:
    s = SQLiteStore(str(db_path))
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.get_node("global")


def test_open_store_memory_and_url(tmp_path: Path) -> None:
    mem = open_store(":memory:")
    mem.ensure_node("user:ana")
    mem.append_feedback(StatedFeedback(user="ana", text="x"))
    assert mem.has_user("ana") and mem.count_feedback("ana") == 1
    mem.close()
    url = open_store(f"sqlite:///{tmp_path / 'u.db'}")
    url.ensure_node("global")
    url.close()
    assert (tmp_path / "u.db").exists()


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("where", ["file", ":memory:"])
def test_100_threads_lose_no_writes(db_path: Path, where: str) -> None:
    s = SQLiteStore(str(db_path) if where == "file" else ":memory:")
    errors: list[BaseException] = []
    start = threading.Barrier(100)

    def work(i: int) -> None:
        try:
            start.wait()
            for j in range(10):
                s.append_feedback(StatedFeedback(user="ana", text=f"t{i}-{j}"))
                s.get_profile("user:ana")  # interleave reads with writes
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert s.count_feedback("ana") == 1000
    assert len({e.text for e in s.list_feedback(user="ana")}) == 1000  # type: ignore[union-attr]
    s.close()
    if where == "file":
        assert _count(db_path, "SELECT COUNT(*) FROM feedback WHERE user = 'ana'") == 1000


def test_two_stores_on_one_file(db_path: Path) -> None:
    a, b = SQLiteStore(str(db_path)), SQLiteStore(str(db_path))

    def work(s: SQLiteStore, who: str) -> None:
        for j in range(50):
            s.append_feedback(StatedFeedback(user="ana", text=f"{who}{j}"))

    threads = [threading.Thread(target=work, args=(s, w)) for s, w in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.count_feedback("ana") == b.count_feedback("ana") == 100
    a.close()
    b.close()


# --------------------------------------------------------------------------- export and forget


def test_export_contains_what_was_stored(store: SQLiteStore) -> None:
    _populate(store, "ana")
    _populate(store, "ana_b")
    data = store.export_user("ana")
    json.dumps(data)  # serializable
    assert data["user"] == "ana"
    assert {n["id"] for n in data["nodes"]} == {"user:ana", "user:ana@context:coding"}
    assert {(e["src"], e["dst"]) for e in data["edges"]} == {
        ("user:ana", "group:acme"), ("user:ana@context:coding", "user:ana"),
        ("user:ana@context:coding", "context:coding")}
    assert {p["node"] for p in data["profiles"]} == {"user:ana", "user:ana@context:coding"}
    assert sorted(m["text"] for m in data["memories"]) == ["ana lives in Lisbon", "uses Python"]
    emb = next(m["embedding"] for m in data["memories"] if m["embedding"])
    assert emb == [0.5, -1.0]
    assert [f["kind"] for f in data["feedback"]] == ["stated", "rating"]
    assert all(f["user"] == "ana" for f in data["feedback"])
    assert [t["user"] for t in data["traces"]] == ["ana"]
    assert store.export_user("nobody")["nodes"] == []


def test_forget_removes_user_and_spares_lookalikes(store: SQLiteStore, db_path: Path) -> None:
    users = ["ana", "ana_b", "an_", "anna", "ana.x", "ana-"]
    for u in users:
        _populate(store, u)
    before_other = {u: store.export_user(u) for u in users if u != "ana"}
    nothing = {"edges": 0, "profiles": 0, "memories": 0, "nodes": 0, "feedback": 0, "traces": 0, "jobs": 0}
    for pattern in ["an%", "an", "a*", "an?", "ana[_]", "%"]:  # wildcards match nothing but themselves
        assert store.forget_user(pattern) == nothing, pattern

    counts = store.forget_user("ana")
    assert counts == {"edges": 3, "profiles": 2, "memories": 2, "nodes": 2, "feedback": 2, "traces": 1, "jobs": 0}
    assert not store.has_user("ana")
    assert store.export_user("ana") == {"user": "ana", "nodes": [], "edges": [], "profiles": [],
                                        "memories": [], "feedback": [], "traces": [], "jobs": []}
    for u, exported in before_other.items():
        assert store.export_user(u) == exported, u
    assert store.get_node("group:acme") is not None  # shared nodes stay
    assert store.forget_user("ana") == nothing
    store.close()

    # Check the file itself, with plain sqlite3, for anything left of "ana".
    n = _count(db_path, "SELECT COUNT(*) FROM nodes WHERE id = 'user:ana' OR id LIKE 'user:ana@%'")
    assert n == 0
    assert _count(db_path, "SELECT COUNT(*) FROM edges WHERE src IN ('user:ana', 'user:ana@context:coding') "
                           "OR dst IN ('user:ana', 'user:ana@context:coding')") == 0
    assert _count(db_path, "SELECT COUNT(*) FROM profiles WHERE node LIKE 'user:ana@%' "
                           "OR node = 'user:ana'") == 0
    assert _count(db_path, "SELECT COUNT(*) FROM memories WHERE owner LIKE 'user:ana@%' "
                           "OR owner = 'user:ana'") == 0
    assert _count(db_path, "SELECT COUNT(*) FROM memories WHERE text LIKE 'ana %'") == 0
    assert _count(db_path, "SELECT COUNT(*) FROM feedback WHERE user = 'ana'") == 0
    assert _count(db_path, "SELECT COUNT(*) FROM traces WHERE user = 'ana'") == 0
    # ...and everything of the five others is still there.
    assert _count(db_path, "SELECT COUNT(*) FROM nodes WHERE kind IN ('user', 'user_context')") == 10
    assert _count(db_path, "SELECT COUNT(*) FROM feedback") == 10
    assert _count(db_path, "SELECT COUNT(*) FROM memories") == 10
    assert _count(db_path, "SELECT COUNT(*) FROM traces") == 5


class _LockedOnce:
    """A connection whose WAL switches first answer 'database is locked', as SQLite does (at once, not
    after the busy timeout) to one of two processes opening a new store file together."""

    def __init__(self, conn: Any, fails: int) -> None:
        self._conn, self.fails, self.tries = conn, fails, 0

    def execute(self, sql: str, *args: Any) -> Any:
        if "journal_mode" in sql:
            self.tries += 1
            if self.tries <= self.fails:
                raise sqlite3.OperationalError("database is locked")
        return self._conn.execute(sql, *args)


def test_opening_a_new_store_retries_the_wal_switch_while_another_process_holds_it(tmp_path: Any) -> None:
    from persona_mw.store.sqlite import _set_wal

    raw = sqlite3.connect(str(tmp_path / "a.db"), isolation_level=None)
    conn = _LockedOnce(raw, fails=3)
    _set_wal(conn, "a.db", 5.0)  # type: ignore[arg-type]
    assert conn.tries == 4 and raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    stuck = _LockedOnce(sqlite3.connect(str(tmp_path / "b.db"), isolation_level=None), fails=10**6)
    with pytest.raises(StoreError, match="database is locked for 0.1 s"):
        _set_wal(stuck, "b.db", 0.1)  # type: ignore[arg-type]
    broken = _Broken()
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):  # not a lock: not retried
        _set_wal(broken, "a.db", 5.0)  # type: ignore[arg-type]
    assert broken.tries == 1


class _Broken:
    tries = 0

    def execute(self, sql: str, *args: Any) -> Any:
        self.tries += 1
        raise sqlite3.OperationalError("disk I/O error")
