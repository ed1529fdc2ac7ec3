"""The ``Store`` contract on PostgreSQL + pgvector, for many processes on one database.

psycopg 3 with a connection pool (``psycopg_pool``); every method is one short transaction on a
pooled connection, so one store object is safe to share between threads. Tenants get a schema
each (``persona_mw`` -> ``persona_mw.tenant-acme``): as with SQLite's file per tenant, no query
carries a tenant predicate that a plugin could forget, and ``DROP SCHEMA`` removes a tenant whole.

Across processes:

- profiles carry a row version; ``put_profile(expected_version=)`` is a compare-and-set in one
  statement, so two workers never both apply an update on the same read;
- jobs are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``: two workers never take the same job;
- ``forget_user`` bumps a per-user epoch in the same transaction as the deletes and holds the user's
  advisory lock exclusively; every guarded write takes it shared and re-reads the epoch, so work
  started before a forget cannot write the user back (any process: the epoch is a row, not memory).

Schema migrations are a list in this module (``MIGRATIONS``), applied under an advisory lock when the
store opens or by ``persona-mw db migrate``; a schema newer than the code is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from persona_mw.errors import ConfigError, ForgottenError, StaleVersionError, StoreError
from persona_mw.nodes import is_user_node_of, user_context_prefix, user_node
from persona_mw.store import COPY_TABLES, Edge, Node, current_guard, node_kind, user_of_node
from persona_mw.store.sqlite import LEASE_S, SQLiteStore, _validate_node_id, process_id
from persona_mw.types import Feedback, Memory, NodeId, Profile, Trace

DEFAULT_SCHEMA = "persona_mw"
# The dimension the HNSW index is built for (the packaged all-MiniLM-L6-v2). Vectors of another
# dimension are stored and searched too, by an exact scan of the owner's rows.
INDEXED_DIM = 384

HNSW_INDEX = f"""CREATE INDEX memories_hnsw ON memories USING hnsw
               ((embedding::public.vector({INDEXED_DIM})) public.vector_cosine_ops)
               WHERE public.vector_dims(embedding) = {INDEXED_DIM}"""

# An owner with fewer memories than this is searched by an exact scan, not the HNSW index (see
# ``vector_search``). Chosen, not tuned: 5,000 exact distances read through the owner index; the plans
# in benchmarks/results/pg_memory_speed.json show 200 rows at 0.5 ms.
EXACT_BELOW = 5000


def vector_sql(dim: int, *, exact: bool, pool: int = 0) -> str:
    """The owner's nearest memories; params ``q``, ``owner``, ``k`` and ``kinds`` (a list, or None for
    every kind).

    ``exact=True`` orders the owner's rows by the similarity column, which no index matches, so
    Postgres reads them and sorts them. ``exact=False`` asks the HNSW index for the ``pool`` nearest
    rows of the whole table (the inner query has no owner filter, only the index's own predicate, so
    the index is the one way to answer it) and keeps the owner's active ones among them; the caller
    falls back to the exact scan when fewer than ``k`` are left."""
    vec = f"public.vector({dim})"
    kinds = "AND (%(kinds)s::text[] IS NULL OR kind = ANY(%(kinds)s::text[]))"
    if exact:
        return (f"SELECT id, 1 - (embedding::{vec} <=> %(q)s::{vec}) AS sim "
                f"FROM memories WHERE owner = %(owner)s AND superseded_by IS NULL {kinds} "
                f"AND public.vector_dims(embedding) = {dim} ORDER BY sim DESC, id LIMIT %(k)s")
    return (f"SELECT id, sim FROM (SELECT id, owner, kind, superseded_by, 1 - (embedding::{vec} <=> %(q)s::{vec}) AS sim "
            f"FROM memories WHERE public.vector_dims(embedding) = {dim} "
            f"ORDER BY embedding::{vec} <=> %(q)s::{vec} LIMIT {int(pool)}) c "
            f"WHERE owner = %(owner)s AND superseded_by IS NULL {kinds} ORDER BY sim DESC, id LIMIT %(k)s")


# ``text_search``'s BM25 over the owner's full-text lexemes; params from ``text_params``.
TEXT_SQL = """WITH q AS (SELECT unnest(tsvector_to_array(to_tsvector('english', %(text)s))) AS lex),
                    anyq AS (SELECT to_tsquery('english', %(ors)s) AS tq),
                    stats AS (SELECT %(n)s::bigint AS n, %(avgdl)s::double precision AS avgdl),
                    hits AS (SELECT m.id, m.tsv FROM memories m, anyq
                             WHERE m.owner = %(owner)s AND m.superseded_by IS NULL AND m.tsv @@ anyq.tq
                             AND (%(kinds)s::text[] IS NULL OR m.kind = ANY(%(kinds)s::text[]))),
                    terms AS (SELECT h.id, u.lexeme, COALESCE(array_length(u.positions, 1), 1) AS tf,
                                     length(h.tsv) AS dl
                              FROM hits h, unnest(h.tsv) u WHERE u.lexeme IN (SELECT lex FROM q)),
                    df AS (SELECT lexeme, COUNT(*) AS df FROM terms GROUP BY lexeme)
               SELECT t.id, SUM(ln(1 + (s.n - df.df + 0.5) / (df.df + 0.5))
                                * t.tf * 2.2 / (t.tf + 1.2 * (0.25 + 0.75 * t.dl / GREATEST(s.avgdl, 1)))) AS score
               FROM terms t JOIN df USING (lexeme), stats s
               GROUP BY t.id ORDER BY score DESC, t.id LIMIT %(k)s"""


# The owner's document count and mean length that BM25 needs (``text_search``).
TEXT_STATS_SQL = ("SELECT COUNT(*), COALESCE(AVG(length(tsv)), 0) FROM memories "
                  "WHERE owner = %s AND superseded_by IS NULL")
# Owners with at least this many memories have those statistics cached for ``TEXT_STATS_TTL_S`` (reading
# every row's length is what a large owner's search cost: 30 ms per 5,000 rows); a write through this
# store object drops its owner's entry. Writes by other processes show within the TTL; on a large owner
# they move the count and the mean length by a fraction of a percent, so the ranking barely changes.
TEXT_STATS_CACHE_FROM = 2000
TEXT_STATS_TTL_S = 60.0
# A large owner's search scores the memories holding its rarest query lexemes, up to about this many
# (``_text_search_pruned``).
TEXT_PRUNE_DOCS = 3000
# BM25 over given candidates (``tq``, an OR of lexemes) with given document frequencies (``lexs``, ``dfs``).
TEXT_PRUNED_SQL = """WITH d AS (SELECT * FROM unnest(%(lexs)s::text[], %(dfs)s::bigint[]) AS d(lexeme, df)),
                    hits AS (SELECT m.id, m.tsv FROM memories m WHERE m.owner = %(owner)s
                             AND m.superseded_by IS NULL AND m.tsv @@ %(tq)s::tsquery
                             AND (%(kinds)s::text[] IS NULL OR m.kind = ANY(%(kinds)s::text[]))),
                    terms AS (SELECT h.id, u.lexeme, COALESCE(array_length(u.positions, 1), 1) AS tf,
                                     length(h.tsv) AS dl
                              FROM hits h, unnest(h.tsv) u WHERE u.lexeme IN (SELECT lexeme FROM d))
               SELECT t.id, SUM(ln(1 + (%(n)s - d.df + 0.5) / (d.df + 0.5))
                                * t.tf * 2.2 / (t.tf + 1.2 * (0.25 + 0.75 * t.dl / GREATEST(%(avgdl)s, 1)))) AS score
               FROM terms t JOIN d USING (lexeme)
               GROUP BY t.id ORDER BY score DESC, t.id LIMIT %(k)s"""


def _tsquery_lexeme(lexeme: str) -> str:
    """A lexeme as a tsquery operand, taken as is (not stemmed again)."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def text_params(owner: str, query: str, k: int, kinds: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``TEXT_SQL``'s parameters, or None when the query has no word to look for."""
    words = sorted(set(_WORD.findall(query.lower())))[:64]
    if not words or k < 1:
        return None
    return {"text": " ".join(words), "ors": " | ".join(words), "owner": owner, "k": k,
            "kinds": None if kinds is None else sorted(set(kinds))}


