"""The embedded default store: one SQLite file (WAL mode, versioned schema) behind the ``Store`` protocol.

One connection per store, serialized by a lock, so it is safe to share between threads; other
processes on the same file are handled by SQLite's busy timeout plus a retry of ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import TypeAdapter

from persona_mw.nodes import USER_KINDS, is_user_node_of, user_context_node, user_context_prefix, user_node, user_of
from persona_mw.errors import ForgottenError, StaleVersionError, StoreError
from persona_mw.store import COPY_TABLES, Edge, Node, current_guard, node_kind
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
    (
        # Forget epochs: a per-user counter bumped in forget's own transaction. Work started before
        # a forget carries the epoch it saw and cannot write the user's rows after it. Keyed by a
        # salted hash, so the table does not name who was forgotten.
        "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO store_meta (key, value) VALUES ('forget_salt', lower(hex(randomblob(16))))",
        "CREATE TABLE forgotten (key TEXT PRIMARY KEY, epoch INTEGER NOT NULL, forgotten_at REAL NOT NULL)",
        # Forgets whose WAL checkpoint has not succeeded yet (a reader held a snapshot, or the
        # process died between commit and checkpoint): retried in the background and at the next open.
        "CREATE TABLE scrub_pending (id INTEGER PRIMARY KEY AUTOINCREMENT, requested_at REAL NOT NULL)",
        # Job leases: which process holds a job's claim, and whether that process is alive.
        "ALTER TABLE jobs ADD COLUMN claimed_by TEXT",
        """CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
               heartbeat REAL NOT NULL)""",
        # Idempotent memory writes: a job resumed after a crash re-writing a memory is a no-op.
        "ALTER TABLE memories ADD COLUMN idem TEXT",
        "CREATE UNIQUE INDEX memories_idem ON memories(owner, idem) WHERE idem IS NOT NULL",
    ),
    (
        # Profile row versions: an optimistic update (``put_profile(expected_version=)``) is refused
        # when another writer (another process) stored a newer profile since it read.
        "ALTER TABLE profiles ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_FEEDBACK: TypeAdapter[Feedback] = TypeAdapter(Feedback)
_NODE_ID = re.compile(r"^[A-Za-z0-9_.:@\-+]{1,300}$")
_LOCK_RETRIES = 5
_MEMORY_COLS = ("id, owner, kind, text, polarity, provenance, created_at, updated_at, superseded_by, "
                "embedding, meta")


_PROCESS: tuple[int, str] | None = None
LEASE_S = 30.0  # a claim whose holder has not beaten for this long is retaken


def process_id() -> str:
    """This process as a job holder: host, pid and a random token (a restarted pid is a new holder)."""
    global _PROCESS
    pid = os.getpid()
    if _PROCESS is None or _PROCESS[0] != pid:  # re-made after a fork
        _PROCESS = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}")
    return _PROCESS[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    try:  # a killed child not reaped yet is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


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


def exact_vector_search(vecs: dict[str, np.ndarray], query: Sequence[float], k: int) -> list[tuple[str, float]]:
    """Cosine similarity of ``query`` to each vector (same dimension only), the best ``k``."""
    q = np.asarray(query, dtype=np.float32)
    ids = [i for i, v in vecs.items() if len(v) == len(q)]
    if not ids or k < 1:
        return []
    mat = np.stack([vecs[i] for i in ids])
    norms = np.linalg.norm(mat, axis=1) * (float(np.linalg.norm(q)) or 1.0)
    sims = (mat @ q) / np.where(norms > 0, norms, 1.0)
    top = np.argsort(-sims, kind="stable")[:k]
    return [(ids[i], float(sims[i])) for i in top]


def _validate_node_id(node_id: NodeId) -> str:
    try:
        kind = node_kind(node_id)
    except ValueError as exc:
        raise StoreError(str(exc), hint=f"node ids look like {user_node('ana')!r} or "
                                        f"{user_context_node('ana', 'coding')!r}") from exc
    if not _NODE_ID.match(node_id):  # the parts were checked exactly by node_kind (no ':' inside one)
        raise StoreError(f"not a node id: {node_id!r} (longer than 300 characters)")
    return kind


def _set_wal(conn: sqlite3.Connection, path: str, timeout_s: float) -> None:
    """``PRAGMA journal_mode = WAL``, retried while the file is locked. Two processes opening a new file
    at once both ask for the switch, which needs an exclusive lock; SQLite answers one of them "database
    is locked" at once, without waiting out the busy timeout (it would deadlock otherwise). Once either
    switch is done the mode is the file's, so the retry only waits for the other's to finish."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise StoreError(f"cannot open SQLite store at {path!r}: {exc} for {timeout_s:g} s",
                                 hint="another process holds the file; try again when it is done") from exc
            time.sleep(0.02)


