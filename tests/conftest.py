"""Shared fixtures: an in-memory middleware on a scripted backend, and the real local model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


# PERSONA_MW_TEST_STORE=postgres: the default store of ``make_mw`` (and ``store_url``) is a fresh
# schema in the session's Postgres instead of a SQLite file.
TEST_STORE = os.environ.get("PERSONA_MW_TEST_STORE", "sqlite")


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 16 with pgvector, started once per session by ``pgserver`` in a temp folder.

    No skip: when Postgres cannot start, every test that needs it fails with the reason. The folder is
    not under pytest's basetemp: as root, pgserver runs initdb as its own user, and another pytest
    session resets ``/tmp/pytest-of-<user>`` to mode 0700 at any moment."""
    import tempfile

    import pgserver

    folder = tempfile.mkdtemp(prefix="persona-mw-pg-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


_schemas = iter(range(1, 1_000_000))


def fresh_pg_url(pg_uri: str, prefix: str = "t") -> str:
    """A store URL naming a schema no other test uses (``#schema=t_<pid>_<n>``)."""
    return f"{pg_uri}#schema={prefix}_{os.getpid()}_{next(_schemas)}&pool_max=4"


def _store_urls(request, folder):
    n = iter(range(1_000_000))
    if TEST_STORE == "postgres":
        uri = request.getfixturevalue("pg_server")
        return lambda: fresh_pg_url(uri)
    if TEST_STORE != "sqlite":
        raise pytest.UsageError(f"PERSONA_MW_TEST_STORE={TEST_STORE!r}: use sqlite or postgres")
    return lambda: str(folder / f"store{next(n)}.db")


def tenant_url(url: str, tenant: str) -> str:
    """The URL of ``tenant``'s own store beside the store at ``url``, as ``serve`` and ``mcp`` keep it
    (``store.for_tenant``): ``p.tenant-acme.db`` beside a SQLite file, a schema ``S.tenant-acme`` in Postgres."""
    from persona_mw.store import open_store

    with open_store(url) as base, base.for_tenant(tenant) as store:
        return store.path


def store_tables(url: str) -> dict[str, list[dict[str, object]]]:
    """Every row of every table of the store at ``url``, on either store (FTS and index tables included):
    SQLite, every table of the file; Postgres, every table of the store's schema."""
    from persona_mw.store import is_postgres_url

    if is_postgres_url(url):
        import psycopg

        from persona_mw.store.postgres import DEFAULT_SCHEMA, parse_url

        dsn, opts = parse_url(url)
        schema = opts.get("schema", DEFAULT_SCHEMA)
        from psycopg.rows import dict_row

        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as pg:
            names = [r["table_name"] for r in pg.execute("SELECT table_name FROM information_schema.tables WHERE "
                                              "table_schema = %s AND table_type = 'BASE TABLE'", (schema,))]
            return {t: list(pg.execute(f'SELECT * FROM "{schema}"."{t}"')) for t in names}
    import sqlite3

    conn = sqlite3.connect(url)
    conn.row_factory = sqlite3.Row
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [dict(r) for r in conn.execute(f'SELECT * FROM "{t}"')] for t in names}
    finally:
        conn.close()


def store_cells(url: str) -> list[tuple[str, str]]:
    """(table, cell as text) for every cell of every table of the store at ``url`` (``store_tables``): what
    a test reads to prove that nothing anywhere still holds a value. Bytes are read as latin-1."""
    return [(t, bytes(c).decode("latin-1") if isinstance(c, (bytes, memoryview)) else str(c))
            for t, rows in store_tables(url).items() for row in rows for c in row.values()]


def store_bytes(url: str) -> bytes:
    """What the store at ``url`` holds, as bytes: a SQLite store's files as they lie on disk (the file,
    its -wal and -shm: freed pages too); a Postgres store's every cell (``store_cells``), as UTF-8."""
    from pathlib import Path

    from persona_mw.store import is_postgres_url

    if is_postgres_url(url):
        return "\n".join(c for _, c in store_cells(url)).encode()
    p = Path(url)
    return b"".join(f.read_bytes() for f in sorted(p.parent.glob(p.name + "*")))


@pytest.fixture
def store_url(request, tmp_path):
    """Where a test's default store lives: a SQLite file, or (PERSONA_MW_TEST_STORE=postgres) a fresh
    Postgres schema. ``store_url()`` gives a new one at each call."""
    return _store_urls(request, tmp_path)


@pytest.fixture(scope="session")
def session_store_url(request, tmp_path_factory):
    """``store_url`` for fixtures wider than one test (module- or session-scoped middlewares)."""
    return _store_urls(request, tmp_path_factory.mktemp("stores"))


@pytest.fixture
def make_mw(store_url):
    """Build a Middleware from YAML text on a real store (SQLite file, or Postgres, see TEST_STORE) and
    a scripted backend."""
    from persona_mw import Middleware, parse_config
    from persona_mw.testing import ScriptedBackend

    made = []

    def make(yaml_text: str = "", backend=None, plugins=None, db: str | None = None):
        cfg = parse_config(yaml_text or "{}")
        cfg.store.path = db or store_url()
        mw = Middleware(cfg, backend=backend or ScriptedBackend(), plugins=plugins, autoload=False)
        made.append(mw)
        return mw

    yield make
    for mw in made:
        if not mw.closed:
            mw.close()


@pytest.fixture(scope="session")
def local_backend():
    """The real packaged SmolLM2-135M-Instruct, loaded once per test session."""
    from persona_mw.adapters.transformers import TransformersBackend

    return TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=48)
