"""Fuzzed inputs through a pipeline that learns (issue #17): the ``memory`` plugin with after-turn jobs
on, over HTTP on loopback and through the Python API, on the scripted backend (``fuzz_memory``) or the
real local model (``fuzz_model``). Besides "never a 5xx / traceback / broken stream", every after-turn
job must finish (none left pending or failed) and every user the fuzz created must still export."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .fuzz import fuzz_http, fuzz_python

MEMORY_PIPELINE = ("pipeline:\n  - use: stated\n  - use: memory\n    embedder: false\n    mode: bm25\n"
                   "    store_turns: true\nprivacy: {redact: [email, phone, card]}\n")


def _memory_mw(db: Path | str, backend: Any) -> Any:
    from persona_mw import Middleware, parse_config

    cfg = parse_config(MEMORY_PIPELINE)
    cfg.store.path = str(db)
    mw = Middleware(cfg, backend=backend, autoload=False)
    mw.feedback(kind="stated", user="ana", text="Be brief.")
    return mw


def _after_checks(mw: Any, client: Any, url: str) -> dict[str, Any]:
    """After the fuzz: background jobs drained and none left; every stored user exports (no 5xx)."""
    mw.drain(timeout=300)
    jobs = mw.store.list_jobs()
    users = [n.id.removeprefix("user:") for n in mw.store.list_nodes("user", limit=100_000)]
    export_bad = []
    turns = 0
    for user in users:
        r = client.get(f"{url}/v1/users/{user}")
        if r.status_code != 200:
            export_bad.append(f"GET /v1/users/{user}: {r.status_code} {r.text[:200]}")
        else:
            turns += len(r.json()["traces"])
    return {"jobs_left": len(jobs), "job_errors": [j.get("last_error") for j in jobs][:5],
            "users": len(users), "turns_answered": turns, "export_bad": export_bad}


def fuzz_memory(root: Path, n: int, seed: int = 0, http_share: float = 0.7, url: str | None = None) -> dict[str, Any]:
    """``n`` fuzzed requests (``http_share`` over HTTP, the rest through the Python API) through a
    memory-enabled pipeline on the scripted backend, on the store at ``url`` (default: a SQLite file in ``root``)."""
    import httpx

    from persona_mw.server import create_app, serve_in_thread
    from persona_mw.testing import ScriptedBackend

    mw = _memory_mw(url or root / "fuzz-memory.db", ScriptedBackend())
    rng = random.Random(seed)
    n_http = int(n * http_share)
    try:
        with serve_in_thread(create_app(mw, max_body_bytes=64 * 1024)) as url, httpx.Client(timeout=60) as client:
            fh = fuzz_http(client, url, rng, n_http)
            fp = fuzz_python(mw, rng, n - n_http)
            after = _after_checks(mw, client, url)
    finally:
        mw.close()
    return {"tried": n, "http": fh["tried"], "python": fp["tried"], "bad": fh["bad"] + fp["bad"], **after}


def fuzz_model(root: Path, n: int, seed: int = 0, backend: Any = None, max_new_tokens: int = 8,
               url: str | None = None) -> dict[str, Any]:
    """``n`` fuzzed HTTP requests through a memory-enabled pipeline on the real local model (answers
    capped at ``max_new_tokens``: the point is the inputs, not the text)."""
    import httpx

    from persona_mw.server import create_app, serve_in_thread

    if backend is None:
        from persona_mw.adapters.transformers import TransformersBackend

        backend = TransformersBackend(model="smollm2-135m-instruct", max_new_tokens=max_new_tokens)
    mw = _memory_mw(url or root / "fuzz-model.db", backend)
    rng = random.Random(seed)
    try:
        with serve_in_thread(create_app(mw, max_body_bytes=64 * 1024)) as url, httpx.Client(timeout=300) as client:
            # Mostly well-formed chats with one hostile value, so most reach the model.
            fh = fuzz_http(client, url, rng, n, chat=0.8, hostile=0.9)
            after = _after_checks(mw, client, url)
    finally:
        mw.close()
    return {"tried": n, "bad": fh["bad"], **after}


def ok(result: dict[str, Any]) -> bool:
    return not (result["bad"] or result["jobs_left"] or result["export_bad"])
