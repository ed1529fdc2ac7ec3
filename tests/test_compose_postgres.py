"""deploy/compose-postgres.yml (the scale-out layout), checked without Docker: it parses; Postgres is the
pgvector image; `db migrate` runs once before the replicas and the worker start; N `serve --no-jobs`
replicas behind one published port (nginx, its config naming the replicas' service and port); one
`worker`; every command is a real CLI subcommand with flags its ``--help`` lists; the mounted config
validates as a Postgres config that leaves jobs to the worker, with every secret from the environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from persona_mw.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose-postgres.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # (merge keys `<<:` resolved by PyYAML)
    return data


def argv_of(service: dict[str, Any]) -> list[str]:
    """The container's command line: entrypoint (the image's `persona-mw serve` unless overridden) + command."""
    entry = service.get("entrypoint", ["persona-mw", "serve"])
    return [*entry, *service.get("command", [])]


def _help(words: list[str]) -> str:
    r = subprocess.run([sys.executable, "-m", "persona_mw.cli", *words, "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_services_and_their_order() -> None:
    s = compose()["services"]
    assert set(s) == {"postgres", "migrate", "persona", "worker", "lb"}
    assert s["postgres"]["image"] == "pgvector/pgvector:pg16"
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["migrate"]["restart"] == "no"
    for name in ("persona", "worker"):
        assert s[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["migrate"]["build"]["context"] == ".." and (ROOT / s["migrate"]["build"]["dockerfile"]).is_file()
    images = {s[n]["image"] for n in ("migrate", "persona", "worker")}
    assert images == {"persona-mw:latest"}  # built once (by migrate), the same image everywhere
    replicas = str(s["persona"]["deploy"]["replicas"])
    assert re.fullmatch(r"\$\{PERSONA_MW_REPLICAS:-[2-9]\d*\}|[2-9]\d*", replicas), replicas
    assert "ports" not in s["persona"] and "ports" not in s["worker"]  # only the balancer publishes one


@pytest.mark.parametrize("service", ["migrate", "persona", "worker"])
def test_commands_are_real_cli_commands_with_flags_their_help_lists(service: str) -> None:
    argv = argv_of(compose()["services"][service])
    assert argv[0] == "persona-mw"
    args = build_parser().parse_args(argv[1:])  # the CLI accepts it as written
    want = {"migrate": ("db", "cmd_db"), "persona": ("serve", "cmd_serve"), "worker": ("worker", "cmd_worker")}
    assert (args.command, args.func.__name__) == want[service]
    words = [w for w in argv[1:] if not w.startswith("-")][:1]
    helptext = _help(words)
    for flag in (w for w in argv[1:] if w.startswith("--")):
        assert flag in helptext, (service, flag)
    if service == "migrate":
        assert args.action == "migrate" and "migrate" in helptext
    if service == "persona":
        assert args.no_jobs is True and args.host == "0.0.0.0"


def test_one_port_in_front_of_the_replicas() -> None:
    s = compose()["services"]
    port = build_parser().parse_args(argv_of(s["persona"])[1:]).port
    assert [str(p) for p in s["persona"]["expose"]] == [str(port)]
    assert [str(p) for p in s["lb"]["ports"]] == [f"{port}:{port}"]
    host, _, inside = next(v for v in s["lb"]["volumes"] if "nginx" in v).partition(":")
    conf = (COMPOSE.parent / host).read_text()
    assert f"listen {port};" in conf
    assert re.search(rf"http://persona:{port}\b", conf)  # the service name Docker's DNS resolves to every replica
    assert "resolver 127.0.0.11" in conf


def test_the_mounted_config_is_postgres_with_jobs_left_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    s = compose()["services"]
    env = s["persona"]["environment"]
    assert env == s["worker"]["environment"] == s["migrate"]["environment"]
    host_dir, _, inside = s["persona"]["volumes"][0].partition(":")
    inside = inside.removesuffix(":ro")
    config_path = Path(env["PERSONA_MW_CONFIG"])
    assert str(config_path.parent) == inside
    local = (COMPOSE.parent / host_dir / config_path.name).resolve()
    assert local.is_file()
    for name, value in env.items():  # secrets only from the environment, never written here
        if re.search(r"(?i)key|secret|token|password|dsn", name):
            assert "${" in str(value), (name, value)
    assert "${PERSONA_MW_PG_PASSWORD" in env["PERSONA_MW_DSN"] and "@postgres:5432/" in env["PERSONA_MW_DSN"]
    for name in ("PERSONA_MW_UPSTREAM_BASE", "PERSONA_MW_UPSTREAM_MODEL", "PERSONA_MW_UPSTREAM_KEY",
                 "PERSONA_MW_DSN", "PERSONA_MW_KEY_DEFAULT"):
        monkeypatch.setenv(name, "postgresql://u:p@postgres:5432/persona" if name.endswith("DSN") else "x" * 12)
    from persona_mw.config import load_config

    cfg = load_config(local)
    assert cfg.store.type == "postgres" and cfg.store.migrate is False
    assert cfg.server.run_jobs is False and cfg.server.api_keys
    assert cfg.backend.type == "litellm"


def test_no_secrets_written_in_the_deploy_files() -> None:
    from tests.test_containers import SECRET

    for path in (COMPOSE, COMPOSE.parent / "nginx-persona.conf", ROOT / "config" / "persona-postgres.yaml"):
        for line in path.read_text().splitlines():
            # a value that is all ``${VAR}`` comes from the environment (POSTGRES_PASSWORD: ${...})
            if re.fullmatch(r"\s*[A-Za-z0-9_]+:\s*\$\{[A-Z0-9_]+(:[?-][^}]*)?\}\s*", line):
                continue
            assert not SECRET.search(line), (path, line)