# Each entry upgrades the schema by one version (recorded in ``schema_version``). Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE nodes (id TEXT PRIMARY KEY, kind TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
               meta TEXT NOT NULL DEFAULT '{}')""",
        "CREATE INDEX nodes_kind ON nodes (kind, id)",
        "CREATE INDEX nodes_prefix ON nodes (id text_pattern_ops)",
        """CREATE TABLE edges (src TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
               dst TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
               kind TEXT NOT NULL, weight DOUBLE PRECISION NOT NULL, PRIMARY KEY (src, dst, kind))""",
        "CREATE INDEX edges_dst ON edges (dst)",
        """CREATE TABLE profiles (node TEXT PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
               data TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL, version BIGINT NOT NULL DEFAULT 0)""",
        """CREATE TABLE memories (id TEXT PRIMARY KEY,
               owner TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
               kind TEXT NOT NULL, text TEXT NOT NULL, polarity TEXT, provenance TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, superseded_by TEXT,
               embedding public.vector, meta TEXT NOT NULL, idem TEXT,
               index_text TEXT NOT NULL DEFAULT '',
               tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', index_text)) STORED)""",
        "CREATE INDEX memories_owner ON memories (owner, created_at, id)",
        "CREATE UNIQUE INDEX memories_idem ON memories (owner, idem) WHERE idem IS NOT NULL",
        "CREATE INDEX memories_tsv ON memories USING gin (tsv)",
        HNSW_INDEX,
        """CREATE TABLE feedback (seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL UNIQUE,
               "user" TEXT NOT NULL, context TEXT, kind TEXT NOT NULL, payload TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL)""",
        'CREATE INDEX feedback_user ON feedback ("user", context)',
        # Append-only in the database itself: an event can be deleted (forget) but never changed.
        """CREATE FUNCTION feedback_append_only() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'feedback events are append-only'; END $$""",
        """CREATE TRIGGER feedback_no_update BEFORE UPDATE ON feedback
               FOR EACH ROW EXECUTE FUNCTION feedback_append_only()""",
        """CREATE TABLE traces (id TEXT PRIMARY KEY, "user" TEXT NOT NULL, data TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL)""",
        'CREATE INDEX traces_user ON traces ("user")',
        """CREATE TABLE jobs (id TEXT PRIMARY KEY, "user" TEXT NOT NULL, kind TEXT NOT NULL,
               payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
               claimed_at DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL, claimed_by TEXT)""",
        'CREATE INDEX jobs_user ON jobs ("user")',
        "CREATE INDEX jobs_order ON jobs (created_at, id)",
        """CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
               heartbeat DOUBLE PRECISION NOT NULL)""",
        "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO store_meta (key, value) VALUES ('forget_salt', md5(random()::text || clock_timestamp()::text))",
        """CREATE TABLE forgotten (key TEXT PRIMARY KEY, epoch BIGINT NOT NULL,
               forgotten_at DOUBLE PRECISION NOT NULL)""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_MEMORY_COLS = ("id, owner, kind, text, polarity, provenance, created_at, updated_at, superseded_by, "
                "embedding, meta")
_COLUMNS: dict[str, tuple[str, ...]] = {
    "store_meta": ("key", "value"),
    "forgotten": ("key", "epoch", "forgotten_at"),
    "nodes": ("id", "kind", "created_at", "meta"),
    "edges": ("src", "dst", "kind", "weight"),
    "profiles": ("node", "data", "updated_at", "version"),
    "memories": ("id", "owner", "kind", "text", "polarity", "provenance", "created_at", "updated_at",
                 "superseded_by", "embedding", "meta", "idem"),
    "feedback": ("seq", "id", "user", "context", "kind", "payload", "created_at"),
    "traces": ("id", "user", "data", "created_at"),
    "workers": ("id", "host", "pid", "heartbeat"),
    "jobs": ("id", "user", "kind", "payload", "attempts", "last_error", "claimed_at", "created_at", "claimed_by"),
}
_ORDER = {"store_meta": "key", "forgotten": "key", "nodes": "id", "edges": "src, dst, kind", "profiles": "node",
          "memories": "created_at, id", "feedback": "seq", "traces": "created_at, id", "workers": "id",
          "jobs": "created_at, id"}
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_.\-+@]{1,63}$")
_WORD = re.compile(r"[a-z0-9]+")


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """``postgresql://...[#schema=NAME&pool_min=1&pool_max=10&pool_timeout=30&migrate=1]`` -> (dsn, options).

    A trailing ``/NAME.pg`` in the fragment names the schema too: that is the form
    ``persona_mw.tenancy.tenant_store_path`` turns into ``/NAME.tenant-acme.pg`` for a tenant, and a
    filesystem path's ``postgresql:/`` is read as ``postgresql://``.
    """
    url = re.sub(r"^(postgres(?:ql)?):/(?!/)", r"\1://", url)
    dsn, _, frag = url.partition("#")
    opts: dict[str, Any] = {}
    if frag:
        query, _, tail = frag.partition("/")
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "schema":
                opts["schema"] = value
            elif key in ("pool_min", "pool_max"):
                opts[key] = _int_opt(key, value)
            elif key == "pool_timeout":
                opts["pool_timeout_s"] = _float_opt(key, value)
            elif key == "migrate":
                opts["migrate"] = value not in ("0", "false", "no")
            else:
                raise ConfigError(f"unknown store URL option {key!r}",
                                  hint="options after '#': schema, pool_min, pool_max, pool_timeout, migrate")
        if tail:
            if not tail.endswith(".pg"):
                raise ConfigError(f"store URL fragment {frag!r}: expected NAME.pg after '/'")
            opts["schema"] = tail[: -len(".pg")]
    return dsn, opts


def _int_opt(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"store URL option {key}={value!r} is not an integer") from None


def _float_opt(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"store URL option {key}={value!r} is not a number") from None


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (for messages and reprs)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _PostgresBase:
    """Connection pool, transactions, migrations, forget keys; each part below adds one concern (issue #14)."""

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, pool_min: int = 1, pool_max: int = 10,
                 pool_timeout_s: float = 30.0, migrate: bool = True) -> None:
        try:
            import psycopg
            from pgvector.psycopg import register_vector
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("the Postgres store needs psycopg, psycopg_pool and pgvector",
                              hint="pip install 'persona-mw[postgres]'") from exc
        if not _SCHEMA_NAME.match(schema):
            raise ConfigError(f"store schema {schema!r}: 1-63 letters, digits and _.-")
        if pool_min < 1 or pool_max < pool_min:
            raise ConfigError(f"store pool: need 1 <= min ({pool_min}) <= max ({pool_max})")
        self.dsn = dsn
        self.schema = schema
        self._pool_opts = {"pool_min": pool_min, "pool_max": pool_max, "pool_timeout_s": pool_timeout_s}
        # The form ``tenant_store_path`` maps to a tenant's schema (see ``parse_url``).
        self.path = f"{dsn}#pool_min={pool_min}&pool_max={pool_max}&pool_timeout={pool_timeout_s}/{schema}.pg"
        self.max_memories_per_owner: int | None = None
        self.redactor: Any = None
        self._stats_cache: dict[str, tuple[float, int, float]] = {}  # owner -> (when, n, avgdl), large owners
        self._df_cache: dict[str, dict[str, tuple[float, int]]] = {}  # owner -> lexeme -> (when, df)
        self._psycopg = psycopg
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=int(max(1, pool_timeout_s))) as conn:
                self._prepare(conn, migrate)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open Postgres store {redact_dsn(dsn)} (schema {schema}): {exc}") from exc

        search_path = f"SET search_path TO {_ident(schema)}, public"

        def configure(conn: Any) -> None:
            conn.execute(search_path)
            register_vector(conn)
            conn.commit()

        self._pool: Any = ConnectionPool(dsn, min_size=pool_min, max_size=pool_max, timeout=pool_timeout_s,
                                         configure=configure, open=False, name=f"persona-mw:{schema}")
        try:
            self._pool.open(wait=True, timeout=pool_timeout_s)
        except Exception as exc:
            self._pool.close()
            raise StoreError(f"cannot open a connection pool to {redact_dsn(dsn)}: {exc}") from exc
        self._closed = False
        self._salt = str(self._one("SELECT value FROM store_meta WHERE key = 'forget_salt'")[0])

    # plumbing ------------------------------------------------------------------------------
    def _prepare(self, conn: Any, migrate: bool) -> None:
        """Create the extension and schema and run pending migrations (or check the version)."""
        with conn.transaction():
            # One migrator per database at a time, whatever the number of processes opening it.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('persona-mw-migrate'))")
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(self.schema)}")
            conn.execute(f"SET LOCAL search_path TO {_ident(self.schema)}, public")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"Postgres schema {self.schema!r} has version {version}, newer than this persona-mw "
                    f"understands ({SCHEMA_VERSION})", hint="upgrade persona-mw, or use another schema")
            if version < SCHEMA_VERSION and not migrate:
                raise StoreError(f"Postgres schema {self.schema!r} is at version {version}, this persona-mw "
                                 f"needs {SCHEMA_VERSION}", hint="run `persona-mw db migrate`")
            for steps in MIGRATIONS[version:]:
                for sql in steps:
                    conn.execute(sql)
            conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION if migrate else version,))

    @contextmanager
    def _tx(self, *, snapshot: bool = False) -> Iterator[Any]:
        """A transaction on a pooled connection, rolled back on any error; yields a cursor."""
        if self._closed:
            raise StoreError(f"store {self!r} is closed")
        psycopg = self._psycopg
        try:
            with self._pool.connection() as conn:
                if snapshot:
                    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        yield cur
                finally:
                    if snapshot:
                        conn.isolation_level = None
        except psycopg.Error as exc:
            raise StoreError(f"Postgres store {self.schema!r}: {exc.__class__.__name__}: {exc}") from exc

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        with self._tx() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
        rows = self._rows(sql, params)
        return rows[0]

    def _insert_node(self, cur: Any, node_id: NodeId, meta: dict[str, Any] | None = None) -> None:
        kind = _validate_node_id(node_id)
        if kind in ("user", "user_context"):
            self._check_forgotten(cur, user_of_node(node_id) or "")
        cur.execute("INSERT INTO nodes (id, kind, created_at, meta) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (node_id, kind, time.time(), json.dumps(meta or {})))

    # forget epochs -------------------------------------------------------------------------
    def _forget_key(self, user: str) -> str:
        return hashlib.sha256(f"{self._salt}:{user}".encode()).hexdigest()

    def user_epoch(self, user: str) -> int:
        """How many times ``user`` was forgotten (a row: every process reads the same)."""
        rows = self._rows("SELECT epoch FROM forgotten WHERE key = %s", (self._forget_key(user),))
        return int(rows[0][0]) if rows else 0

    def _check_forgotten(self, cur: Any, user: str) -> None:
        """Inside a write transaction: hold the user's lock shared (a forget holds it exclusively, so
        it sees this write, or this write sees its epoch) and refuse work from before a forget."""
        key = self._forget_key(user)
        cur.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))", (key,))
        guard = current_guard()
        if guard is None or guard[0] != user:
            return
        cur.execute("SELECT epoch FROM forgotten WHERE key = %s", (key,))
        row = cur.fetchone()
        if (int(row[0]) if row else 0) != guard[1]:
            raise ForgottenError(f"user {user!r} was forgotten after this work started; write dropped",
                                 hint="work started after the forget writes normally")


