"""Operations: Prometheus metrics (``GET /metrics``), OpenTelemetry spans, structured access logs.

- ``stage(stage, plugin, seconds, ok)``: one plugin's work in one pipeline stage. The one hook runner
  (``persona_mw.runner.HookRunner``) calls it for every hook call, so turns, feedback, after-turn
  jobs, startup and forget are counted whichever door they came through (Python API, MCP, any HTTP
  route, ``persona-mw worker``). It is a no-op (one boolean test, no import) until metrics are
  switched on with ``enable_metrics()``, which ``create_app`` does: a process that serves no
  ``/metrics`` pays nothing and never imports prometheus-client.
- ``turn(trace)``: a finished turn's counters (turns, backend and auxiliary calls) and, with tracing
  on, its spans; the server calls it after each turn it answers.
- ``request(route, status, seconds, tenant)``: one HTTP request (the route *template*, never the path).
- ``render(mws)``: the Prometheus text exposition, with gauges read from the stores at scrape time
  (jobs pending/failed, memory counts).

Labels are route, status, stage, plugin, hook, role, ok, and the tenant id only when
``server.metrics_tenant_label`` is set: never a user id or any text. ``prometheus-client`` is the
``[metrics]`` extra and ``opentelemetry-sdk`` the ``[otel]`` extra; both are imported lazily, and
without them every call here is a no-op.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

__all__ = ["METRICS_EXTRA", "available", "enable_metrics", "metrics_enabled", "render", "request", "stage",
           "tracing_enabled", "turn"]

METRICS_EXTRA = "pip install 'persona-mw[metrics]'"
_LOCK = threading.Lock()
_METRICS: _Metrics | None = None
_MISSING = False  # prometheus-client failed to import once: not tried again on every call
_ENABLED = False  # per-plugin stage timings are recorded (``enable_metrics``)
_TRACER: Any = None
_OTEL_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("persona_requests", "HTTP requests by route template and status",
                                ["route", "status", "tenant"], registry=r)
        self.latency = Histogram("persona_request_seconds", "HTTP request latency by route template",
                                 ["route"], registry=r)
        self.stages = Histogram("persona_stage_seconds", "per-stage, per-plugin latency",
                                ["stage", "plugin", "ok"], registry=r,
                                buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.turns = Counter("persona_turns", "turns answered", ["stream"], registry=r)
        self.backend = Counter("persona_backend_calls", "calls to the generating backend", ["ok"], registry=r)
        self.aux = Counter("persona_aux_calls", "auxiliary LLM calls (the budget spent)", ["role", "plugin", "ok"],
                           registry=r)
        self.aux_seconds = Counter("persona_aux_call_seconds", "seconds of auxiliary LLM calls", ["role"],
                                   registry=r)


def available() -> bool:
    """Whether prometheus-client is installed (``/metrics`` answers 501 naming the extra otherwise)."""
    return _metrics() is not None


def _metrics() -> _Metrics | None:
    global _METRICS, _MISSING
    if _METRICS is None:
        if _MISSING:
            return None
        with _LOCK:
            if _METRICS is None:
                try:
                    _METRICS = _Metrics()
                except ImportError:
                    _MISSING = True
                    return None
    return _METRICS


def enable_metrics(on: bool = True) -> bool:
    """Record per-plugin stage timings from now on (the server calls this); returns whether
    prometheus-client is there to record them."""
    global _ENABLED, _MISSING
    if on:
        _MISSING = False  # installed since the last try, or a test put it back
    _ENABLED = bool(on) and _metrics() is not None
    return _ENABLED


def metrics_enabled() -> bool:
    return _ENABLED


def _ok(value: Any) -> str:
    return "true" if value else "false"


def stage(stage: str, plugin: str, seconds: float, ok: bool) -> None:
    """Record one plugin's work in one stage (the hook runner calls it for every hook call); ``stage``
    is the stage (``gather``) or its hook's name (``persona_gather``)."""
    if not _ENABLED:
        return
    m = _metrics()
    if m is not None:
        m.stages.labels(stage=_stage_of(stage), plugin=plugin, ok=_ok(ok)).observe(max(0.0, float(seconds)))


