"""A forget run by another process is seen at once: the memory manager's in-process cache of a user
(index, records) is checked against the store's per-user forget epoch before each use, so a second
Middleware on the same store (another server, the CLI) forgetting a user leaves nothing served or
written back from the first one's cache."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


FACTS = ["I live in Lisbon with my cat Miso", "My favourite dish is bacalhau", "I work as a nurse at night"]


def _two(url: str) -> tuple[Any, Any]:
    from persona_mw import Middleware, parse_config
    from persona_mw.testing import ScriptedBackend

    cfg = "pipeline: [{use: memory, embedder: false}]\n"
    a = Middleware(parse_config(cfg), store=url, backend=ScriptedBackend(), autoload=False)
    b = Middleware(parse_config(cfg), store=url, backend=ScriptedBackend(), autoload=False)
    return a, b


def _check_forget_seen(a: Any, forget: Any) -> None:
    a.memory.ingest("ana", [{"role": "user", "content": f} for f in FACTS])
    assert a.memory.search("ana", "where does ana live", k=5), "the cache must hold ana's memories first"
    forget()
    assert a.store.list_memories("user:ana") == []
    # The first process still has ana's entries cached: they must be neither served nor written back.
    assert a.memory.search("ana", "where does ana live", k=5) == []
    assert a.memory.pinned("ana") == [] or all("Lisbon" not in str(m) for m in a.memory.pinned("ana"))
    a.memory.ingest("ana", [{"role": "user", "content": FACTS[0]}])  # a duplicate of a forgotten memory
    texts = [m.text for m in a.store.list_memories("user:ana")]
    assert not any("bacalhau" in t or "nurse" in t for t in texts), texts
    assert [m.text for m in a.memory.search("ana", "favourite dish", k=5) if "bacalhau" in m.memory.text] == []


def test_forget_by_a_second_middleware_on_one_sqlite_file(tmp_path: Any) -> None:
    # one of a pair: this one SQLite, the next one Postgres, under any PERSONA_MW_TEST_STORE
    a, b = _two(str(tmp_path / "shared.db"))
    try:
        _check_forget_seen(a, lambda: b.forget("ana"))
    finally:
        a.close()
        b.close()


def test_forget_by_a_second_middleware_on_one_postgres(pg_server: str) -> None:
    from tests.conftest import fresh_pg_url

    a, b = _two(fresh_pg_url(pg_server))
    try:
        _check_forget_seen(a, lambda: b.forget("ana"))
    finally:
        a.close()
        b.close()


def test_cli_profile_forget_is_seen_by_a_running_middleware(tmp_path: Any, store_url: Any) -> None:
    db = store_url()
    a, b = _two(db)
    b.close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store: {{path: {json.dumps(db)}}}\npipeline: [{{use: memory, embedder: false}}]\n")

    def cli_forget() -> None:
        r = subprocess.run([sys.executable, "-m", "persona_mw.cli", "profile", "forget", "ana", "--config",
                            str(cfg), "--store", db, "--yes"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    try:
        _check_forget_seen(a, cli_forget)
    finally:
        a.close()



def test_cli_forget_is_seen_by_a_running_http_server(tmp_path: Any, store_url: Any) -> None:
    """A server on loopback has ana's memory cached; ``persona-mw profile forget`` in another process
    forgets her; the server neither answers from nor writes back the cached memory."""
    import httpx

    from persona_mw import Middleware, parse_config
    from persona_mw.server import create_app, serve_in_thread
    from persona_mw.testing import ScriptedBackend

    db = store_url()
    yaml_text = "pipeline: [{use: memory, embedder: false, mode: bm25, store_turns: true}]\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    mw = Middleware(parse_config(yaml_text), store=db, backend=ScriptedBackend(), autoload=False)

    def chat(url: str, text: str) -> str:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "user": "ana",
                                                           "messages": [{"role": "user", "content": text}]},
                       timeout=60)
        assert r.status_code == 200, r.text
        mw.drain()
        return str(r.json()["choices"][0]["message"]["content"])

    try:
        with serve_in_thread(create_app(mw)) as url:
            chat(url, "my locker code is qxlockerzz")
            assert "qxlockerzz" in chat(url, "what is my locker code?")  # served from the cache
            r = subprocess.run([sys.executable, "-m", "persona_mw.cli", "profile", "forget", "ana", "--config",
                                str(cfg), "--store", db, "--yes"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert "qxlockerzz" not in chat(url, "what is my locker code?")
        assert not any("qxlockerzz" in m.text for m in mw.store.list_memories("user:ana"))
    finally:
        mw.close()
