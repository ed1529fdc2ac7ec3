"""The CLI: clear one-line errors (no tracebacks), and the commands that need no model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from persona_mw.cli import main


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "persona_mw.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_config_validate_ok_and_errors(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("pipeline:\n  - use: stated\n")
    r = run_cli("config", "validate", str(ok))
    assert r.returncode == 0 and "ok (1 plugin(s): stated)" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  - use: stated\n    placement: sideways\n")
    r = run_cli("config", "validate", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}:3" in r.stderr and "placement" in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("pipeline: [\n")
    r = run_cli("config", "validate", str(broken))
    assert r.returncode == 2 and "malformed YAML" in r.stderr and "Traceback" not in r.stderr


def test_unknown_user_profile_show_is_clear(tmp_path, capsys, store_url):
    db = store_url()
    assert main(["feedback", "--store", db, "--user", "ana", "--stated", "Be brief."]) == 0
    capsys.readouterr()
    assert main(["profile", "show", "nobody", "--store", db]) == 2
    err = capsys.readouterr().err
    assert "unknown user 'nobody'" in err and "Traceback" not in err
    # nothing already stored was lost
    assert main(["profile", "show", "ana", "--store", db]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profiles"]["user:ana"]["stated"][0]["text"] == "Be brief."


def test_profile_export_and_forget(tmp_path, capsys, store_url):
    db = store_url()
    main(["feedback", "--store", db, "--user", "ana", "--avoid", "emojis"])
    main(["feedback", "--store", db, "--user", "bob", "--stated", "Use metric units."])
    capsys.readouterr()
    out = tmp_path / "ana.json"
    assert main(["profile", "export", "ana", "--store", db, "--out", str(out)]) == 0
    exported = json.loads(out.read_text())
    assert exported["feedback"][0]["polarity"] == "avoid"
    assert main(["profile", "forget", "ana", "--store", db]) == 0
    capsys.readouterr()
    assert main(["profile", "show", "ana", "--store", db]) == 2
    assert main(["profile", "show", "bob", "--store", db]) == 0


def test_bad_feedback_is_refused_and_nothing_stored(tmp_path, capsys, store_url):
    db = store_url()
    assert main(["feedback", "--store", db, "--user", "ana", "--json", '{"kind": "choice", "prompt": "p"}']) == 2
    err = capsys.readouterr().err
    assert "invalid feedback" in err and "chosen" in err
    assert main(["feedback", "--store", db, "--user", "ana", "--json", "{not json"]) == 2
    assert main(["profile", "show", "ana", "--store", db]) == 2  # nothing was stored


def test_plugins_lists_builtins_and_entry_point_plugin():
    r = run_cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(row["kind"], row["name"]): row for row in json.loads(r.stdout)}
    assert ("plugin", "stated") in rows
    assert rows[("plugin", "stated")]["hooks"] == ["persona_gather", "persona_rewrite"]
    assert ("backend", "transformers") in rows and ("backend", "litellm") in rows
    # the example third-party package, installed through its entry point
    assert ("plugin", "shout") in rows and rows[("plugin", "shout")]["version"] == "0.1.0"
    r = run_cli("plugins", env_extra={"PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "shout" not in r.stdout and "stated" in r.stdout


def test_no_command_prints_help():
    r = run_cli()
    assert r.returncode == 2 and "demo" in r.stdout


@pytest.mark.slow
def test_chat_with_local_model(tmp_path, store_url):
    db = store_url()
    r = run_cli("feedback", "--store", db, "--user", "ana", "--stated", "Answer in one short sentence.")
    assert r.returncode == 0, r.stderr
    r = run_cli("chat", "--store", db, "--user", "ana", "--trace", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "persona_rewrite" in r.stderr and "granularity=" in r.stderr


def test_graph_show_and_graphml_export(tmp_path, capsys, store_url):
    import networkx as nx

    cfg = tmp_path / "g.yaml"
    cfg.write_text("graph:\n  groups:\n    acme: {stated: ['Be formal.'], members: [ana, bob]}\n")
    db = store_url()
    assert main(["feedback", "--config", str(cfg), "--store", db, "--user", "ana", "--stated", "Be brief."]) == 0
    capsys.readouterr()
    assert main(["graph", "show", "ana", "--config", str(cfg), "--store", db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"user:ana", "group:acme", "global"} <= {n["id"] for n in shown["nodes"]}
    out = tmp_path / "g.graphml"
    assert main(["graph", "export", "--config", str(cfg), "--store", db, "--out", str(out)]) == 0
    g = nx.read_graphml(out)
    assert g.has_edge("user:ana", "group:acme") and g.has_edge("user:bob", "group:acme")
    assert g.nodes["user:ana"]["evidence"] == 1 and g.nodes["group:acme"]["kind"] == "group"
    assert main(["graph", "show", "--store", db]) == 2


def test_graph_join_and_leave(tmp_path, capsys, store_url):
    db = store_url()
    assert main(["graph", "join", "ana", "crew", "--store", db]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == ["crew"]
    assert main(["graph", "show", "ana", "--store", db]) == 0
    assert "group:crew" in {n["id"] for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert main(["graph", "leave", "ana", "crew", "--store", db]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["groups"] == [] and out["changed"] is True
    assert main(["graph", "join", "ana", "--store", db]) == 2  # no group: a clear error, no traceback
    assert main(["graph", "join", "ana", "bad:id", "--store", db]) == 2