def request(route: str, status: int, seconds: float, tenant: str = "") -> None:
    m = _metrics()
    if m is not None:
        m.requests.labels(route=route, status=str(status), tenant=tenant).inc()
        m.latency.labels(route=route).observe(max(0.0, seconds))


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def _stage_of(hook: str) -> str:
    return hook.removeprefix("persona_")


def turn(trace: Any, *, stream: bool = False) -> None:
    """A finished turn's counters (turns, backend and auxiliary calls) and, with tracing on, a
    ``persona.turn`` span with one child span per plugin step. Never raises. (Per-plugin stage
    timings are recorded by the hook runner as each call ends, not from here.)"""
    try:
        steps = list(_field(trace, "steps") or [])
        timings = dict(_field(trace, "timings_ms") or {})
        flags = list(_field(trace, "flags") or [])
        m = _metrics()
        if m is not None:
            m.turns.labels(stream=_ok(stream)).inc()
            if "generate" in timings:
                m.backend.labels(ok=_ok(not any("backend" in str(f) for f in flags))).inc()
            for call in _field(trace, "aux_calls") or []:
                role = str(_field(call, "role", "") or "")
                m.aux.labels(role=role, plugin=str(_field(call, "plugin", "") or ""), ok=_ok(_field(call, "ok"))).inc()
                m.aux_seconds.labels(role=role).inc(float(_field(call, "seconds", 0.0) or 0.0))
        if tracing_enabled():
            _spans(steps, timings, stream)
    except Exception as exc:  # observability never fails a turn
        log.warning("could not record the turn's metrics: %s", exc)


# --------------------------------------------------------------------------- OpenTelemetry

_OTEL_ON: bool | None = None


def configure_tracing(enabled: bool | None) -> None:
    """Turn spans on (``server.otel``) or leave them to the OTEL_* variables (None)."""
    global _OTEL_ON
    _OTEL_ON = bool(enabled) or any(os.environ.get(v) for v in _OTEL_VARS) or None


def tracing_enabled() -> bool:
    if _OTEL_ON is None:
        return any(os.environ.get(v) for v in _OTEL_VARS)
    return _OTEL_ON


def _tracer() -> Any:
    """The persona-mw tracer; sets up an SDK provider (OTLP exporter when installed, else the console
    exporter with OTEL_TRACES_EXPORTER=console) unless the process already has one."""
    global _TRACER
    if _TRACER is not None:
        return _TRACER
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        log.warning("tracing is on but opentelemetry-sdk is missing: pip install 'persona-mw[otel]'")
        _TRACER = False
        return _TRACER
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        _install_provider()
    _TRACER = trace.get_tracer("persona_mw")
    return _TRACER


def _install_provider() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or "persona-mw"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    exporter: Any = None
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        except ImportError:
            log.warning("no OTLP exporter installed (opentelemetry-exporter-otlp-proto-http): spans are dropped")
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _spans(steps: Iterable[Any], timings: Mapping[str, Any], stream: bool) -> None:
    """``persona.turn`` ending now, with each plugin step a child span laid out in order."""
    tracer = _tracer()
    if not tracer:
        return
    from opentelemetry import trace

    end = time.time_ns()
    total_ns = int(float(timings.get("total", 0.0) or 0.0) * 1e6)
    start = end - total_ns
    root = tracer.start_span("persona.turn", start_time=start, attributes={"persona.stream": stream})
    ctx = trace.set_span_in_context(root)
    at = start
    for s in steps:
        dur = int(float(_field(s, "ms", 0.0) or 0.0) * 1e6)
        hook, plugin = str(_field(s, "hook", "")), str(_field(s, "plugin", ""))
        child = tracer.start_span(f"persona.plugin {plugin}", context=ctx, start_time=at, attributes={
            "persona.stage": _stage_of(hook), "persona.plugin": plugin, "persona.ok": not _field(s, "error")})
        if _field(s, "error"):
            child.set_status(trace.Status(trace.StatusCode.ERROR))
        at = min(at + dur, end)
        child.end(end_time=at)
    root.end(end_time=end)