class _SQLiteBase:
    """Connection, transactions, migrations, forget keys; each part below adds one concern (issue #14)."""

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        if path != ":memory:":
            file = Path(path).expanduser()
            file.parent.mkdir(parents=True, exist_ok=True)
            self.path = str(file)
        self._lock = threading.RLock()
        self._busy_ms = int(busy_timeout_s * 1000)
        self.max_memories_per_owner: int | None = None  # set by the Middleware from limits.max_memories_per_user
        # set by the Middleware from privacy.redact: memory text is redacted before it is written
        self.redactor: Any = None  # persona_mw.privacy.Redactor: memories written by any plugin are redacted
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
            _set_wal(conn, self.path, busy_timeout_s)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten, so a forgotten user's text is not left in free pages.
            conn.execute("PRAGMA secure_delete = ON")
            self._migrate()
            self._salt = str(self._query("SELECT value FROM store_meta WHERE key = 'forget_salt'")[0]["value"])
            # A forget committed by a process that died before its checkpoint: finish the scrub now.
            if self.pending_scrub():
                self.scrub()
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

    def _insert_node(self, cur: sqlite3.Cursor, node_id: NodeId, meta: dict[str, Any] | None = None) -> None:
        kind = _validate_node_id(node_id)
        if kind in USER_KINDS:
            self._check_forgotten(cur, user_of(node_id) or "")
        cur.execute("INSERT OR IGNORE INTO nodes (id, kind, created_at, meta) VALUES (?, ?, ?, ?)",
                    (node_id, kind, time.time(), json.dumps(meta or {})))

    # forget epochs -------------------------------------------------------------------------
    def _forget_key(self, user: str) -> str:
        return hashlib.sha256(f"{self._salt}:{user}".encode()).hexdigest()

    def user_epoch(self, user: str) -> int:
        """How many times ``user`` was forgotten: work captures it when it starts (``write_guard``)."""
        rows = self._query("SELECT epoch FROM forgotten WHERE key = ?", (self._forget_key(user),))
        return int(rows[0]["epoch"]) if rows else 0

    def _check_forgotten(self, cur: sqlite3.Cursor, user: str) -> None:
        """Inside a write transaction: refuse a write of ``user``'s rows by work that started before
        a forget of ``user`` (the guard's epoch is older than the stored one)."""
        guard = current_guard()
        if guard is None or guard[0] != user:
            return
        row = cur.execute("SELECT epoch FROM forgotten WHERE key = ?", (self._forget_key(user),)).fetchone()
        if (int(row[0]) if row else 0) != guard[1]:
            raise ForgottenError(f"user {user!r} was forgotten after this work started; write dropped",
                                 hint="work started after the forget writes normally")


    if TYPE_CHECKING:  # defined by later parts of SQLiteStore; __init__ calls them
        def pending_scrub(self) -> int: ...
        def scrub(self, attempts: int = 5) -> bool: ...
        def close(self) -> None: ...


