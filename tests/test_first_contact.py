"""Issue #16 "First contact": what a new user hits first, run as documented (real store, real CLI)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time

import pytest

from persona_mw import Middleware
from persona_mw.cli import build_parser, main
from persona_mw.config import Config, parse_config
from persona_mw.errors import RequestError
from persona_mw.testing import ScriptedBackend

ANA = "Answer in one short sentence."
BEN = "Explain step by step in detail, for a complete beginner, with an everyday example."


def _words(text: str) -> int:
    return len(text.split())


# -- the newcomer path: the README snippet, real local model -----------------------------------


@pytest.fixture(scope="module")
def readme_mw(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PERSONA_MW_HOME", str(home))  # where Middleware() puts its store
    # SQLite on purpose under any PERSONA_MW_TEST_STORE: this is the README's embedded default
    mw = Middleware()  # as the README writes it: the embedded default
    yield mw
    mw.close()
    mp.undo()


def test_readme_snippet_two_users_differ_in_the_stated_direction(readme_mw):
    mw = readme_mw
    from importlib import resources

    default = parse_config(resources.files("persona_mw").joinpath("default.yaml").read_text(), "default.yaml")
    assert default.pipeline  # the embedded default personalizes ...
    assert [p.name for p in mw.host.pipeline] == [p.instance_name for p in default.pipeline]  # ... and is Middleware()'s
    mw.feedback(kind="stated", user="ana", text=ANA)
    mw.feedback(kind="stated", user="ben", text=BEN)
    q = [{"role": "user", "content": "How does a refrigerator keep food cold?"}]
    ana = mw.chat(user="ana", messages=q, max_tokens=80)
    ben = mw.chat(user="ben", messages=q, max_tokens=80)
    assert ana.text != ben.text
    # ana asked for one short sentence, ben for a detailed step-by-step answer
    assert _words(ana.text) < _words(ben.text), (ana.text, ben.text)
    assert ana.choices[0].finish_reason == "stop"
    for r, pref in ((ana, ANA), (ben, BEN)):
        assert any(i["text"] == pref for i in r.trace.items_used)
        assert pref in r.messages[-1].text
        # one stated preference of the user's own shaped the answer: that is the granularity
        assert r.trace.granularity == "user"
        rendered = r.trace.render()
        assert pref[:20] in rendered and "memorie(s)" not in rendered


def test_max_tokens_at_the_top_level_and_truncation_flagged(readme_mw):
    r = readme_mw.chat(user="ana", messages="Tell me a long story about a dragon.", max_tokens=6)
    assert r.usage.completion_tokens <= 6
    assert r.choices[0].finish_reason == "length"
    assert any(f.startswith("truncated: finish_reason=length (max_tokens=6)") for f in r.trace.flags)
    assert "truncated" in r.trace.render()


def test_cli_chat_says_when_the_answer_was_cut(readme_mw, tmp_path, capsys, store_url):
    # the weights are already loaded in this process (readme_mw): a 5-token answer is quick
    assert main(["chat", "--user", "ana", "--max-tokens", "5", "Tell me a long story about a dragon.",
                 "--store", store_url()]) == 0
    out = capsys.readouterr()
    assert out.out.strip()
    assert "note: the answer was cut at the length limit of 5 tokens (finish_reason=length)" in out.err


def test_progress_only_on_a_terminal():
    import io

    from persona_mw.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        with _Progress(stream=stream):
            time.sleep(0.6)
    assert "generating... 0s" in tty.getvalue() and tty.getvalue().endswith("\r\033[K")
    assert pipe.getvalue() == ""


# -- request / trace basics (scripted backend, real store) --------------------------------------


def _mw(url, config=None, **kw):
    return Middleware(config, store=url, backend=ScriptedBackend(), autoload=False, **kw)


def test_top_level_generation_params_validated(tmp_path, store_url):
    with _mw(store_url()) as mw:
        mw.chat(user="ana", messages="hi", max_tokens=30, temperature=0.5)
        with pytest.raises(RequestError) as e:
            mw.chat(user="ana", messages="hi", max_tokens=0)
        assert e.value.field == "params.max_tokens"
        with pytest.raises(RequestError) as e:
            mw.chat(user="ana", messages="hi", max_tokens=30, params={"max_tokens": 40})
        assert e.value.field == "max_tokens"
        mw.chat(user="ana", messages="hi", max_tokens=30, params={"max_tokens": 30})


def test_bad_user_id_names_the_rule_not_the_regex(tmp_path, store_url):
    with _mw(store_url()) as mw:
        with pytest.raises(RequestError) as e:
            mw.chat(user="ana smith", messages="hi")
        assert e.value.field == "user" and "'ana smith'" in str(e.value) and "^[" not in str(e.value)
        with pytest.raises(RequestError) as e:
            mw.feedback(kind="stated", user="ana smith", text="x")
        assert "letters, digits" in str(e.value) and "^[" not in str(e.value)


def test_unused_feedback_is_warned_in_log_and_trace(tmp_path, caplog, store_url):
    with _mw(store_url(), Config()) as mw:  # the bare core: no plugins
        with caplog.at_level(logging.WARNING, logger="persona_mw"):
            mw.feedback(kind="stated", user="ana", text="Be brief.")
        assert any("'stated' feedback is recorded but no configured plugin uses it" in r.getMessage()
                   for r in caplog.records)
        r = mw.chat(user="ana", messages="hi")
        assert any(f.startswith("unused_feedback: 1 stated preference(s)") for f in r.trace.flags)
    with _mw(store_url(), None) as mw:  # the default uses stated ones, not choices
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="persona_mw"):
            mw.feedback(kind="stated", user="ana", text="Be brief.")
            assert not caplog.records
            mw.feedback(kind="choice", user="ana", prompt="q", chosen="a", rejected=["b"])
        assert any("'choice' feedback is recorded but no configured plugin uses it" in r.getMessage()
                   for r in caplog.records)
        r = mw.chat(user="ana", messages="hi")
        assert [f for f in r.trace.flags if "unused_feedback" in f] == [
            "unused_feedback: 1 choice/edit/rating event(s) recorded, but no configured plugin uses them"]


def test_default_pipeline_uses_stated_and_memory_facts_across_contexts(tmp_path, store_url):
    with _mw(store_url()) as mw:
        mw.feedback(kind="stated", user="ana", text=ANA)
        mw.chat(user="ana", context="travel", messages="I live in Lisbon. I'm vegetarian. Plan my weekend.")
        mw.drain()
        r = mw.chat(user="ana", messages="Where do I live, and what should I cook tonight?")
        used = {i["text"]: i for i in r.trace.items_used}
        assert ANA in used
        assert "I live in Lisbon." in used and used["I live in Lisbon."]["node"] == "user:ana"
        assert any("vegetarian" in t for t in used)
        prompt = r.messages[-1].text
        assert "Lisbon" in prompt and "vegetarian" in prompt
        # the fact keeps where it was said
        mems = mw.memory.list("ana")
        assert any(m.text == "I live in Lisbon." and m.meta.get("said_in_context") == "travel" for m in mems)
        # the gather step says which items it added
        gather = [s for s in r.trace.steps if s.hook == "persona_gather" and s.plugin == "stated"]
        assert gather and ANA[:20] in gather[0].summary


# -- CLI ----------------------------------------------------------------------------------------


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^smollm2-135m-instruct\s+(cached|not cached)\s+SmolLM2", out, re.M)
    assert "gemma3-270m" in out


def test_memory_search_with_the_query_after_the_options(tmp_path, capsys, store_url):
    db = store_url()
    with Middleware(store=db, backend=ScriptedBackend()) as mw:
        mw.memory.ingest("ana", [{"role": "user", "content": "I live in Lisbon.", "id": "m1"}])
    assert main(["memory", "search", "--user", "ana", "where do I live", "--store", db]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits and hits[0]["memory"]["text"] == "I live in Lisbon."


def test_profile_show_is_compact_and_full_on_request(tmp_path, capsys, store_url):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("pipeline:\n  - use: profile\n    features: {embedding: false}\n")
    db = store_url()
    common = ["--config", str(cfg), "--store", db]
    ev = {"kind": "choice", "prompt": "q", "chosen": "short answer.", "rejected": ["a much longer answer here."]}
    assert main(["feedback", "--user", "ana", "--json", json.dumps(ev), *common]) == 0
    capsys.readouterr()
    assert main(["profile", "show", "ana", *common]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 300 and "numbers, norm" in out
    assert main(["profile", "show", "ana", "--full", *common]) == 0
    assert len(capsys.readouterr().out.splitlines()) > 4000


def test_feedback_json_user_conflict_is_refused(tmp_path, capsys, store_url):
    db = store_url()
    ev = json.dumps({"kind": "stated", "user": "ben", "text": "Be brief."})
    assert main(["feedback", "--user", "ana", "--json", ev, "--store", db]) == 2
    assert "--json has user 'ben' but --user is 'ana'" in capsys.readouterr().err
    with Middleware(store=db, backend=ScriptedBackend()) as mw:
        assert not mw.store.has_user("ben") and not mw.store.has_user("ana")


@pytest.mark.parametrize("memory", ["", "  - use: memory\n    embedder: true\n"])
def test_feedback_stated_is_fast_and_quiet(tmp_path, memory, store_url):
    """The default, and a pipeline with MiniLM memory: a stated preference loads no embedding model."""
    cfg = ["--config", str(tmp_path / "p.yaml")] if memory else []
    (tmp_path / "p.yaml").write_text("pipeline:\n  - use: stated\n" + memory)
    db = store_url()
    for text in (ANA, "No emojis."):  # the second one finds the first stored without its vector
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "persona_mw.cli", "feedback", "--user", "ana", "--stated", text,
                            "--store", db, *cfg], capture_output=True, text=True, timeout=300)
        took = time.perf_counter() - t
        assert r.returncode == 0 and r.stdout.startswith("fb-"), r.stderr
        assert r.stderr == ""
        assert took < 10, took  # was 14-22 s with memory on: the MiniLM embedder loaded for one preference
    if memory:
        with Middleware.from_yaml(tmp_path / "p.yaml", store=db, backend=ScriptedBackend()) as mw:
            pinned = mw.memory.pinned("ana")
            assert {m.text for m in pinned} == {ANA, "No emojis."}
            hits = mw.memory.search("ana", "emojis", mode="dense", k=1)  # embedded once the embedder is up
            assert hits[0].memory.text == "No emojis."


def test_profile_forget_asks_on_a_terminal(tmp_path, capsys, monkeypatch, store_url):
    db = store_url()
    assert main(["feedback", "--user", "ana", "--stated", ANA, "--store", db]) == 0
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["profile", "forget", "ana", "--store", db]) == 1
    assert "nothing deleted" in capsys.readouterr().err
    with Middleware(store=db, backend=ScriptedBackend()) as mw:
        assert mw.store.has_user("ana")
    assert main(["profile", "forget", "ana", "--yes", "--store", db]) == 0
    with Middleware(store=db, backend=ScriptedBackend()) as mw:
        assert not mw.store.has_user("ana")


def test_chat_bad_id_is_one_clear_line(tmp_path, capsys, store_url):
    assert main(["chat", "--user", "ana smith", "hi", "--store", store_url()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid chat request: user: invalid id 'ana smith'") and "^[" not in err


def test_graph_export_has_global_and_parent_edges(tmp_path, capsys, store_url):
    import networkx as nx

    db = store_url()
    with Middleware(store=db, backend=ScriptedBackend()) as mw:
        mw.chat(user="ana", messages="hi")
        mw.join("ana", "team")  # a request's groups last that request: membership is explicit (#17)
        mw.feedback(kind="stated", user="ana", context="coding", text="Show code first.")
    out = tmp_path / "g.graphml"
    assert main(["graph", "export", "--out", str(out), "--store", db]) == 0
    g = nx.read_graphml(out)
    assert "global" in g
    assert g.edges["group:team", "global"]["kind"] == "parent"
    assert g.edges["user:ana@context:coding", "user:ana"]["kind"] == "specializes"
    assert g.edges["user:ana", "group:team"]["kind"] == "member"


def test_every_option_has_help():
    parser = build_parser()
    missing = []
    for action in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        name, sub = action
        for a in sub._actions:
            if a.help is None and a.dest != "help":
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


# -- config validate ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected, at_startup", [
    ("pipeline:\n  - use: rerank\n    rewards: {stlye: 1.0}\n",
     "x.yaml:3: pipeline[0].rewards: unknown reward 'stlye'", True),
    ("backend:\n  type: transformers\n  model: smolm2\n",
     "x.yaml:3: backend: unknown local model 'smolm2'", True),
    # a role's backend is built when a plugin first asks for it: validate says so up front
    ("roles:\n  judge: {type: litellmm, model: x}\n",
     "x.yaml:2: roles.judge.type: unknown backend type 'litellmm'", False),
])
def test_config_validate_catches_what_startup_would(tmp_path, capsys, text, expected, at_startup, store_url):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    assert main(["config", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert expected in err.replace(str(tmp_path) + "/", "")
    if at_startup:
        with pytest.raises(Exception):
            Middleware(parse_config(text, "x.yaml"), store=store_url())


def test_config_hint_is_printed_once(tmp_path, capsys):
    f = tmp_path / "x.yaml"
    f.write_text("pipeline:\n  - use: stated\n    placment: system\n")
    assert main(["config", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("did you mean 'placement'?") == 1


def test_default_pipeline_over_http_control_only_preference_is_not_a_server_error(tmp_path, store_url):
    """Found by the schemathesis fuzz once memory joined the default: a stated text that is only control
    characters has nothing to remember, and must not fail the feedback call (it was a 502)."""
    import httpx

    from persona_mw.server import create_app, serve_in_thread

    with Middleware(store=store_url(), backend=ScriptedBackend()) as mw:
        with serve_in_thread(create_app(mw)) as url:
            r = httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "ana", "text": "\u0000\u0007"})
            assert r.status_code < 500, r.text
            r = httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "ana", "text": "Be brief."})
            assert r.status_code == 201
            r = httpx.post(url + "/v1/chat/completions", json={"user": "ana", "messages": [
                {"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and "Be brief." in r.json()["choices"][0]["message"]["content"]
        assert [m.text for m in mw.memory.list("ana")] == ["Be brief."]