# --------------------------------------------------------------------------- the exposition


def _store_gauges(mws: Iterable[tuple[str, Any]], tenant_label: bool) -> Any:
    """Jobs pending/failed and memory counts, read from each store at scrape time."""
    from prometheus_client.core import GaugeMetricFamily

    labels = ["tenant"] if tenant_label else []
    pending = GaugeMetricFamily("persona_jobs_pending", "background jobs waiting or running", labels=labels)
    failed = GaugeMetricFamily("persona_jobs_failed", "background jobs with a failed attempt", labels=labels)
    memories = GaugeMetricFamily("persona_memories", "stored memories", labels=labels)
    totals: dict[str, list[int]] = {}
    for tenant, mw in mws:
        store = getattr(mw, "store", None)
        if store is None:
            continue
        try:
            jobs = store.list_jobs()
            n_mem = int(store.count_memories())
        except Exception as exc:
            log.warning("metrics: could not read the store: %s", exc)
            continue
        key = tenant if tenant_label else ""
        t = totals.setdefault(key, [0, 0, 0])
        t[0] += len(jobs)
        t[1] += sum(1 for j in jobs if j.get("attempts") and j.get("last_error"))
        t[2] += n_mem
    for key, (p, f, n) in totals.items():
        values = [key] if tenant_label else []
        pending.add_metric(values, p)
        failed.add_metric(values, f)
        memories.add_metric(values, n)
    return [pending, failed, memories]


def render(mws: Iterable[tuple[str, Any]], *, tenant_label: bool = False) -> tuple[bytes, str]:
    """``(body, content type)`` of the Prometheus exposition (``available()`` must be true)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    m = _metrics()
    assert m is not None
    gauges = _store_gauges(list(mws), tenant_label)

    class _Stores:
        def collect(self) -> Any:
            return gauges

    scrape = CollectorRegistry()
    scrape.register(_Stores())
    return generate_latest(m.registry) + generate_latest(scrape), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------- logs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and the record's ``fields`` (access logs)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


_HANDLER_NAME = "persona_mw.observe"


def setup_logging(cfg: Any, stream: Any = None) -> logging.Handler:
    """Apply ``logging:`` (level, json) to the ``persona_mw`` loggers: one handler of ours, replaced on
    a second call, so the host application's own logging setup is left alone."""
    logger = logging.getLogger("persona_mw")
    logger.setLevel(str(getattr(cfg, "level", "WARNING")))
    for h in list(logger.handlers):
        if h.get_name() == _HANDLER_NAME:
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if getattr(cfg, "json_lines", False)
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return handler


ACCESS = logging.getLogger("persona_mw.access")


class AccessMiddleware:
    """ASGI: times each HTTP request, counts it by route template and status, logs one access line.

    The route is the matched template (``/v1/users/{user}``), never the path: paths carry user ids."""

    def __init__(self, app: Any, tenant_of: Any = None, access_log: bool = True) -> None:
        self.app = app
        self.tenant_of = tenant_of
        self.access_log = access_log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Any) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            route_obj = scope.get("route")
            route = str(getattr(route_obj, "path", "") or "unmatched")
            tenant = self.tenant_of(scope) if self.tenant_of is not None else ""
            request(route, status[0], seconds, tenant or "")
            if self.access_log and ACCESS.isEnabledFor(logging.INFO):
                fields = {"method": scope.get("method"), "route": route, "status": status[0],
                          "ms": round(seconds * 1000, 2), **({"tenant": tenant} if tenant else {})}
                ACCESS.info("%s %s %s %.1fms", scope.get("method"), route, status[0], seconds * 1000,
                            extra={"fields": fields})