class _PostgresNodes(_PostgresBase):
    # nodes and edges -----------------------------------------------------------------------
    def ensure_node(self, node_id: NodeId, meta: dict[str, Any] | None = None) -> Node:
        # Read in the inserting transaction: a user node is under the user's lock there, so a forget
        # cannot delete it between the insert and the read (a read after the commit could find nothing).
        with self._tx() as cur:
            self._insert_node(cur, node_id, meta)
            cur.execute("SELECT id, kind, created_at, meta FROM nodes WHERE id = %s", (node_id,))
            row = cur.fetchone()
        if row is None:  # a group/context node pruned by another process between the two statements
            raise StoreError(f"node {node_id!r} was deleted while it was being created", hint="retry the request")
        return _node(row)

    def get_node(self, node_id: NodeId) -> Node | None:
        rows = self._rows("SELECT id, kind, created_at, meta FROM nodes WHERE id = %s", (node_id,))
        return _node(rows[0]) if rows else None

    def list_nodes(self, kind: str | None = None, limit: int = 1000, offset: int = 0) -> list[Node]:
        rows = self._rows("SELECT id, kind, created_at, meta FROM nodes WHERE %s::text IS NULL OR kind = %s "
                          "ORDER BY id COLLATE \"C\" LIMIT %s OFFSET %s", (kind, kind, limit, offset))
        return [_node(r) for r in rows]

    def add_edge(self, edge: Edge) -> None:
        with self._tx() as cur:
            self._insert_node(cur, edge.src)
            self._insert_node(cur, edge.dst)
            cur.execute("INSERT INTO edges (src, dst, kind, weight) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (src, dst, kind) DO UPDATE SET weight = excluded.weight",
                        (edge.src, edge.dst, edge.kind, edge.weight))

    def remove_edge(self, src: NodeId, dst: NodeId, kind: str = "member") -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM edges WHERE src = %s AND dst = %s AND kind = %s", (src, dst, kind))

    def edges_from(self, node_id: NodeId) -> list[Edge]:
        rows = self._rows("SELECT src, dst, kind, weight FROM edges WHERE src = %s "
                          "ORDER BY dst COLLATE \"C\", kind COLLATE \"C\"", (node_id,))
        return [Edge(src=r[0], dst=r[1], kind=r[2], weight=r[3]) for r in rows]

    def edges_to(self, node_id: NodeId, limit: int = 10000) -> list[Edge]:
        rows = self._rows("SELECT src, dst, kind, weight FROM edges WHERE dst = %s "
                          "ORDER BY src COLLATE \"C\", kind COLLATE \"C\" LIMIT %s", (node_id, limit))
        return [Edge(src=r[0], dst=r[1], kind=r[2], weight=r[3]) for r in rows]

    def prune_node(self, node_id: NodeId) -> bool:
        if node_kind(node_id) not in ("group", "context"):
            return False
        with self._tx() as cur:
            # Lock the node row so an edge or memory added concurrently waits for the decision.
            cur.execute("SELECT 1 FROM nodes WHERE id = %s FOR UPDATE", (node_id,))
            cur.execute("SELECT 1 FROM edges WHERE src = %s OR dst = %s LIMIT 1", (node_id, node_id))
            if cur.fetchone():
                return False
            cur.execute("SELECT 1 FROM memories WHERE owner = %s LIMIT 1", (node_id,))
            if cur.fetchone():
                return False
            cur.execute("SELECT data FROM profiles WHERE node = %s", (node_id,))
            row = cur.fetchone()
            if row is not None and json.loads(row[0]).get("stated"):
                return False
            cur.execute("DELETE FROM profiles WHERE node = %s", (node_id,))
            cur.execute("DELETE FROM nodes WHERE id = %s", (node_id,))
            return bool(cur.rowcount > 0)


