"""The embedded default store: one SQLite file (WAL mode, versioned schema) behind the ``Store`` protocol.

One connection per store, serialized by a lock, so it is safe to share between threads; other
processes on the same file are handled by SQLite's busy timeout plus a retry of ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from persona_mw.errors import StoreError
from persona_mw.nodes import is_user_node_of
from persona_mw.store import Edge, Node, node_kind
from persona_mw.types import Feedback, Memory, NodeId, Profile, Trace

# Each entry upgrades the schema by one version; PRAGMA user_version records how many have run.
# Append new migrations at the end, never edit one that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE nodes (id TEXT PRIMARY KEY, kind TEXT NOT NULL, created_at REAL NOT NULL,
               meta TEXT NOT NULL DEFAULT '{}')""",
        "CREATE INDEX nodes_kind ON nodes(kind, id)",
        """CREATE TABLE edges (src TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
               dst TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
               kind TEXT NOT NULL, weight REAL NOT NULL, PRIMARY KEY (src, dst, kind))""",
        "CREATE INDEX edges_dst ON edges(dst)",
        """CREATE TABLE profiles (node TEXT PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
               data TEXT NOT NULL, updated_at REAL NOT NULL)""",
        """CREATE TABLE memories (id TEXT PRIMARY KEY,
               owner TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
               kind TEXT NOT NULL, text TEXT NOT NULL, polarity TEXT, provenance TEXT NOT NULL,
               created_at REAL NOT NULL, updated_at REAL NOT NULL, superseded_by TEXT,
               embedding BLOB, meta TEXT NOT NULL)""",
        "CREATE INDEX memories_owner ON memories(owner)",
        """CREATE TABLE feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
               user TEXT NOT NULL, context TEXT, kind TEXT NOT NULL, payload TEXT NOT NULL,
               created_at REAL NOT NULL)""",
        "CREATE INDEX feedback_user ON feedback(user, context)",
        """CREATE TABLE traces (id TEXT PRIMARY KEY, user TEXT NOT NULL, data TEXT NOT NULL,
               created_at REAL NOT NULL)""",
        "CREATE INDEX traces_user ON traces(user)",
    ),
    (
        # Durable background jobs (after-turn work): written before the job is scheduled, deleted
        # when it succeeds, so a crash leaves the pending ones for ``Middleware.resume_jobs``.
        """CREATE TABLE jobs (id TEXT PRIMARY KEY, user TEXT NOT NULL, kind TEXT NOT NULL,
               payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
               claimed_at REAL, created_at REAL NOT NULL)""",
        "CREATE INDEX jobs_user ON jobs(user)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_FEEDBACK: TypeAdapter[Feedback] = TypeAdapter(Feedback)
_NODE_ID = re.compile(r"^[A-Za-z0-9_.:@\-+]{1,300}$")
_LOCK_RETRIES = 5
_MEMORY_COLS = ("id, owner, kind, text, polarity, provenance, created_at, updated_at, superseded_by, "
                "embedding, meta")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _pack(vec: Sequence[float] | None) -> bytes | None:
    return None if vec is None else array("f", vec).tobytes()


def _unpack(blob: bytes | None) -> list[float] | None:
    if blob is None:
        return None
    out = array("f")
    out.frombytes(blob)
    return out.tolist()


def _validate_node_id(node_id: NodeId) -> str:
    try:
        kind = node_kind(node_id)
    except ValueError as exc:
        raise StoreError(str(exc), hint="node ids look like 'user:ana' or 'user:ana@context:coding'") from exc
    if not _NODE_ID.match(node_id):  # the parts were checked exactly by node_kind (no ':' inside one)
        raise StoreError(f"not a node id: {node_id!r} (longer than 300 characters)")
    return kind


class SQLiteStore:
    """``Store`` on one SQLite file (or ``:memory:``). Thread-safe; every method is one short transaction."""

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        if path != ":memory:":
            file = Path(path).expanduser()
            file.parent.mkdir(parents=True, exist_ok=True)
            self.path = str(file)
        self._lock = threading.RLock()
        self.max_memories_per_owner: int | None = None  # set by the Middleware from limits.max_memories_per_user
        # set by the Middleware from privacy.redact: memory text is redacted before it is written
        self.redact_text: Any = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so writes take the lock up front.
            conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store at {self.path!r}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn: sqlite3.Connection | None = conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten, so a forgotten user's text is not left in free pages.
            conn.execute("PRAGMA secure_delete = ON")
            self._migrate()
        except BaseException:
            self.close()
            raise

    # plumbing ------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._tx() as cur:  # BEGIN IMMEDIATE: two processes never run the same migration
            version = int(cur.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path!r} has schema version {version}, newer than this persona-mw "
                    f"understands ({SCHEMA_VERSION})",
                    hint="upgrade persona-mw, or point it at another store file")
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    cur.execute(statement)
            if version != SCHEMA_VERSION:
                cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path!r} is closed")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """A write transaction holding the write lock from the start; rolled back on any error."""
        with self._lock:
            conn = self._connection()
            for attempt in range(_LOCK_RETRIES):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    # Another process held the lock longer than busy_timeout: back off and retry.
                    if not _is_busy(exc) or attempt == _LOCK_RETRIES - 1:
                        raise StoreError(f"cannot write to {self.path!r}: {exc}") from exc
                    time.sleep(0.05 * 2**attempt)
            try:
                yield conn.cursor()
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"write to {self.path!r} failed: {exc}") from exc
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"read from {self.path!r} failed: {exc}") from exc

    @staticmethod
    def _insert_node(cur: sqlite3.Cursor, node_id: NodeId, meta: dict[str, Any] | None = None) -> None:
        kind = _validate_node_id(node_id)
        cur.execute("INSERT OR IGNORE INTO nodes (id, kind, created_at, meta) VALUES (?, ?, ?, ?)",
                    (node_id, kind, time.time(), json.dumps(meta or {})))

    # nodes and edges -----------------------------------------------------------------------
    def ensure_node(self, node_id: NodeId, meta: dict[str, Any] | None = None) -> Node:
        """Create the node if missing (``meta`` is used only then) and return it."""
        with self._tx() as cur:
            self._insert_node(cur, node_id, meta)
        node = self.get_node(node_id)
        assert node is not None
        return node

    def get_node(self, node_id: NodeId) -> Node | None:
        rows = self._query("SELECT id, kind, created_at, meta FROM nodes WHERE id = ?", (node_id,))
        return _node(rows[0]) if rows else None

    def list_nodes(self, kind: str | None = None, limit: int = 1000, offset: int = 0) -> list[Node]:
        rows = self._query(
            "SELECT id, kind, created_at, meta FROM nodes WHERE ?1 IS NULL OR kind = ?1 "
            "ORDER BY id LIMIT ?2 OFFSET ?3", (kind, limit, offset))
        return [_node(r) for r in rows]

    def add_edge(self, edge: Edge) -> None:
        with self._tx() as cur:
            self._insert_node(cur, edge.src)
            self._insert_node(cur, edge.dst)
            cur.execute("INSERT INTO edges (src, dst, kind, weight) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (src, dst, kind) DO UPDATE SET weight = excluded.weight",
                        (edge.src, edge.dst, edge.kind, edge.weight))

    def remove_edge(self, src: NodeId, dst: NodeId, kind: str = "member") -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM edges WHERE src = ? AND dst = ? AND kind = ?", (src, dst, kind))

    def edges_from(self, node_id: NodeId) -> list[Edge]:
        rows = self._query("SELECT src, dst, kind, weight FROM edges WHERE src = ? ORDER BY dst, kind",
                           (node_id,))
        return [Edge(src=r["src"], dst=r["dst"], kind=r["kind"], weight=r["weight"]) for r in rows]

    def edges_to(self, node_id: NodeId, limit: int = 10000) -> list[Edge]:
        rows = self._query("SELECT src, dst, kind, weight FROM edges WHERE dst = ? ORDER BY src, kind "
                           "LIMIT ?", (node_id, limit))
        return [Edge(src=r["src"], dst=r["dst"], kind=r["kind"], weight=r["weight"]) for r in rows]

    # profiles ------------------------------------------------------------------------------
    def get_profile(self, node_id: NodeId) -> Profile | None:
        rows = self._query("SELECT data FROM profiles WHERE node = ?", (node_id,))
        return Profile.model_validate_json(rows[0]["data"]) if rows else None

    def get_profiles(self, node_ids: Iterable[NodeId]) -> dict[NodeId, Profile]:
        # One query whatever the number of ids: they travel as one JSON array parameter.
        rows = self._query("SELECT node, data FROM profiles WHERE node IN (SELECT value FROM json_each(?))",
                           (json.dumps(list(node_ids)),))
        return {r["node"]: Profile.model_validate_json(r["data"]) for r in rows}

    def put_profile(self, profile: Profile) -> None:
        with self._tx() as cur:
            self._insert_node(cur, profile.node)
            cur.execute("INSERT INTO profiles (node, data, updated_at) VALUES (?, ?, ?) ON CONFLICT (node) "
                        "DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
                        (profile.node, profile.model_dump_json(), profile.updated_at))

    # memories ------------------------------------------------------------------------------
    def _redacted(self, memory: Memory) -> Memory:
        if self.redact_text is None:
            return memory
        redact = self.redact_text

        def walk(v: Any) -> Any:  # meta holds free text too: index text, speaker, date text
            if isinstance(v, str):
                return redact(v)
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v

        update = {"text": redact(memory.text), "meta": walk(memory.meta),
                  "provenance": [redact(p) for p in memory.provenance]}  # message ids are free text
        update = {k: v for k, v in update.items() if v != getattr(memory, k)}
        return memory.model_copy(update=update) if update else memory

    def add_memory(self, memory: Memory) -> None:
        memory = self._redacted(memory)
        with self._tx() as cur:
            self._insert_node(cur, memory.owner)
            if cur.execute("SELECT 1 FROM memories WHERE id = ?", (memory.id,)).fetchone():
                raise StoreError(f"memory {memory.id!r} already exists", hint="use update_memory")
            cur.execute(f"INSERT INTO memories ({_MEMORY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        _memory_row(memory))
            cap = self.max_memories_per_owner
            if cap is not None:
                # Over the cap the oldest go, facts and episodes before preferences (limits.max_memories_per_user).
                n = cur.execute("SELECT COUNT(*) FROM memories WHERE owner = ?", (memory.owner,)).fetchone()[0]
                if n > cap:
                    cur.execute("DELETE FROM memories WHERE id IN (SELECT id FROM memories WHERE owner = ? AND id != ? "
                                "ORDER BY kind = 'preference', created_at, id LIMIT ?)",
                                (memory.owner, memory.id, n - cap))

    def update_memory(self, memory: Memory) -> None:
        memory = self._redacted(memory)
        with self._tx() as cur:
            self._insert_node(cur, memory.owner)
            row = _memory_row(memory)
            cur.execute("UPDATE memories SET owner = ?, kind = ?, text = ?, polarity = ?, provenance = ?, "
                        "created_at = ?, updated_at = ?, superseded_by = ?, embedding = ?, meta = ? "
                        "WHERE id = ?", (*row[1:], row[0]))
            if cur.rowcount == 0:
                raise StoreError(f"no memory {memory.id!r} to update", hint="use add_memory")

    def get_memory(self, memory_id: str) -> Memory | None:
        rows = self._query(f"SELECT {_MEMORY_COLS} FROM memories WHERE id = ?", (memory_id,))
        return _memory(rows[0]) if rows else None

    def list_memories(self, owner: NodeId, include_superseded: bool = False) -> list[Memory]:
        rows = self._query(f"SELECT {_MEMORY_COLS} FROM memories WHERE owner = ? "
                           "AND (? OR superseded_by IS NULL) ORDER BY created_at, id",
                           (owner, include_superseded))
        return [_memory(r) for r in rows]

    def delete_memory(self, memory_id: str) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            return cur.rowcount > 0

    # feedback events (append-only) ---------------------------------------------------------
    def append_feedback(self, event: Feedback) -> int:
        """Append one event and return its sequence number; an id already stored is refused."""
        with self._tx() as cur:
            # Ids are unique per user: the row key is "<user>/<id>" ('/' is in no user id), so another
            # user's id is accepted as a fresh one and a conflict never confirms someone else's event.
            # (Rows written before kept the bare id: matched too, for the same user only.)
            key = f"{event.user}/{event.id}"
            if cur.execute("SELECT 1 FROM feedback WHERE user = ? AND id IN (?, ?)",
                           (event.user, key, event.id)).fetchone():
                raise StoreError(f"duplicate feedback event id {event.id!r}: events are append-only",
                                 hint="give each event a fresh id (the default does)")
            cur.execute("INSERT INTO feedback (id, user, context, kind, payload, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (key, event.user, event.context, event.kind, event.model_dump_json(),
                         event.created_at))
            seq = cur.lastrowid
        assert seq is not None
        return seq

    def list_feedback(self, user: str | None = None, kinds: Iterable[str] | None = None,
                      since_seq: int = 0, limit: int | None = None) -> list[Feedback]:
        """Events with ``seq > since_seq``, oldest first."""
        kinds_json = None if kinds is None else json.dumps(list(kinds))
        rows = self._query(
            "SELECT payload FROM feedback WHERE seq > ?1 AND (?2 IS NULL OR user = ?2) "
            "AND (?3 IS NULL OR kind IN (SELECT value FROM json_each(?3))) ORDER BY seq LIMIT ?4",
            (since_seq, user, kinds_json, -1 if limit is None else limit))
        return [_FEEDBACK.validate_json(r["payload"]) for r in rows]

    def count_feedback(self, user: str, context: str | None = None) -> int:
        """Events from ``user``; with ``context``, only those given in that context."""
        rows = self._query("SELECT COUNT(*) AS n FROM feedback WHERE user = ?1 AND (?2 IS NULL OR context = ?2)",
                           (user, context))
        return int(rows[0]["n"])

    # traces --------------------------------------------------------------------------------
    def save_trace(self, trace: Trace) -> None:
        """Insert or replace the trace with this id (a turn may save its trace more than once)."""
        with self._tx() as cur:
            cur.execute("INSERT INTO traces (id, user, data, created_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET user = excluded.user, data = excluded.data",
                        (trace.id, trace.user, trace.model_dump_json(), time.time()))

    def get_trace(self, trace_id: str) -> Trace | None:
        rows = self._query("SELECT data FROM traces WHERE id = ?", (trace_id,))
        return Trace.model_validate_json(rows[0]["data"]) if rows else None

    # durable background jobs -----------------------------------------------------------------
    def add_job(self, job_id: str, user: str, kind: str, payload: dict[str, Any]) -> None:
        """Record a job as pending and claimed by this process (``claimed_at`` = now)."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("INSERT INTO jobs (id, user, kind, payload, attempts, claimed_at, created_at) "
                        "VALUES (?, ?, ?, ?, 0, ?, ?)", (job_id, user, kind, json.dumps(payload), now, now))

    def finish_job(self, job_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def fail_job(self, job_id: str, error: str) -> int:
        """Count a failed attempt and release the claim; returns the attempts so far."""
        with self._tx() as cur:
            cur.execute("UPDATE jobs SET attempts = attempts + 1, last_error = ?, claimed_at = NULL WHERE id = ?",
                        (error[:2000], job_id))
            row = cur.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return int(row[0]) if row else 0

    def claim_jobs(self, stale_after_s: float, max_attempts: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Claim pending jobs nobody holds (or whose claim is older than ``stale_after_s``)."""
        now = time.time()
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT id, user, kind, payload, attempts FROM jobs WHERE attempts < ? AND "
                "(claimed_at IS NULL OR claimed_at <= ?) ORDER BY created_at LIMIT ?",
                (max_attempts, now - stale_after_s, limit)).fetchall()
            cur.executemany("UPDATE jobs SET claimed_at = ? WHERE id = ?", [(now, r["id"]) for r in rows])
        return [{"id": r["id"], "user": r["user"], "kind": r["kind"], "payload": json.loads(r["payload"]),
                 "attempts": r["attempts"]} for r in rows]

    def list_jobs(self, user: str | None = None) -> list[dict[str, Any]]:
        rows = self._query("SELECT id, user, kind, payload, attempts, last_error, claimed_at, created_at FROM jobs "
                           "WHERE ?1 IS NULL OR user = ?1 ORDER BY created_at, id", (user,))
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]

    # per-user export and delete ------------------------------------------------------------
    @staticmethod
    def _user_nodes_sql() -> str:
        # substr comparison instead of LIKE/GLOB: user ids may contain '_' and other wildcards.
        return "SELECT id FROM nodes WHERE id = ?1 OR substr(id, 1, length(?2)) = ?2"

    @staticmethod
    def _user_params(user: str) -> tuple[str, str]:
        return f"user:{user}", f"user:{user}@context:"

    def list_user_nodes(self, user: str) -> list[NodeId]:
        """The user's own nodes (``user:<user>`` and each ``user:<user>@context:<c>``), matched exactly.

        ``user:ana@evil@context:x`` belongs to user ``ana@evil``, not to ``ana`` (``persona_mw.nodes``).
        """
        rows = self._query(f"SELECT id FROM nodes WHERE id IN ({self._user_nodes_sql()}) ORDER BY id",
                           self._user_params(user))
        return [r["id"] for r in rows if is_user_node_of(r["id"], user)]

    def prune_node(self, node_id: NodeId) -> bool:
        """Delete a group/context node that nothing holds any more: no edge to or from it, no memory,
        no stated preference in its profile. Returns whether it was deleted (in one transaction)."""
        if node_kind(node_id) not in ("group", "context"):
            return False
        with self._tx() as cur:
            if cur.execute("SELECT 1 FROM edges WHERE src = ?1 OR dst = ?1 LIMIT 1", (node_id,)).fetchone():
                return False
            if cur.execute("SELECT 1 FROM memories WHERE owner = ? LIMIT 1", (node_id,)).fetchone():
                return False
            row = cur.execute("SELECT data FROM profiles WHERE node = ?", (node_id,)).fetchone()
            if row is not None and json.loads(row["data"]).get("stated"):
                return False
            cur.execute("DELETE FROM profiles WHERE node = ?", (node_id,))
            cur.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
            return cur.rowcount > 0

    def has_user(self, user: str) -> bool:
        rows = self._query("SELECT EXISTS (SELECT 1 FROM nodes WHERE id = ?) "
                           "OR EXISTS (SELECT 1 FROM feedback WHERE user = ?) AS found",
                           (f"user:{user}", user))
        return bool(rows[0]["found"])

    def export_user(self, user: str) -> dict[str, Any]:
        """Everything stored about ``user`` as JSON-serializable data (embeddings as lists)."""
        with self._lock:  # one consistent snapshot
            p = self._user_params(user)
            sub = self._user_nodes_sql()
            nodes = self._query(f"SELECT id, kind, created_at, meta FROM nodes WHERE id IN ({sub}) ORDER BY id", p)
            edges = self._query(f"SELECT src, dst, kind, weight FROM edges WHERE src IN ({sub}) "
                                "ORDER BY src, dst, kind", p)
            profiles = self._query(f"SELECT data FROM profiles WHERE node IN ({sub}) ORDER BY node", p)
            memories = self._query(f"SELECT {_MEMORY_COLS} FROM memories WHERE owner IN ({sub}) "
                                   "ORDER BY created_at, id", p)
            feedback = self._query("SELECT payload FROM feedback WHERE user = ? ORDER BY seq", (user,))
            traces = self._query("SELECT data FROM traces WHERE user = ? ORDER BY created_at, id", (user,))
            jobs = self.list_jobs(user)
        return {
            "user": user,
            "nodes": [_node(r).model_dump(mode="json") for r in nodes],
            "edges": [dict(r) for r in edges],
            "profiles": [json.loads(r["data"]) for r in profiles],
            "memories": [_memory(r).model_dump(mode="json") for r in memories],
            "feedback": [json.loads(r["payload"]) for r in feedback],
            "traces": [json.loads(r["data"]) for r in traces],
            "jobs": jobs,
        }

    def forget_user(self, user: str) -> dict[str, int]:
        """Delete every row derived from ``user`` in one transaction; return rows deleted per table."""
        p = self._user_params(user)
        sub = self._user_nodes_sql()
        counts: dict[str, int] = {}
        with self._tx() as cur:
            # Children first, so the counts are exact rather than hidden in ON DELETE CASCADE.
            for table, where, params in (
                ("edges", f"src IN ({sub}) OR dst IN ({sub})", p),
                ("profiles", f"node IN ({sub})", p),
                ("memories", f"owner IN ({sub})", p),
                ("nodes", f"id IN ({sub})", p),
                ("feedback", "user = ?1", (user,)),
                ("traces", "user = ?1", (user,)),
                ("jobs", "user = ?1", (user,)),
            ):
                cur.execute(f"DELETE FROM {table} WHERE {where}", params)
                counts[table] = cur.rowcount
        self.checkpoint()
        return counts

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (deleted rows leave no copy in the log)."""
        if self.path == ":memory:":
            return
        with self._lock:
            try:
                self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"checkpoint of {self.path!r} failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


def _node(row: sqlite3.Row) -> Node:
    return Node(id=row["id"], kind=row["kind"], created_at=row["created_at"], meta=json.loads(row["meta"]))


def _memory_row(m: Memory) -> tuple[Any, ...]:
    return (m.id, m.owner, m.kind, m.text, m.polarity, json.dumps(m.provenance), m.created_at, m.updated_at,
            m.superseded_by, _pack(m.embedding), json.dumps(m.meta))


def _memory(row: sqlite3.Row) -> Memory:
    return Memory(id=row["id"], owner=row["owner"], kind=row["kind"], text=row["text"],
                  polarity=row["polarity"], provenance=json.loads(row["provenance"]),
                  created_at=row["created_at"], updated_at=row["updated_at"],
                  superseded_by=row["superseded_by"], embedding=_unpack(row["embedding"]),
                  meta=json.loads(row["meta"]))


__all__ = ["SCHEMA_VERSION", "SQLiteStore"]
