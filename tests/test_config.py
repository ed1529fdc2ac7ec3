"""Config: strict validation with file:line errors, $env secrets, plugin sections, declared groups."""

from __future__ import annotations

import json

import pytest

from persona_mw import ConfigError, Middleware, load_config, parse_config
from persona_mw.testing import ScriptedBackend


def write(tmp_path, text, name="pipeline.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "pipeline:\n  - use: stated\n   placement: [oops\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert f"{p}:" in str(ei.value) and "malformed YAML" in str(ei.value)


def test_unknown_top_level_field_suggests_fix(tmp_path):
    p = write(tmp_path, "backend: {type: transformers}\npipline: []\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert f"{p}:2" in msg and "pipline" in msg and "did you mean 'pipeline'" in msg


def test_wrong_type_names_field_and_line(tmp_path):
    p = write(tmp_path, "graph:\n  prior_strength: lots\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert f"{p}:2" in str(ei.value) and "graph.prior_strength" in str(ei.value)


def test_unknown_plugin_suggests_closest(tmp_path, store_url):
    p = write(tmp_path, f"store: {{path: {json.dumps(store_url())}}}\n" "pipeline:\n  - use: stated\n  - use: statd\n")
    with pytest.raises(ConfigError) as ei:
        Middleware(load_config(p), backend=ScriptedBackend(), autoload=False)
    msg = str(ei.value)
    assert f"{p}:4" in msg and "unknown plugin 'statd'" in msg and "did you mean 'stated'" in msg


def test_plugin_section_is_validated_by_its_own_model(tmp_path, store_url):
    p = write(tmp_path, f"store: {{path: {json.dumps(store_url())}}}\n" "pipeline:\n  - use: stated\n    placment: system\n")
    with pytest.raises(ConfigError) as ei:
        Middleware(load_config(p), backend=ScriptedBackend(), autoload=False)
    msg = str(ei.value)
    assert f"{p}:4" in msg and "pipeline.0.placment" in msg and "did you mean 'placement'" in msg
    p2 = write(tmp_path, f"store: {{path: {json.dumps(store_url())}}}\n" "pipeline:\n  - use: stated\n    budget_tokens: -3\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml:4: pipeline.0.budget_tokens"):
        Middleware(load_config(p2), backend=ScriptedBackend(), autoload=False)


def test_duplicate_plugin_names_refused(store_url):
    cfg = parse_config(f"store: {{path: {json.dumps(store_url())}}}\n" "pipeline:\n  - use: stated\n  - use: stated\n")
    with pytest.raises(ConfigError, match="already used"):
        Middleware(cfg, backend=ScriptedBackend(), autoload=False)


def test_env_secrets(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    cfg = parse_config("backend:\n  type: litellm\n  model: openai/x\n  api_key: {$env: MY_KEY}\n")
    assert cfg.backend.settings["api_key"] == "sk-test"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(ConfigError, match="MY_KEY.*not set"):
        parse_config("backend:\n  type: litellm\n  api_key: {$env: MY_KEY}\n", "c.yaml")


def test_unknown_backend_type(store_url):
    cfg = parse_config(f"store: {{path: {json.dumps(store_url())}}}\n" "backend: {type: nope}\n")
    with pytest.raises(ConfigError, match="unknown backend type 'nope'"):
        Middleware(cfg, autoload=False)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_declared_group_preferences_reach_new_member(make_mw):
    mw = make_mw("""
pipeline: [{use: stated}]
graph:
  groups:
    acme: {stated: ["Use British spelling", {text: "jargon", polarity: avoid}], members: [zoe]}
""")
    r = mw.chat(user="zoe", messages="hello")
    assert '"Use British spelling"' in r.text and 'Avoid: "jargon"' in r.text
    assert any(n.startswith("group:acme") for n in r.trace.evidence)
    # a request may declare the group too
    r2 = mw.chat(user="yan", groups=["acme"], messages="hello")
    assert "Use British spelling" in r2.text


def test_a_config_error_at_startup_closes_the_store_it_opened(store_url, monkeypatch):
    """Middleware opened the store, then a config error stopped it: the store stayed open (on Postgres a
    pool of connections, per failed start). A store object the caller passed stays the caller's."""
    import persona_mw.middleware as middleware
    from persona_mw.errors import StoreError
    from persona_mw.store import open_store

    opened = []
    monkeypatch.setattr(middleware, "open_store", lambda url: opened.append(open_store(url)) or opened[-1])
    bad = ["pipeline: [{use: shout}]\n",  # an entry-point plugin: unknown without autoload
           "privacy: {redact: [passport]}\n",  # not a detector
           "backend: {type: nope}\n"]
    for text in bad:
        with pytest.raises(ConfigError):
            Middleware(parse_config(text), store=store_url(), backend=None if "nope" in text else ScriptedBackend(),
                       autoload=False)
    assert len(opened) == len(bad)
    for store in opened:
        with pytest.raises(StoreError, match="closed"):
            store.has_user("ana")
    mine = open_store(store_url())
    with pytest.raises(ConfigError):
        Middleware(parse_config(bad[0]), store=mine, backend=ScriptedBackend(), autoload=False)
    assert not mine.has_user("ana")  # still open
    mine.close()