class _PostgresProfiles(_PostgresNodes):
    # profiles ------------------------------------------------------------------------------
    def get_profile(self, node_id: NodeId) -> Profile | None:
        rows = self._rows("SELECT data FROM profiles WHERE node = %s", (node_id,))
        return Profile.model_validate_json(rows[0][0]) if rows else None

    def get_profiles(self, node_ids: Iterable[NodeId]) -> dict[NodeId, Profile]:
        rows = self._rows("SELECT node, data FROM profiles WHERE node = ANY(%s)", (list(node_ids),))
        return {r[0]: Profile.model_validate_json(r[1]) for r in rows}

    def get_profile_versioned(self, node_id: NodeId) -> tuple[Profile | None, int]:
        rows = self._rows("SELECT data, version FROM profiles WHERE node = %s", (node_id,))
        if not rows:
            return None, 0
        return Profile.model_validate_json(rows[0][0]), int(rows[0][1])

    def put_profile(self, profile: Profile, expected_version: int | None = None) -> int:
        """Store the profile, return its new row version; with ``expected_version`` a compare-and-set
        (one statement, so two processes can never both win): else ``StaleVersionError``."""
        data = profile.model_dump_json()
        with self._tx() as cur:
            self._insert_node(cur, profile.node)
            if expected_version is None:
                cur.execute("INSERT INTO profiles (node, data, updated_at, version) VALUES (%s, %s, %s, 1) "
                            "ON CONFLICT (node) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at, "
                            "version = profiles.version + 1 RETURNING version",
                            (profile.node, data, profile.updated_at))
            elif expected_version == 0:
                cur.execute("INSERT INTO profiles (node, data, updated_at, version) VALUES (%s, %s, %s, 1) "
                            "ON CONFLICT (node) DO NOTHING RETURNING version", (profile.node, data, profile.updated_at))
            else:
                cur.execute("UPDATE profiles SET data = %s, updated_at = %s, version = version + 1 "
                            "WHERE node = %s AND version = %s RETURNING version",
                            (data, profile.updated_at, profile.node, expected_version))
            row = cur.fetchone()
            if row is None:
                cur.execute("SELECT version FROM profiles WHERE node = %s", (profile.node,))
                now = cur.fetchone()
                raise StaleVersionError(
                    f"profile {profile.node!r} is at version {now[0] if now else 0}, not {expected_version}",
                    hint="another writer updated it: read it again and re-apply the change")
            return int(row[0])


