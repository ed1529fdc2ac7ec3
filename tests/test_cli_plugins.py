"""The CLI names no plugin: plugins add their part of ``profile show`` through ``persona_profile_report``."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from persona_mw import manager
from persona_mw.cli import main
from persona_mw.manager import hookimpl

ROOT = Path(__file__).resolve().parents[1]


@hookimpl
def persona_profile_report(user: str, profiles: dict[str, Any]) -> dict[str, Any] | None:
    # Module-level hookimpl: registered by the test below as one of the host's default modules.
    if user != "ana":
        return None
    stated = profiles["user:ana"]["stated"]
    return {"shout": {"user:ana": [s["text"].upper() for s in stated]}}


def test_cli_imports_no_plugin() -> None:
    tree = ast.parse((ROOT / "persona_mw" / "cli.py").read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("persona_mw.plugins", "plugins"))], imported


def test_a_plugin_adds_its_section_to_profile_show(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, store_url) -> None:
    monkeypatch.setattr(manager, "DEFAULT_PLUGINS", (*manager.DEFAULT_PLUGINS, __name__))
    db = store_url()
    for user in ("ana", "bob"):
        assert main(["feedback", "--store", db, "--user", user, "--stated", "Be brief."]) == 0
    capsys.readouterr()
    assert main(["profile", "show", "ana", "--store", db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["shout"] == {"user:ana": ["BE BRIEF."]}
    assert shown["profiles"]["user:ana"]["stated"][0]["text"] == "Be brief."  # the profile itself is all there
    assert main(["profile", "show", "bob", "--store", db]) == 0
    assert "shout" not in json.loads(capsys.readouterr().out)  # None: nothing added
