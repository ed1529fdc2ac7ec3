"""Operations: ``GET /metrics`` scraped after real turns (parsed with prometheus-client's own text parser),
no user ids or text in any label, 501 naming the extra without prometheus-client, OpenTelemetry spans
(a turn span with one child span per plugin step, seen by the SDK's in-memory exporter), and JSON
access logs from the ``logging:`` config. Real server on loopback, real SQLite store; the scripted
backend stands in for the LLM."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import anthropic
import httpx
import openai
import pytest

from persona_mw import hookimpl, observe
from persona_mw.server import create_app, serve_in_thread

SECRET_USER = "zed-private-user"
SECRET_TEXT = "PRIVATEMARKER likes kumquats"
STATED = "pipeline:\n  - use: stated\n"


def _turns(url: str) -> None:
    hi = [{"role": "user", "content": "hello " + SECRET_TEXT}]
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="m", messages=hi, user=SECRET_USER)  # type: ignore[arg-type]
    list(c.chat.completions.create(model="m", messages=hi, user=SECRET_USER, stream=True))  # type: ignore[arg-type]
    c.responses.create(model="m", input="hello " + SECRET_TEXT, user=SECRET_USER)
    a = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    with a.messages.stream(model="m", max_tokens=20, messages=hi,  # type: ignore[arg-type]
                           metadata={"user_id": SECRET_USER}) as s:
        "".join(s.text_stream)
    httpx.get(f"{url}/v1/users/{SECRET_USER}/profile")
    httpx.get(f"{url}/v1/users/nobody-{SECRET_USER}/profile")  # a 404


def _samples(text: str) -> dict[str, list[Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_after_turns_and_no_user_data_in_labels(make_mw: Any) -> None:
    mw = make_mw(STATED)
    mw.feedback(kind="stated", user=SECRET_USER, text=SECRET_TEXT)
    mw.memory.remember(SECRET_USER, SECRET_TEXT, kind="fact")
    with serve_in_thread(create_app(mw)) as url:
        before = _samples(httpx.get(url + "/metrics").text)
        _turns(url)
        r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)

    def value(fams: dict[str, list[Any]], name: str, sample: str, **labels: str) -> float:
        return sum(s.value for s in fams.get(name, []) if s.name == sample
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    def delta(name: str, sample: str, **labels: str) -> float:
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert delta("persona_requests", "persona_requests_total", route="/v1/chat/completions", status="200") == 2
    assert delta("persona_requests", "persona_requests_total", route="/v1/messages", status="200") == 1
    assert delta("persona_requests", "persona_requests_total", route="/v1/responses", status="200") == 1
    assert delta("persona_requests", "persona_requests_total", route="/v1/users/{user}/profile", status="404") == 1
    assert delta("persona_request_seconds", "persona_request_seconds_count", route="/v1/responses") == 1
    assert delta("persona_turns", "persona_turns_total") == 4
    assert delta("persona_backend_calls", "persona_backend_calls_total", ok="true") == 4
    assert delta("persona_stage_seconds", "persona_stage_seconds_count", stage="gather", plugin="stated") == 4
    assert delta("persona_stage_seconds", "persona_stage_seconds_count", stage="rewrite", plugin="stated") == 4
    assert value(after, "persona_memories", "persona_memories") >= 1
    assert "persona_jobs_pending" in after and "persona_jobs_failed" in after
    # never a user id or any of their text, in labels or anywhere in the exposition
    assert SECRET_USER not in r.text and "PRIVATEMARKER" not in r.text and "kumquats" not in r.text
    labels = {k for fam in after.values() for s in fam for k in s.labels}
    assert labels <= {"route", "status", "tenant", "stage", "plugin", "ok", "role", "stream", "le"}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_store_gauges_read_every_store(kind: str, request: pytest.FixtureRequest, tmp_path: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """The jobs and memories gauges come from the store contract, not from SQLite-only SQL: before, a
    Postgres store lost all three gauges and logged a warning at every scrape."""
    from persona_mw import Middleware
    from persona_mw.testing import ScriptedBackend

    from .conftest import fresh_pg_url

    url = str(tmp_path / "m.db") if kind == "sqlite" else fresh_pg_url(request.getfixturevalue("pg_server"), "obs")
    mw = Middleware(store=url, backend=ScriptedBackend(), autoload=False)
    try:
        mw.memory.remember("ana", "likes tea", kind="fact")
        mw.memory.remember("bob", "likes coffee", kind="fact")
        with caplog.at_level("WARNING", logger="persona_mw.observe"), serve_in_thread(create_app(mw)) as base:
            r = httpx.get(base + "/metrics")
    finally:
        mw.close()
    assert r.status_code == 200
    fams = _samples(r.text)
    assert [s.value for s in fams["persona_memories"]] == [2.0]
    assert [s.value for s in fams["persona_jobs_pending"]] == [0.0]
    assert [s.value for s in fams["persona_jobs_failed"]] == [0.0]
    assert "could not read the store" not in caplog.text


def test_tenant_label_only_when_configured(make_mw: Any) -> None:
    keys = {"acme": ["key-acme"]}
    for flag in (False, True):
        mw = make_mw(STATED + f"server: {{metrics_tenant_label: {str(flag).lower()}}}\n")
        with serve_in_thread(create_app(mw, api_keys=keys)) as url:
            httpx.post(url + "/v1/responses", json={"input": "hi", "user": SECRET_USER},
                       headers={"Authorization": "Bearer key-acme"})
            text = httpx.get(url + "/metrics").text
        assert ('tenant="acme"' in text) is flag
        assert SECRET_USER not in text


def test_metrics_without_prometheus_client_is_a_501_naming_the_extra(make_mw: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observe, "_METRICS", None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with serve_in_thread(create_app(make_mw())) as url:
        r = httpx.get(url + "/metrics")
        chat = httpx.post(url + "/v1/chat/completions", json={"user": "u", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 501 and "persona-mw[metrics]" in r.json()["error"]["message"]
    assert chat.status_code == 200  # the rest of the server is unaffected


def test_otel_turn_span_with_plugin_children(make_mw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the [otel] extra is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(observe, "_TRACER", None)
    for var in observe._OTEL_VARS:
        monkeypatch.delenv(var, raising=False)
    off = make_mw(STATED)
    off.feedback(kind="stated", user=SECRET_USER, text=SECRET_TEXT)
    with serve_in_thread(create_app(off)) as url:  # off by default
        httpx.post(url + "/v1/responses", json={"input": "hi", "user": SECRET_USER})
    def ours() -> list[Any]:  # other installed libraries may emit spans of their own
        return [s for s in exporter.get_finished_spans() if s.name.startswith("persona.")]

    assert ours() == []
    mw = make_mw(STATED + "server: {otel: true}\n")
    mw.feedback(kind="stated", user=SECRET_USER, text=SECRET_TEXT)
    try:
        with serve_in_thread(create_app(mw)) as url:
            assert httpx.post(url + "/v1/responses", json={"input": "hi", "user": SECRET_USER}).status_code == 200
        spans = ours()
        turn = [s for s in spans if s.name == "persona.turn"]
        assert len(turn) == 1
        children = [s for s in spans if s.parent is not None and s.parent.span_id == turn[0].context.span_id]
        assert {(c.attributes["persona.stage"], c.attributes["persona.plugin"]) for c in children} >= {
            ("gather", "stated"), ("rewrite", "stated")}
        assert all(turn[0].start_time <= c.start_time <= c.end_time <= turn[0].end_time for c in children)
        dumped = json.dumps([dict(s.attributes or {}) for s in spans])
        assert SECRET_USER not in dumped and "PRIVATEMARKER" not in dumped
    finally:
        observe.configure_tracing(False)


def test_json_access_logs_from_the_logging_config(make_mw: Any) -> None:
    mw = make_mw(STATED + "logging: {level: INFO, json: true}\n")
    out = io.StringIO()
    handler = observe.setup_logging(mw.config.logging, stream=out)
    try:
        with serve_in_thread(create_app(mw)) as url:
            httpx.get(f"{url}/v1/users/{SECRET_USER}/profile")
            httpx.post(url + "/v1/responses", json={"input": "hi", "user": SECRET_USER})
    finally:
        import logging

        logging.getLogger("persona_mw").removeHandler(handler)
        logging.getLogger("persona_mw").setLevel(logging.NOTSET)
        logging.getLogger("persona_mw").propagate = True
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    access = [x for x in lines if x["logger"] == "persona_mw.access"]
    assert {(x["method"], x["route"], x["status"]) for x in access} >= {
        ("GET", "/v1/users/{user}/profile", 404), ("POST", "/v1/responses", 200)}
    assert all(x["ms"] >= 0 and x["level"] == "INFO" for x in access)
    assert SECRET_USER not in json.dumps(access)  # the route template, not the path


class _FlakyGather:
    """A plugin whose gather fails (policy skip): its errors are counted per plugin and stage."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def persona_gather(self, turn: Any) -> None:
        raise RuntimeError("side index unreachable")

    @hookimpl
    def persona_feedback(self, event: Any) -> None:
        return None