class _SQLiteNodes(_SQLiteBase):
    # nodes and edges -----------------------------------------------------------------------
    def ensure_node(self, node_id: NodeId, meta: dict[str, Any] | None = None) -> Node:
        """Create the node if missing (``meta`` is used only then) and return it, as read in the same
        transaction (a read after the commit could find it deleted by a forget meanwhile)."""
        with self._tx() as cur:
            self._insert_node(cur, node_id, meta)
            row = cur.execute("SELECT id, kind, created_at, meta FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None:  # cannot happen inside one SQLite write transaction; kept as a clear error
            raise StoreError(f"node {node_id!r} was deleted while it was being created", hint="retry the request")
        return _node(row)

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


class _SQLiteProfiles(_SQLiteNodes):
    # profiles ------------------------------------------------------------------------------
    def get_profile(self, node_id: NodeId) -> Profile | None:
        rows = self._query("SELECT data FROM profiles WHERE node = ?", (node_id,))
        return Profile.model_validate_json(rows[0]["data"]) if rows else None

    def get_profiles(self, node_ids: Iterable[NodeId]) -> dict[NodeId, Profile]:
        # One query whatever the number of ids: they travel as one JSON array parameter.
        rows = self._query("SELECT node, data FROM profiles WHERE node IN (SELECT value FROM json_each(?))",
                           (json.dumps(list(node_ids)),))
        return {r["node"]: Profile.model_validate_json(r["data"]) for r in rows}

    def get_profile_versioned(self, node_id: NodeId) -> tuple[Profile | None, int]:
        """The profile and its row version (0: no row yet), for ``put_profile(expected_version=)``."""
        rows = self._query("SELECT data, version FROM profiles WHERE node = ?", (node_id,))
        if not rows:
            return None, 0
        return Profile.model_validate_json(rows[0]["data"]), int(rows[0]["version"])

    def put_profile(self, profile: Profile, expected_version: int | None = None) -> int:
        """Store the profile and return its new row version. With ``expected_version`` the write
        happens only if the stored version is still that one (0: no row), else ``StaleVersionError``."""
        with self._tx() as cur:
            self._insert_node(cur, profile.node)
            row = cur.execute("SELECT version FROM profiles WHERE node = ?", (profile.node,)).fetchone()
            current = int(row[0]) if row else 0
            if expected_version is not None and expected_version != current:
                raise StaleVersionError(
                    f"profile {profile.node!r} is at version {current}, not {expected_version}",
                    hint="another writer updated it: read it again and re-apply the change")
            cur.execute("INSERT INTO profiles (node, data, updated_at, version) VALUES (?, ?, ?, ?) ON CONFLICT (node) "
                        "DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at, "
                        "version = excluded.version",
                        (profile.node, profile.model_dump_json(), profile.updated_at, current + 1))
        return current + 1


class _SQLiteMemories(_SQLiteProfiles):
    # memories ------------------------------------------------------------------------------
    def _redacted(self, memory: Memory) -> Memory:
        r = self.redactor
        if r is None:
            return memory
        # meta holds free text too (index text, speaker, date text); the idempotency key is a hash,
        # kept as written; provenance message ids are free text.
        update = {"text": r.redact(memory.text),
                  "meta": {k: (v if k == "idem" else r.redact_data(v)) for k, v in memory.meta.items()},
                  "provenance": [r.redact(p) for p in memory.provenance]}
        update = {k: v for k, v in update.items() if v != getattr(memory, k)}
        return memory.model_copy(update=update) if update else memory

    def add_memory(self, memory: Memory) -> bool:
        """Insert ``memory``. With ``meta["idem"]`` (an idempotency key) a memory of the same owner
        with the same key already stored makes this a no-op returning False (a resumed job)."""
        memory = self._redacted(memory)
        idem = memory.meta.get("idem")
        with self._tx() as cur:
            self._insert_node(cur, memory.owner)
            if cur.execute("SELECT 1 FROM memories WHERE id = ?", (memory.id,)).fetchone():
                raise StoreError(f"memory {memory.id!r} already exists", hint="use update_memory")
            if idem is not None and cur.execute("SELECT 1 FROM memories WHERE owner = ? AND idem = ?",
                                                (memory.owner, str(idem))).fetchone():
                return False
            cur.execute(f"INSERT INTO memories ({_MEMORY_COLS}, idem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*_memory_row(memory), None if idem is None else str(idem)))
            cap = self.max_memories_per_owner
            if cap is not None:
                # Over the cap the oldest go, facts and episodes before preferences (limits.max_memories_per_user).
                n = cur.execute("SELECT COUNT(*) FROM memories WHERE owner = ?", (memory.owner,)).fetchone()[0]
                if n > cap:
                    cur.execute("DELETE FROM memories WHERE id IN (SELECT id FROM memories WHERE owner = ? AND id != ? "
                                "ORDER BY kind = 'preference', created_at, id LIMIT ?)",
                                (memory.owner, memory.id, n - cap))
        return True

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

    def list_memories(self, owner: NodeId, include_superseded: bool = False, *,
                      embeddings: bool = True) -> list[Memory]:
        """The owner's memories, oldest first; ``embeddings=False`` leaves the vectors out (not even read)."""
        cols = _MEMORY_COLS if embeddings else _MEMORY_COLS.replace("embedding,", "NULL AS embedding,")
        rows = self._query(f"SELECT {cols} FROM memories WHERE owner = ? "
                           "AND (? OR superseded_by IS NULL) ORDER BY created_at, id",
                           (owner, include_superseded))
        return [_memory(r) for r in rows]

    def delete_memory(self, memory_id: str) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            return cur.rowcount > 0

    def count_memories(self) -> int:
        """Every memory row of this store (all owners, superseded ones too): the metrics gauge."""
        return int(self._query("SELECT COUNT(*) FROM memories")[0][0])

    def memory_rows(self, owner: NodeId) -> tuple[list[Memory], dict[str, np.ndarray]]:
        """The owner's active memories without vectors, oldest first, and their vectors by id (read
        from the raw blobs: 100k rows load in about a second instead of building 100k float lists)."""
        rows = self._query(f"SELECT {_MEMORY_COLS} FROM memories WHERE owner = ? AND superseded_by IS NULL "
                           "ORDER BY created_at, id", (owner,))
        mems: list[Memory] = []
        vecs: dict[str, np.ndarray] = {}
        for r in rows:
            mems.append(Memory.model_construct(
                id=r["id"], owner=r["owner"], kind=r["kind"], text=r["text"], polarity=r["polarity"],
                provenance=json.loads(r["provenance"]), created_at=r["created_at"], updated_at=r["updated_at"],
                superseded_by=None, embedding=None, meta=json.loads(r["meta"])))
            if r["embedding"] is not None:
                vecs[r["id"]] = np.frombuffer(r["embedding"], dtype=np.float32)
        return mems, vecs

    def vector_search(self, owner: NodeId, query: Sequence[float], k: int,
                      kinds: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """The ``k`` active memories of ``owner`` (of ``kinds``, when given) nearest to ``query`` by
        cosine (an exact scan)."""
        mems, vecs = self.memory_rows(owner)
        if kinds is not None:
            wanted = set(kinds)
            vecs = {m.id: vecs[m.id] for m in mems if m.kind in wanted and m.id in vecs}
        return exact_vector_search(vecs, query, k)

    def text_search(self, owner: NodeId, query: str, k: int,
                    kinds: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """The ``k`` active memories of ``owner`` (of ``kinds``, when given) best matching ``query`` by
        BM25 over their index text (statistics over all the owner's memories)."""
        from persona_mw.memory.index import BM25Index

        mems, _ = self.memory_rows(owner)
        ix = BM25Index()
        ix.add(owner, [m.id for m in mems], [str(m.meta.get("index_text") or m.text) for m in mems])
        if kinds is None:
            return ix.search(owner, query, k)
        wanted = set(kinds)
        kind = {m.id: m.kind for m in mems}
        return [(i, s) for i, s in ix.search(owner, query, max(1, len(mems))) if kind[i] in wanted][:k]


class _SQLiteFeedback(_SQLiteMemories):
    # feedback events (append-only) ---------------------------------------------------------
    def _beat(self, cur: sqlite3.Cursor, now: float) -> None:
        pid = os.getpid()
        cur.execute("INSERT INTO workers (id, host, pid, heartbeat) VALUES (?, ?, ?, ?) ON CONFLICT (id) "
                    "DO UPDATE SET heartbeat = excluded.heartbeat", (process_id(), socket.gethostname(), pid, now))

    def _insert_job(self, cur: Any, now: float, job_id: str, user: str, kind: str, payload: dict[str, Any],
                    claim: bool) -> None:
        """Record a pending job inside the caller's transaction, held by this process when ``claim``."""
        self._beat(cur, now)
        cur.execute("INSERT INTO jobs (id, user, kind, payload, attempts, claimed_at, claimed_by, created_at) "
                    "VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                    (job_id, user, kind, json.dumps(payload), now if claim else None,
                     process_id() if claim else None, now))

    def append_feedback(self, event: Feedback, *, job: bool = False) -> int:
        """Append one event and return its sequence number; an id already stored is refused. ``job``:
        with its ``feedback`` job, claimed by this process (see ``FeedbackStore``)."""
        with self._tx() as cur:
            self._check_forgotten(cur, event.user)
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
            if job:
                self._insert_job(cur, time.time(), f"feedback-{seq}", event.user, "feedback", {"seq": seq}, True)
        return seq

    def feedback_log(self, user: str, since_seq: int = 0, limit: int | None = None) -> list[tuple[int, Feedback]]:
        """``user``'s events with ``seq > since_seq`` and their sequence numbers, oldest first."""
        rows = self._query("SELECT seq, payload FROM feedback WHERE user = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                           (user, since_seq, -1 if limit is None else limit))
        return [(int(r["seq"]), _FEEDBACK.validate_json(r["payload"])) for r in rows]

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
            self._check_forgotten(cur, trace.user)
            cur.execute("INSERT INTO traces (id, user, data, created_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET user = excluded.user, data = excluded.data",
                        (trace.id, trace.user, trace.model_dump_json(), time.time()))

    def get_trace(self, trace_id: str) -> Trace | None:
        rows = self._query("SELECT data FROM traces WHERE id = ?", (trace_id,))
        return Trace.model_validate_json(rows[0]["data"]) if rows else None

    def list_traces(self, user: str, limit: int = 20) -> list[Trace]:
        """The user's most recent traces, newest first (at most ``limit``)."""
        rows = self._query("SELECT data FROM traces WHERE user = ? ORDER BY created_at DESC, id DESC LIMIT ?",
                           (user, int(limit)))
        return [Trace.model_validate_json(r["data"]) for r in rows]


class _SQLiteJobs(_SQLiteFeedback):
    # durable background jobs -----------------------------------------------------------------
    def heartbeat(self) -> None:
        """Renew this process's lease on the jobs it holds (and drop holders silent for a day)."""
        now = time.time()
        with self._tx() as cur:
            self._beat(cur, now)
            cur.execute("DELETE FROM workers WHERE heartbeat < ?", (now - 86400,))

    def add_job(self, job_id: str, user: str, kind: str, payload: dict[str, Any], claim: bool = True) -> None:
        """Record a job as pending and claimed by this process (``claimed_at`` = now); ``claim=False``
        leaves it unclaimed, for any ``persona-mw worker`` to take."""
        now = time.time()
        with self._tx() as cur:
            self._check_forgotten(cur, user)
            self._insert_job(cur, now, job_id, user, kind, payload, claim)

    def finish_job(self, job_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def fail_job(self, job_id: str, error: str) -> int:
        """Count a failed attempt and release the claim; returns the attempts so far."""
        with self._tx() as cur:
            cur.execute("UPDATE jobs SET attempts = attempts + 1, last_error = ?, claimed_at = NULL, "
                        "claimed_by = NULL WHERE id = ?", (error[:2000], job_id))
            row = cur.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _holder_dead(row: sqlite3.Row, now: float, lease_s: float) -> bool:
        if row["claimed_by"] is None or row["claimed_by"] == process_id():
            return False
        if row["heartbeat"] is None or row["heartbeat"] < now - lease_s:
            return True  # never beat, pruned, or silent longer than the lease
        if row["host"] == socket.gethostname():
            # the same pid with another token is an earlier incarnation (a restarted container)
            return int(row["pid"]) == os.getpid() or not _pid_alive(int(row["pid"]))
        return False

    def claim_jobs(self, stale_after_s: float, max_attempts: int, limit: int = 1000, *,
                   exclude: Iterable[str] = (), dead_only: bool = False,
                   lease_s: float = LEASE_S, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Claim pending jobs nobody holds, whose claim is older than ``stale_after_s``, or whose
        holder is dead (its process is gone, or silent for ``lease_s``). ``dead_only``: only the
        last kind (the periodic sweep). ``exclude``: ids this process is running right now."""
        now = time.time()
        skip = set(exclude)
        wanted = None if kinds is None else set(kinds)
        with self._tx() as cur:
            self._beat(cur, now)
            rows = cur.execute(
                "SELECT j.id, j.user, j.kind, j.payload, j.attempts, j.claimed_at, j.claimed_by, w.host, w.pid, "
                "w.heartbeat FROM jobs j LEFT JOIN workers w ON w.id = j.claimed_by WHERE j.attempts < ? "
                "ORDER BY j.created_at, j.id", (max_attempts,)).fetchall()
            take = []
            for r in rows:
                if r["id"] in skip or (wanted is not None and r["kind"] not in wanted):
                    continue
                free = r["claimed_at"] is None or r["claimed_at"] <= now - stale_after_s
                if (not dead_only and free) or self._holder_dead(r, now, lease_s):
                    take.append(r)
                if len(take) >= limit:
                    break
            cur.executemany("UPDATE jobs SET claimed_at = ?, claimed_by = ? WHERE id = ?",
                            [(now, process_id(), r["id"]) for r in take])
        return [{"id": r["id"], "user": r["user"], "kind": r["kind"], "payload": json.loads(r["payload"]),
                 "attempts": r["attempts"]} for r in take]

    def list_jobs(self, user: str | None = None) -> list[dict[str, Any]]:
        rows = self._query("SELECT id, user, kind, payload, attempts, last_error, claimed_at, claimed_by, created_at "
                           "FROM jobs "
                           "WHERE ?1 IS NULL OR user = ?1 ORDER BY created_at, id", (user,))
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]


class _SQLiteUsers(_SQLiteJobs):
    # per-user export and delete ------------------------------------------------------------
    @staticmethod
    def _user_nodes_sql() -> str:
        # substr comparison instead of LIKE/GLOB: user ids may contain '_' and other wildcards.
        return "SELECT id FROM nodes WHERE id = ?1 OR substr(id, 1, length(?2)) = ?2"

    @staticmethod
    def _user_params(user: str) -> tuple[str, str]:
        return user_node(user), user_context_prefix(user)

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

    def list_users(self, query: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Users (``user:<id>`` nodes) ordered by id, those whose id contains ``query`` (case-insensitive)
        when given; each with ``id``, ``created_at`` and ``memories`` (active memories of all their nodes)."""
        q = query.lower() if query else None
        # node ids from persona_mw.nodes: user:<u> is user_node(""), + <u>; its context nodes start with
        # user_context_prefix(<u>), which is user:<u> followed by the context separator.
        start = len(user_node("")) + 1
        sep = user_context_prefix("")[len(user_node("")):]
        rows = self._query(
            "SELECT substr(n.id, ?4) AS id, n.created_at AS created_at, "
            "(SELECT COUNT(*) FROM memories m WHERE m.superseded_by IS NULL AND (m.owner = n.id "
            " OR substr(m.owner, 1, length(n.id) + length(?5)) = n.id || ?5)) AS memories "
            "FROM nodes n WHERE n.kind = 'user' AND (?1 IS NULL OR instr(lower(substr(n.id, ?4)), ?1) > 0) "
            "ORDER BY n.id LIMIT ?2 OFFSET ?3", (q, int(limit), int(offset), start, sep))
        return [dict(r) for r in rows]

    def has_user(self, user: str) -> bool:
        rows = self._query("SELECT EXISTS (SELECT 1 FROM nodes WHERE id = ?) "
                           "OR EXISTS (SELECT 1 FROM feedback WHERE user = ?) AS found",
                           (user_node(user), user))
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
            # In the same transaction: the epoch (in-flight work for the user stops writing) and the
            # pending scrub (a crash before the checkpoint below is finished at the next open).
            cur.execute("INSERT INTO forgotten (key, epoch, forgotten_at) VALUES (?, 1, ?) ON CONFLICT (key) "
                        "DO UPDATE SET epoch = epoch + 1, forgotten_at = excluded.forgotten_at",
                        (self._forget_key(user), time.time()))
            if self.path != ":memory:":
                cur.execute("INSERT INTO scrub_pending (requested_at) VALUES (?)", (time.time(),))
        self.scrub()
        return counts

    def pending_scrub(self) -> int:
        """How many forgets still wait for their WAL checkpoint (their text may still be in the files)."""
        return int(self._query("SELECT COUNT(*) AS n FROM scrub_pending")[0]["n"])

    def scrub(self, attempts: int = 5) -> bool:
        """Finish pending forgets: checkpoint the WAL into the database file and truncate it, so the
        deleted text (overwritten in place by ``secure_delete``) is left in neither file.

        Never waits on another connection: a reader holding an older snapshot (a backup, a
        replicator, a ``sqlite3`` shell) makes the checkpoint busy, and this returns False with the
        scrub still pending (retry later). True when nothing is pending any more.
        """
        rows = self._query("SELECT MAX(id) AS top FROM scrub_pending")
        top = rows[0]["top"]
        if top is None:
            return True
        if not self.checkpoint(attempts):
            return False
        with self._tx() as cur:
            cur.execute("DELETE FROM scrub_pending WHERE id <= ?", (top,))
        return True

    def checkpoint(self, attempts: int = 5) -> bool:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` that never waits on another connection (busy timeout 0
        for the call; ``attempts`` short retries, the store's lock released in between). Run on our own
        connection under its lock, so our own transactions cannot make it busy. True if the whole WAL
        was folded into the database and truncated; False if another connection prevented it."""
        if self.path == ":memory:":
            return True
        for i in range(max(1, attempts)):
            with self._lock:
                conn = self._connection()
                try:
                    conn.execute("PRAGMA busy_timeout = 0")
                    try:
                        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    finally:
                        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
                        raise StoreError(f"checkpoint of {self.path!r} failed: {exc}") from exc
                    busy = 1
                except sqlite3.Error as exc:
                    raise StoreError(f"checkpoint of {self.path!r} failed: {exc}") from exc
            if not busy:
                return True
            time.sleep(0.01 * (i + 1))
        return False


class SQLiteStore(_SQLiteUsers):
    """``Store`` on one SQLite file (or ``:memory:``). Thread-safe; every method is one short transaction."""

    # schema, tenants, copy ----------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def for_tenant(self, tenant: str) -> SQLiteStore:
        """The tenant's own store: a file beside this one (``persona.db`` -> ``persona.tenant-acme.db``)."""
        from persona_mw.tenancy import tenant_store_path

        return SQLiteStore(tenant_store_path(self.path, tenant))

    def dump_table(self, table: str) -> Iterator[dict[str, Any]]:
        """Every row of one of ``COPY_TABLES`` in the common column layout (for ``persona-mw db copy``)."""
        if table not in COPY_TABLES:
            raise StoreError(f"unknown table {table!r}", hint=f"one of {', '.join(COPY_TABLES)}")
        order = {"feedback": "seq", "store_meta": "key", "forgotten": "key", "edges": "src, dst, kind",
                 "profiles": "node"}.get(table, "rowid")
        for r in self._query(f"SELECT * FROM {table} ORDER BY {order}"):
            row = dict(r)
            if table == "memories":
                row["embedding"] = _unpack(row["embedding"])
            yield row

    def load_table(self, table: str, rows: Iterable[dict[str, Any]]) -> int:
        """Insert rows of ``dump_table``'s layout (``store_meta`` rows replace ours); returns the count."""
        if table not in COPY_TABLES:
            raise StoreError(f"unknown table {table!r}", hint=f"one of {', '.join(COPY_TABLES)}")
        n = 0
        with self._tx() as cur:
            for row in rows:
                row = dict(row)
                if table == "memories":
                    row["embedding"] = _pack(row["embedding"])
                cols = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                verb = "INSERT OR REPLACE" if table == "store_meta" else "INSERT"
                cur.execute(f"{verb} INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))
                n += 1
            if table == "store_meta":
                self._salt = str(cur.execute("SELECT value FROM store_meta WHERE key = 'forget_salt'").fetchone()[0])
        return n

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
