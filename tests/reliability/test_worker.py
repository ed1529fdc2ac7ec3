"""``persona-mw worker``: a server started with ``--no-jobs`` (``Middleware(run_jobs=False)``) records
after-turn jobs unclaimed; a separate worker process claims and runs them (memory extraction here);
a worker killed with SIGKILL while holding a job leaves it to the next worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

CONFIG = "pipeline: [{use: memory, embedder: false}]\n"


def _worker(cfg: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "persona_mw.cli", "worker", "--config", str(cfg), "--store", url,
                           "--once", "--poll", "0.1", *extra], capture_output=True, text=True, timeout=420)


def _server_side(url: str) -> Any:
    from persona_mw import Middleware, parse_config
    from persona_mw.testing import ScriptedBackend

    return Middleware(parse_config(CONFIG), store=url, backend=ScriptedBackend(), autoload=False, run_jobs=False)


def _url(kind: str, tmp_path: Path, request: Any) -> str:
    if kind == "sqlite":
        return str(tmp_path / "shared.db")
    from tests.conftest import fresh_pg_url

    return fresh_pg_url(request.getfixturevalue("pg_server"))


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_no_jobs_server_leaves_after_turn_jobs_to_a_worker(kind: str, tmp_path: Path, request: Any) -> None:
    url = _url(kind, tmp_path, request)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    mw = _server_side(url)
    try:
        mw.chat(user="ana", messages="I moved to Porto last spring and I keep bees")
        mw.drain()
        (job,) = mw.store.list_jobs("ana")
        assert job["claimed_by"] is None and job["attempts"] == 0
        assert mw.store.list_memories("user:ana") == []  # this process did not run it
        r = _worker(cfg, url)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"jobs_run": 1}
        assert mw.store.list_jobs("ana") == []
        assert any("Porto" in m.text for m in mw.store.list_memories("user:ana"))
    finally:
        mw.close()


HOLDER = textwrap.dedent("""
    import sys, time
    from persona_mw.store import open_store
    store = open_store(sys.argv[1])
    jobs = store.claim_jobs(0.0, 5)
    print(len(jobs), flush=True)
    for _ in range(600):  # "running" the job, renewing the lease as a live worker's maintenance thread does
        store.heartbeat()
        time.sleep(1)
""")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_worker_killed_mid_job_leaves_it_to_another(kind: str, tmp_path: Path, request: Any) -> None:
    url = _url(kind, tmp_path, request)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    mw = _server_side(url)
    try:
        mw.chat(user="bob", messages="My sister Ines is a violinist in Vienna")
        mw.drain()
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
            (job,) = mw.store.list_jobs("bob")
            assert job["claimed_by"] is not None
            # While the holder lives, another worker leaves its job alone.
            r = _worker(cfg, url, "--stale-after", "300")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout.strip().splitlines()[-1]) == {"jobs_run": 0}
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(30)
        time.sleep(0.2)
        r = _worker(cfg, url)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"jobs_run": 1}
        assert mw.store.list_jobs("bob") == []
        assert any("Vienna" in m.text for m in mw.store.list_memories("user:bob"))
    finally:
        mw.close()


def test_tenant_middlewares_inherit_no_jobs(store_url: Any) -> None:
    """``serve --no-jobs`` (``Middleware(run_jobs=False)``): a tenant's Middleware, built by the server for
    an API key, leaves its after-turn jobs to the worker too (it used to run them itself)."""
    from persona_mw.testing import ScriptedBackend

    from persona_mw import Middleware, parse_config

    mw = Middleware(parse_config(CONFIG), store=store_url(), backend=ScriptedBackend(),
                    autoload=False, run_jobs=False)
    tenant = mw.for_tenant("acme")
    try:
        assert tenant.jobs.run_here is False
        tenant.chat(user="ana", messages="I moved to Porto last spring and I keep bees")
        tenant.drain()
        (job,) = tenant.store.list_jobs("ana")
        assert job["claimed_by"] is None and job["attempts"] == 0
        assert tenant.store.list_memories("user:ana") == []
    finally:
        tenant.close()
        mw.close()


TENANT_CONFIG = "server: {run_jobs: false, api_keys: {acme: [key-acme-0123456789]}}\n" + CONFIG


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_config_run_jobs_false_and_the_worker_runs_tenant_jobs(kind: str, tmp_path: Path, request: Any) -> None:
    """``server: {run_jobs: false}`` does what ``--no-jobs`` does (no CLI flag needed), for the base store
    and the tenants' stores; ``persona-mw worker`` with the same config runs the jobs of both (the
    tenants of ``server.api_keys``), whatever ``run_jobs`` says."""
    from persona_mw.testing import ScriptedBackend

    from persona_mw import Middleware, parse_config

    url = _url(kind, tmp_path, request)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TENANT_CONFIG)
    mw = Middleware(parse_config(TENANT_CONFIG), store=url, backend=ScriptedBackend(), autoload=False)
    tenant = mw.for_tenant("acme")
    try:
        assert mw.jobs.run_here is False and tenant.jobs.run_here is False
        mw.chat(user="ana", messages="My sister Ines is a violinist in Vienna")
        tenant.chat(user="ana", messages="I moved to Porto last spring and I keep bees")
        for m in (mw, tenant):
            m.drain()
            (job,) = m.store.list_jobs("ana")
            assert job["claimed_by"] is None
        r = _worker(cfg, url)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"jobs_run": 2}
        assert mw.store.list_jobs() == [] and tenant.store.list_jobs() == []
        assert any("Vienna" in m.text for m in mw.store.list_memories("user:ana"))
        assert any("Porto" in m.text for m in tenant.store.list_memories("user:ana"))
        assert not any("Porto" in m.text for m in mw.store.list_memories("user:ana"))
    finally:
        tenant.close()
        mw.close()


def test_config_run_jobs_is_validated() -> None:
    from persona_mw import parse_config
    from persona_mw.errors import ConfigError

    assert parse_config("server: {run_jobs: false}\n").server.run_jobs is False
    assert parse_config("pipeline: []\n").server.run_jobs is True
    with pytest.raises(ConfigError, match="run_jobs"):
        parse_config("server: {run_jobs: sometimes}\n")