class _PostgresMemories(_PostgresProfiles):
    # memories ------------------------------------------------------------------------------
    def _forget_stats(self, owner: str) -> None:
        """Drop the cached BM25 statistics of ``owner`` (a write through this store changed them)."""
        self._stats_cache.pop(owner, None)
        self._df_cache.pop(owner, None)

    def _redacted(self, memory: Memory) -> Memory:
        r = self.redactor
        if r is None:
            return memory
        update = {"text": r.redact(memory.text),
                  "meta": {k: (v if k == "idem" else r.redact_data(v)) for k, v in memory.meta.items()},
                  "provenance": [r.redact(p) for p in memory.provenance]}
        update = {k: v for k, v in update.items() if v != getattr(memory, k)}
        return memory.model_copy(update=update) if update else memory

    @staticmethod
    def _memory_params(m: Memory) -> tuple[Any, ...]:
        emb = None if m.embedding is None else np.asarray(m.embedding, dtype=np.float32)
        return (m.id, m.owner, m.kind, m.text, m.polarity, json.dumps(m.provenance), m.created_at, m.updated_at,
                m.superseded_by, emb, json.dumps(m.meta), str(m.meta.get("index_text") or m.text))

    def add_memory(self, memory: Memory) -> bool:
        memory = self._redacted(memory)
        self._forget_stats(memory.owner)
        idem = memory.meta.get("idem")
        with self._tx() as cur:
            self._insert_node(cur, memory.owner)
            cur.execute(f"INSERT INTO memories ({_MEMORY_COLS}, index_text, idem) VALUES "
                        "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (*self._memory_params(memory), None if idem is None else str(idem)))
            if cur.rowcount == 0:
                cur.execute("SELECT 1 FROM memories WHERE id = %s", (memory.id,))
                if cur.fetchone():
                    raise StoreError(f"memory {memory.id!r} already exists", hint="use update_memory")
                return False  # the same idempotency key is stored already (a resumed job)
            cap = self.max_memories_per_owner
            if cap is not None:
                cur.execute("SELECT COUNT(*) FROM memories WHERE owner = %s", (memory.owner,))
                n = int(cur.fetchone()[0])
                if n > cap:
                    cur.execute("DELETE FROM memories WHERE id IN (SELECT id FROM memories WHERE owner = %s "
                                "AND id <> %s ORDER BY kind = 'preference', created_at, id LIMIT %s)",
                                (memory.owner, memory.id, n - cap))
        return True

    def update_memory(self, memory: Memory) -> None:
        memory = self._redacted(memory)
        self._forget_stats(memory.owner)
        p = self._memory_params(memory)
        with self._tx() as cur:
            self._insert_node(cur, memory.owner)
            cur.execute("UPDATE memories SET owner = %s, kind = %s, text = %s, polarity = %s, provenance = %s, "
                        "created_at = %s, updated_at = %s, superseded_by = %s, embedding = %s, meta = %s, "
                        "index_text = %s WHERE id = %s", (*p[1:], p[0]))
            if cur.rowcount == 0:
                raise StoreError(f"no memory {memory.id!r} to update", hint="use add_memory")

    def get_memory(self, memory_id: str) -> Memory | None:
        rows = self._rows(f"SELECT {_MEMORY_COLS} FROM memories WHERE id = %s", (memory_id,))
        return _memory(rows[0]) if rows else None

    def list_memories(self, owner: NodeId, include_superseded: bool = False, *,
                      embeddings: bool = True) -> list[Memory]:
        """The owner's memories, oldest first; ``embeddings=False`` leaves the vectors out (not even read)."""
        cols = _MEMORY_COLS if embeddings else _MEMORY_COLS.replace("embedding,", "NULL AS embedding,")
        rows = self._rows(f"SELECT {cols} FROM memories WHERE owner = %s "
                          "AND (%s OR superseded_by IS NULL) ORDER BY created_at, id COLLATE \"C\"",
                          (owner, include_superseded))
        return [_memory(r) for r in rows]

    def delete_memory(self, memory_id: str) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM memories WHERE id = %s RETURNING owner", (memory_id,))
            row = cur.fetchone()
        if row is not None:
            self._forget_stats(row[0])
        return row is not None

    def count_memories(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM memories")[0])

    def memory_rows(self, owner: NodeId) -> tuple[list[Memory], dict[str, np.ndarray]]:
        rows = self._rows(f"SELECT {_MEMORY_COLS} FROM memories WHERE owner = %s AND superseded_by IS NULL "
                          "ORDER BY created_at, id COLLATE \"C\"", (owner,))
        mems: list[Memory] = []
        vecs: dict[str, np.ndarray] = {}
        for r in rows:
            mems.append(Memory.model_construct(
                id=r[0], owner=r[1], kind=r[2], text=r[3], polarity=r[4], provenance=json.loads(r[5]),
                created_at=r[6], updated_at=r[7], superseded_by=None, embedding=None, meta=json.loads(r[10])))
            if r[9] is not None:
                vecs[r[0]] = _vec(r[9])
        return mems, vecs

    def vector_search(self, owner: NodeId, query: Sequence[float], k: int,
                      kinds: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """pgvector cosine search of the owner's active memories (of ``kinds`` only, when given).

        A filtered HNSW walk is the known trap here: the graph is walked over every owner's vectors and
        the owner filtered afterwards, so with 200 memories among 200,000 a walk of ``ef_search`` 400
        would find almost none of them, should the planner choose it. An owner with fewer than ``EXACT_BELOW`` rows (a bounded count on the
        owner index) is scanned exactly instead: a few thousand distances cost far less than the walk.
        Larger owners use the HNSW index; when the walk still returns fewer than ``k`` of theirs (an
        owner that is a small share of a very large table), the exact scan answers instead.
        """
        q = np.asarray(query, dtype=np.float32)
        if k < 1 or not len(q):
            return []
        with self._tx() as cur:
            setup, sql = self._vector_plan(cur, owner, len(q), k)
            for statement in setup:
                cur.execute(statement)
            args = {"q": q, "owner": owner, "k": k, "kinds": None if kinds is None else sorted(set(kinds))}
            cur.execute(sql, args)
            rows = cur.fetchall()
            if setup and len(rows) < k:
                cur.execute(vector_sql(len(q), exact=True), args)
                rows = cur.fetchall()
            return [(r[0], float(r[1])) for r in rows]

    def _vector_plan(self, cur: Any, owner: NodeId, dim: int, k: int) -> tuple[list[str], str]:
        """(statements to run first, the query) for ``vector_search``: exact or HNSW (see there)."""
        if dim != INDEXED_DIM:
            return [], vector_sql(dim, exact=True)
        cur.execute("SELECT COUNT(*) FROM (SELECT 1 FROM memories WHERE owner = %s LIMIT %s) s",
                    (owner, EXACT_BELOW))
        row = cur.fetchone()
        if row is None or int(row[0]) < EXACT_BELOW:
            return [], vector_sql(dim, exact=True)
        pool = min(1000, max(40, 4 * k))  # the walk's candidates (ef_search >= the inner LIMIT)
        return [f"SET LOCAL hnsw.ef_search = {pool}"], vector_sql(dim, exact=False, pool=pool)


class _PostgresLexical(_PostgresMemories):
    # lexical search: BM25 over the full-text lexemes --------------------------------------------
    def text_search(self, owner: NodeId, query: str, k: int,
                    kinds: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """BM25 (k1 1.2, b 0.75, as the in-process index) over Postgres full-text lexemes (English
        stemming): the GIN index finds the owner's memories holding any query lexeme; term and document
        frequencies come from the ``tsvector``s. ``ts_rank_cd`` has no IDF, which costs LoCoMo recall.
        A large owner (``TEXT_STATS_CACHE_FROM``) is searched by ``_text_search_pruned``."""
        params = text_params(owner, query, k, kinds)
        if params is None:
            return []
        params["n"], params["avgdl"] = self._text_stats(owner)
        if params["n"] >= TEXT_STATS_CACHE_FROM:
            return self._text_search_pruned(owner, params)
        rows = self._rows(TEXT_SQL, params)
        return [(r[0], float(r[1])) for r in rows]

    def _text_search_pruned(self, owner: NodeId, params: dict[str, Any]) -> list[tuple[str, float]]:
        """BM25 of a large owner, scoring only the memories that hold the query's rarer lexemes.

        Reading every memory that holds a common word is what made a 100,000-memory owner's search take
        a second. Each query lexeme's document frequency is read once (cached like the statistics);
        candidates are the memories holding the rarest lexemes, added rarest first while their frequencies
        sum to at most ``TEXT_PRUNE_DOCS`` (the rarest always). Candidates are scored on every query
        lexeme with the true frequencies, so a memory's score is its exact BM25 score; what is given up is
        a memory holding only common lexemes, which scores below any holding a rare one unless fewer
        than ``k`` do. With every lexeme within the bound the result equals ``TEXT_SQL``'s."""
        lexemes = [r[0] for r in self._rows("SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', %s)))",
                                            (params["text"],))]
        df = self._lexeme_df(owner, lexemes)
        chosen: list[str] = []
        total = 0
        for lex in sorted((x for x in lexemes if df[x] > 0), key=lambda x: (df[x], x)):
            if chosen and total + df[lex] > TEXT_PRUNE_DOCS:
                break
            chosen.append(lex)
            total += df[lex]
        if not chosen:
            return []
        rows = self._rows(TEXT_PRUNED_SQL, {
            "owner": owner, "k": params["k"], "n": params["n"], "avgdl": params["avgdl"], "kinds": params["kinds"],
            "lexs": lexemes, "dfs": [df[x] for x in lexemes], "tq": " | ".join(_tsquery_lexeme(x) for x in chosen)})
        return [(r[0], float(r[1])) for r in rows]

    def _lexeme_df(self, owner: NodeId, lexemes: list[str]) -> dict[str, int]:
        """How many of ``owner``'s active memories hold each lexeme (cached as ``_text_stats``)."""
        now = time.monotonic()
        cached = self._df_cache.setdefault(owner, {})
        out = {x: v[1] for x, v in cached.items() if x in lexemes and now - v[0] < TEXT_STATS_TTL_S}
        missing = [x for x in lexemes if x not in out]
        if missing:
            rows = self._rows("SELECT l, (SELECT COUNT(*) FROM memories WHERE owner = %s AND superseded_by IS NULL "
                              "AND tsv @@ quote_literal(l)::tsquery) FROM unnest(%s::text[]) AS l", (owner, missing))
            for lex, count in rows:
                out[lex] = int(count)
                cached[lex] = (now, int(count))
            if len(cached) > 20000:  # bounded per owner: the oldest go
                for key in list(cached)[:5000]:
                    cached.pop(key, None)
        return out

    def _text_stats(self, owner: NodeId) -> tuple[int, float]:
        """(active memories, mean lexeme count) of ``owner``; cached for large owners (``TEXT_STATS_*``)."""
        now = time.monotonic()
        hit = self._stats_cache.get(owner)
        if hit is not None and now - hit[0] < TEXT_STATS_TTL_S:
            return hit[1], hit[2]
        n, avgdl = self._one(TEXT_STATS_SQL, (owner,))
        if int(n) >= TEXT_STATS_CACHE_FROM:
            if len(self._stats_cache) >= 4096:  # bounded: the oldest entries go first
                for key in list(self._stats_cache)[:1024]:
                    self._stats_cache.pop(key, None)
            self._stats_cache[owner] = (now, int(n), float(avgdl))
        return int(n), float(avgdl)


class _PostgresFeedback(_PostgresLexical):
    # feedback events (append-only) ---------------------------------------------------------
    def _beat(self, cur: Any, now: float) -> None:
        cur.execute("INSERT INTO workers (id, host, pid, heartbeat) VALUES (%s, %s, %s, %s) ON CONFLICT (id) "
                    "DO UPDATE SET heartbeat = excluded.heartbeat",
                    (process_id(), socket.gethostname(), os.getpid(), now))

    def _insert_job(self, cur: Any, now: float, job_id: str, user: str, kind: str, payload: dict[str, Any],
                    claim: bool) -> None:
        """Record a pending job inside the caller's transaction, held by this process when ``claim``."""
        self._beat(cur, now)
        cur.execute("INSERT INTO jobs (id, \"user\", kind, payload, attempts, claimed_at, claimed_by, created_at) "
                    "VALUES (%s, %s, %s, %s, 0, %s, %s, %s)",
                    (job_id, user, kind, json.dumps(payload), now if claim else None,
                     process_id() if claim else None, now))

    def append_feedback(self, event: Feedback, *, job: bool = False) -> int:
        with self._tx() as cur:
            self._check_forgotten(cur, event.user)
            key = f"{event.user}/{event.id}"
            cur.execute("INSERT INTO feedback (id, \"user\", context, kind, payload, created_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING seq",
                        (key, event.user, event.context, event.kind, event.model_dump_json(), event.created_at))
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"duplicate feedback event id {event.id!r}: events are append-only",
                                 hint="give each event a fresh id (the default does)")
            seq = int(row[0])
            if job:
                self._insert_job(cur, time.time(), f"feedback-{seq}", event.user, "feedback", {"seq": seq}, True)
            return seq

    def feedback_log(self, user: str, since_seq: int = 0, limit: int | None = None) -> list[tuple[int, Feedback]]:
        from pydantic import TypeAdapter

        rows = self._rows("SELECT seq, payload FROM feedback WHERE \"user\" = %s AND seq > %s ORDER BY seq LIMIT %s",
                          (user, since_seq, limit))
        adapter: TypeAdapter[Feedback] = TypeAdapter(Feedback)
        return [(int(r[0]), adapter.validate_json(r[1])) for r in rows]

    def list_feedback(self, user: str | None = None, kinds: Iterable[str] | None = None,
                      since_seq: int = 0, limit: int | None = None) -> list[Feedback]:
        from pydantic import TypeAdapter

        kind_list = None if kinds is None else list(kinds)
        rows = self._rows("SELECT payload FROM feedback WHERE seq > %s AND (%s::text IS NULL OR \"user\" = %s) "
                          "AND (%s::text[] IS NULL OR kind = ANY(%s)) ORDER BY seq LIMIT %s",
                          (since_seq, user, user, kind_list, kind_list, limit))
        adapter: TypeAdapter[Feedback] = TypeAdapter(Feedback)
        return [adapter.validate_json(r[0]) for r in rows]

    def count_feedback(self, user: str, context: str | None = None) -> int:
        rows = self._rows("SELECT COUNT(*) FROM feedback WHERE \"user\" = %s AND (%s::text IS NULL OR context = %s)",
                          (user, context, context))
        return int(rows[0][0])

    # traces --------------------------------------------------------------------------------
    def save_trace(self, trace: Trace) -> None:
        with self._tx() as cur:
            self._check_forgotten(cur, trace.user)
            cur.execute("INSERT INTO traces (id, \"user\", data, created_at) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET \"user\" = excluded.\"user\", data = excluded.data",
                        (trace.id, trace.user, trace.model_dump_json(), time.time()))

    def get_trace(self, trace_id: str) -> Trace | None:
        rows = self._rows("SELECT data FROM traces WHERE id = %s", (trace_id,))
        return Trace.model_validate_json(rows[0][0]) if rows else None

    def list_traces(self, user: str, limit: int = 20) -> list[Trace]:
        rows = self._rows("SELECT data FROM traces WHERE \"user\" = %s ORDER BY created_at DESC, id COLLATE \"C\" DESC "
                          "LIMIT %s", (user, int(limit)))
        return [Trace.model_validate_json(r[0]) for r in rows]


class _PostgresJobs(_PostgresFeedback):
    # durable background jobs -----------------------------------------------------------------
    def heartbeat(self) -> None:
        now = time.time()
        with self._tx() as cur:
            self._beat(cur, now)
            cur.execute("DELETE FROM workers WHERE heartbeat < %s", (now - 86400,))

    def add_job(self, job_id: str, user: str, kind: str, payload: dict[str, Any], claim: bool = True) -> None:
        """Record a job as pending, claimed by this process unless ``claim=False`` (left to a worker)."""
        now = time.time()
        with self._tx() as cur:
            self._check_forgotten(cur, user)
            self._insert_job(cur, now, job_id, user, kind, payload, claim)

    def finish_job(self, job_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM jobs WHERE id = %s", (job_id,))

    def fail_job(self, job_id: str, error: str) -> int:
        with self._tx() as cur:
            cur.execute("UPDATE jobs SET attempts = attempts + 1, last_error = %s, claimed_at = NULL, "
                        "claimed_by = NULL WHERE id = %s RETURNING attempts", (error[:2000], job_id))
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def claim_jobs(self, stale_after_s: float, max_attempts: int, limit: int = 1000, *,
                   exclude: Iterable[str] = (), dead_only: bool = False,
                   lease_s: float = LEASE_S, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """As ``SQLiteStore.claim_jobs``; rows are locked ``FOR UPDATE SKIP LOCKED``, so a job being
        claimed by another worker right now is skipped rather than taken twice or waited for."""
        now = time.time()
        skip = set(exclude)
        wanted = None if kinds is None else set(kinds)
        cols = ("id", "user", "kind", "payload", "attempts", "claimed_at", "claimed_by", "host", "pid", "heartbeat")
        with self._tx() as cur:
            self._beat(cur, now)
            cur.execute("SELECT j.id, j.\"user\", j.kind, j.payload, j.attempts, j.claimed_at, j.claimed_by, "
                        "w.host, w.pid, w.heartbeat FROM jobs j LEFT JOIN workers w ON w.id = j.claimed_by "
                        "WHERE j.attempts < %s ORDER BY j.created_at, j.id FOR UPDATE OF j SKIP LOCKED",
                        (max_attempts,))
            take: list[dict[str, Any]] = []
            for values in cur.fetchall():
                r = dict(zip(cols, values))
                if r["id"] in skip or (wanted is not None and r["kind"] not in wanted):
                    continue
                free = r["claimed_at"] is None or r["claimed_at"] <= now - stale_after_s
                if (not dead_only and free) or SQLiteStore._holder_dead(r, now, lease_s):  # type: ignore[arg-type]
                    take.append(r)
                if len(take) >= limit:
                    break
            if take:
                cur.execute("UPDATE jobs SET claimed_at = %s, claimed_by = %s WHERE id = ANY(%s)",
                            (now, process_id(), [r["id"] for r in take]))
        return [{"id": r["id"], "user": r["user"], "kind": r["kind"], "payload": json.loads(r["payload"]),
                 "attempts": r["attempts"]} for r in take]

    def list_jobs(self, user: str | None = None) -> list[dict[str, Any]]:
        cols = ("id", "user", "kind", "payload", "attempts", "last_error", "claimed_at", "claimed_by", "created_at")
        rows = self._rows("SELECT id, \"user\", kind, payload, attempts, last_error, claimed_at, claimed_by, "
                          "created_at FROM jobs WHERE %s::text IS NULL OR \"user\" = %s ORDER BY created_at, id",
                          (user, user))
        return [{**dict(zip(cols, r)), "payload": json.loads(r[3])} for r in rows]


class _PostgresUsers(_PostgresJobs):
    # per-user export and delete ------------------------------------------------------------
    _USER_NODES = "SELECT id FROM nodes WHERE id = %s OR id LIKE %s"

    @staticmethod
    def _user_params(user: str) -> tuple[str, str]:
        return user_node(user), _like_prefix(user_context_prefix(user))

    def list_user_nodes(self, user: str) -> list[NodeId]:
        rows = self._rows(f"{self._USER_NODES} ORDER BY id COLLATE \"C\"", self._user_params(user))
        return [r[0] for r in rows if is_user_node_of(r[0], user)]

    def has_user(self, user: str) -> bool:
        rows = self._rows("SELECT EXISTS (SELECT 1 FROM nodes WHERE id = %s) "
                          "OR EXISTS (SELECT 1 FROM feedback WHERE \"user\" = %s)", (user_node(user), user))
        return bool(rows[0][0])

    def list_users(self, query: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """As ``SQLiteStore.list_users`` (a NUL, which no id holds and no Postgres text can, matches none)."""
        q = query.lower() if query else None
        if q is not None and "\x00" in q:
            return []
        sep = user_context_prefix("")[len(user_node("")):]
        rows = self._rows(
            "SELECT substr(n.id, %(start)s), n.created_at, (SELECT COUNT(*) FROM memories m WHERE "
            "m.superseded_by IS NULL AND (m.owner = n.id OR left(m.owner, length(n.id) + length(%(sep)s)) = n.id || %(sep)s)) "
            "FROM nodes n WHERE n.kind = 'user' AND (%(q)s::text IS NULL OR strpos(lower(substr(n.id, %(start)s)), %(q)s) > 0) "
            "ORDER BY n.id COLLATE \"C\" LIMIT %(limit)s OFFSET %(offset)s",
            {"start": len(user_node("")) + 1, "sep": sep, "q": q, "limit": int(limit), "offset": int(offset)})
        return [{"id": r[0], "created_at": r[1], "memories": int(r[2])} for r in rows]

    def export_user(self, user: str) -> dict[str, Any]:
        """Everything stored about ``user`` (one consistent snapshot), as ``SQLiteStore.export_user``."""
        p = self._user_params(user)
        sub = self._USER_NODES
        with self._tx(snapshot=True) as cur:
            cur.execute(f"SELECT id, kind, created_at, meta FROM nodes WHERE id IN ({sub}) ORDER BY id COLLATE \"C\"", p)
            nodes = cur.fetchall()
            cur.execute(f"SELECT src, dst, kind, weight FROM edges WHERE src IN ({sub}) "
                        "ORDER BY src COLLATE \"C\", dst COLLATE \"C\", kind COLLATE \"C\"", p)
            edges = cur.fetchall()
            cur.execute(f"SELECT data FROM profiles WHERE node IN ({sub}) ORDER BY node COLLATE \"C\"", p)
            profiles = cur.fetchall()
            cur.execute(f"SELECT {_MEMORY_COLS} FROM memories WHERE owner IN ({sub}) "
                        "ORDER BY created_at, id COLLATE \"C\"", p)
            memories = cur.fetchall()
            cur.execute("SELECT payload FROM feedback WHERE \"user\" = %s ORDER BY seq", (user,))
            feedback = cur.fetchall()
            cur.execute("SELECT data FROM traces WHERE \"user\" = %s ORDER BY created_at, id COLLATE \"C\"", (user,))
            traces = cur.fetchall()
            cur.execute("SELECT id, \"user\", kind, payload, attempts, last_error, claimed_at, claimed_by, created_at "
                        "FROM jobs WHERE \"user\" = %s ORDER BY created_at, id COLLATE \"C\"", (user,))
            jobs = cur.fetchall()
        job_cols = ("id", "user", "kind", "payload", "attempts", "last_error", "claimed_at", "claimed_by", "created_at")
        return {
            "user": user,
            "nodes": [_node(r).model_dump(mode="json") for r in nodes],
            "edges": [{"src": r[0], "dst": r[1], "kind": r[2], "weight": r[3]} for r in edges],
            "profiles": [json.loads(r[0]) for r in profiles],
            "memories": [_memory(r).model_dump(mode="json") for r in memories],
            "feedback": [json.loads(r[0]) for r in feedback],
            "traces": [json.loads(r[0]) for r in traces],
            "jobs": [{**dict(zip(job_cols, r)), "payload": json.loads(r[3])} for r in jobs],
        }

    def forget_user(self, user: str) -> dict[str, int]:
        """Delete every row derived from ``user`` and bump their epoch, in one transaction that holds
        the user's lock exclusively (guarded writes in flight finish first, or see the new epoch)."""
        self._stats_cache.clear()  # the user's owners among them
        self._df_cache.clear()
        p = self._user_params(user)
        sub = self._USER_NODES
        key = self._forget_key(user)
        counts: dict[str, int] = {}
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
            for table, where, params in (
                ("edges", f"src IN ({sub}) OR dst IN ({sub})", (*p, *p)),
                ("profiles", f"node IN ({sub})", p),
                ("memories", f"owner IN ({sub})", p),
                ("nodes", f"id IN ({sub})", p),
                ("feedback", "\"user\" = %s", (user,)),
                ("traces", "\"user\" = %s", (user,)),
                ("jobs", "\"user\" = %s", (user,)),
            ):
                cur.execute(f"DELETE FROM {table} WHERE {where}", params)
                counts[table] = int(cur.rowcount)
            cur.execute("INSERT INTO forgotten (key, epoch, forgotten_at) VALUES (%s, 1, %s) ON CONFLICT (key) "
                        "DO UPDATE SET epoch = forgotten.epoch + 1, forgotten_at = excluded.forgotten_at",
                        (key, time.time()))
        return counts

    def pending_scrub(self) -> int:
        """Always 0: Postgres has no WAL file of ours to fold; deleted tuples go at the next (auto)vacuum."""
        return 0

    def scrub(self, attempts: int = 5) -> bool:
        """Nothing waits (see ``pending_scrub``)."""
        return True


class PostgresStore(_PostgresUsers):
    """``Store`` on PostgreSQL (16, with the pgvector extension) in one schema."""

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        dsn, opts = parse_url(url)
        return cls(dsn, **opts)

    # schema, tenants, copy ----------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._one("SELECT version FROM schema_version")[0])

    def for_tenant(self, tenant: str) -> PostgresStore:
        """The tenant's own store: a schema of its own in the same database (``NAME.tenant-acme``)."""
        name = f"{self.schema}.tenant-{tenant}"
        if len(name.encode()) > 63:
            name = f"{self.schema[:20]}.tenant-{hashlib.sha256(tenant.encode()).hexdigest()[:24]}"
        return PostgresStore(self.dsn, schema=name, pool_min=self._pool_opts["pool_min"],  # type: ignore[arg-type]
                             pool_max=self._pool_opts["pool_max"],  # type: ignore[arg-type]
                             pool_timeout_s=self._pool_opts["pool_timeout_s"])

    def dump_table(self, table: str) -> Iterator[dict[str, Any]]:
        if table not in COPY_TABLES:
            raise StoreError(f"unknown table {table!r}", hint=f"one of {', '.join(COPY_TABLES)}")
        cols = _COLUMNS[table]
        rows = self._rows(f"SELECT {', '.join(_ident(c) for c in cols)} FROM {table} ORDER BY {_ORDER[table]}")
        for r in rows:
            row = dict(zip(cols, r))
            if table == "memories" and row["embedding"] is not None:
                row["embedding"] = _vec(row["embedding"]).tolist()
            yield row

    def load_table(self, table: str, rows: Iterable[dict[str, Any]]) -> int:
        if table not in COPY_TABLES:
            raise StoreError(f"unknown table {table!r}", hint=f"one of {', '.join(COPY_TABLES)}")
        cols = _COLUMNS[table]
        extra = ("index_text",) if table == "memories" else ()
        names = ", ".join(_ident(c) for c in (*cols, *extra))
        marks = ", ".join("%s" for _ in (*cols, *extra))
        conflict = " ON CONFLICT (key) DO UPDATE SET value = excluded.value" if table == "store_meta" else ""
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            values = [row.get(c) for c in cols]
            if table == "memories":
                emb = row.get("embedding")
                values[cols.index("embedding")] = None if emb is None else np.asarray(emb, dtype=np.float32)
                meta = json.loads(row["meta"]) if isinstance(row["meta"], str) else row["meta"]
                values.append(str(meta.get("index_text") or row["text"]))
            batch.append(tuple(values))
        with self._tx() as cur:
            rebuild = False
            if table == "memories" and len(batch) > 1000:
                cur.execute("SELECT NOT EXISTS (SELECT 1 FROM memories)")
                row = cur.fetchone()
                # into an empty table: build the HNSW graph once at the end, not one insert at a time
                rebuild = bool(row and row[0])
                if rebuild:
                    cur.execute("DROP INDEX memories_hnsw")
            if batch and not conflict:
                with cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    for row_values in batch:
                        copy.write_row(row_values)
            elif batch:
                cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks}){conflict}", batch)
            if rebuild:
                # The graph is built in memory when it fits (pgvector's advice for bulk loads); with the
                # 64 MB default a large copy falls back to a much slower build on disk.
                cur.execute("SET LOCAL maintenance_work_mem = '1GB'")
                cur.execute(HNSW_INDEX)
            if table == "feedback":  # new events continue after the copied sequence numbers
                cur.execute("SELECT setval(pg_get_serial_sequence('feedback', 'seq'), "
                            "GREATEST((SELECT MAX(seq) FROM feedback), 1))")
        if table == "store_meta":
            self._salt = str(self._one("SELECT value FROM store_meta WHERE key = 'forget_salt'")[0])
        return len(batch)

    def drop_schema(self) -> None:
        """Remove this store's schema and everything in it (tests, a deleted tenant)."""
        with self._tx() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {_ident(self.schema)} CASCADE")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({redact_dsn(self.dsn)!r}, schema={self.schema!r})"


def _vec(value: Any) -> np.ndarray:
    """A pgvector value as float32 numpy (the loader gives ``pgvector.Vector`` or an array)."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy is not None else value, dtype=np.float32)


def _node(row: Sequence[Any]) -> Node:
    return Node(id=row[0], kind=row[1], created_at=row[2], meta=json.loads(row[3]))


def _memory(row: Sequence[Any]) -> Memory:
    emb = row[9]
    return Memory(id=row[0], owner=row[1], kind=row[2], text=row[3], polarity=row[4],
                  provenance=json.loads(row[5]), created_at=row[6], updated_at=row[7], superseded_by=row[8],
                  embedding=None if emb is None else _vec(emb).tolist(),
                  meta=json.loads(row[10]))


__all__ = ["DEFAULT_SCHEMA", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "parse_url", "redact_dsn"]
