"""Every example runs: the YAML pipelines, the Python script, the third-party plugin, the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona_mw import Middleware, load_config, parse_config
from persona_mw.testing import ScriptedBackend

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_every_yaml_example_builds(monkeypatch, tmp_path, store_url):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    for path in EXAMPLES.glob("*.yaml"):
        cfg = load_config(path)
        cfg.store.path = store_url()
        # the pipeline and the backend section must be valid; the scripted backend avoids loading a model
        mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
        mw.make_backend("backend")
        mw.close()


def test_third_party_plugin_through_entry_point(tmp_path, store_url):
    """examples/persona_mw_shout is installed as a package; `use: shout` finds it by entry point."""
    cfg = parse_config("pipeline:\n  - use: stated\n  - use: shout\n")
    cfg.store.path = store_url()
    with Middleware(cfg, backend=ScriptedBackend(script=lambda m: "hello there")) as mw:
        mw.feedback(kind="stated", user="ana", text="Please shout at me.")
        assert mw.chat(user="ana", messages="hi").text == "HELLO THERE"
        assert mw.chat(user="bob", messages="hi").text == "hello there"
    cfg2 = parse_config("pipeline:\n  - use: shout\n")
    cfg2.store.path = store_url()
    with pytest.raises(Exception, match="unknown plugin 'shout'"):
        Middleware(cfg2, backend=ScriptedBackend(), autoload=False)


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, store_url):
    r = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), "--store", store_url(),
                        "--max-new-tokens", "24"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--- zoe:" in r.stdout and "--- sam:" in r.stdout
    assert "Mention the protein content" in r.stdout or "group:dietitians" in r.stdout
    assert "Answer in one short sentence." in r.stdout


@pytest.mark.slow
def test_demo_two_users_two_answers():
    # `persona-mw demo` takes no --store: it shows the embedded default (a SQLite file in a temp folder)
    r = subprocess.run([sys.executable, "-m", "persona_mw.cli", "demo"], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    answers = [line[3:] for line in r.stdout.splitlines() if line.startswith("A: ")]
    assert len(answers) == 2 and answers[0] != answers[1] and all(answers)
    # the short-answer user gets a shorter answer than the detailed one
    assert len(answers[0].split()) < len(answers[1].split())
    assert r.stdout.count("trace trace-") == 2 and "granularity=" in r.stdout and "persona_rewrite" in r.stdout