def test_per_plugin_stage_metrics_come_from_the_hook_runner_for_every_door(make_mw: Any) -> None:
    """Issue #21: a turn through /v1/chat/completions and one through the Python API (and a feedback
    event, and a plugin's failure) all reach ``persona_stage_seconds`` per plugin and stage, counted
    once each: the hook runner records them, not the server's trace of the turns it answered."""
    mw = make_mw("pipeline:\n  - use: stated\n  - {use: flaky, on_error: skip}\n", plugins={"flaky": _FlakyGather})
    mw.feedback(kind="stated", user=SECRET_USER, text=SECRET_TEXT)
    with serve_in_thread(create_app(mw)) as url:
        before = _samples(httpx.get(url + "/metrics").text)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],  # type: ignore[arg-type]
                                  user=SECRET_USER)
        mw.chat(user=SECRET_USER, messages="hello from the Python API")  # no HTTP at all
        mw.feedback(kind="stated", user=SECRET_USER, text="Answer in French.")
        after = _samples(httpx.get(url + "/metrics").text)

    def delta(**labels: str) -> float:
        def count(fams: dict[str, list[Any]]) -> float:
            return sum(s.value for s in fams.get("persona_stage_seconds", [])
                       if s.name == "persona_stage_seconds_count"
                       and all(s.labels.get(k) == v for k, v in labels.items()))
        return count(after) - count(before)

    assert delta(stage="gather", plugin="stated", ok="true") == 2  # HTTP turn + Python API turn, once each
    assert delta(stage="rewrite", plugin="stated", ok="true") == 2
    assert delta(stage="gather", plugin="flaky", ok="false") == 2  # errors, per plugin and stage
    assert delta(stage="gather", plugin="flaky", ok="true") == 0
    assert delta(stage="feedback", plugin="flaky", ok="true") == 1  # a feedback event, outside any turn
    assert delta(stage="gather", plugin="stated", ok="true") == delta(stage="gather", plugin="stated")


def test_stage_metrics_are_off_without_a_metrics_server(store_url) -> None:
    """The Python API alone never imports prometheus-client and records nothing."""
    import subprocess

    code = ("import sys\n"
            "from persona_mw import Middleware, parse_config, observe\n"
            "from persona_mw.testing import ScriptedBackend\n"
            "cfg = parse_config('pipeline: [{use: stated}]')\n"
            "cfg.store.path = sys.argv[1]\n"
            "mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)\n"
            "mw.chat(user='ana', messages='hi')\n"
            "mw.close()\n"
            "assert not observe.metrics_enabled()\n"
            "assert 'prometheus_client' not in sys.modules, 'imported'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code, store_url()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
