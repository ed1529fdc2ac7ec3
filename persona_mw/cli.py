"""The ``persona-mw`` command line: demo, chat, serve, feedback, profile, graph, plugins, config, models.

Every command reports a bad input as one ``error: ...`` line on stderr with exit status 2
(1 for a backend or plugin failure) — never a traceback. ``PERSONA_MW_DEBUG=1`` shows one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from persona_mw.config import Config, default_config, load_config
from persona_mw.errors import BackendError, PersonaError, PluginError, RequestError

DEMO_QUESTION = "How does a refrigerator keep food cold?"
DEMO_USERS = {
    "ana": "Answer in one short sentence.",
    "ben": "Explain step by step in detail, for a complete beginner, with an everyday example.",
}


def _config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None) or os.environ.get("PERSONA_MW_CONFIG")
    cfg = load_config(path) if path else default_config()
    store = getattr(args, "store", None)
    if store:
        cfg.store.path = store
    return cfg


def _middleware(args: argparse.Namespace) -> Any:
    from persona_mw.middleware import Middleware

    return Middleware(_config(args))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# -- commands ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Two users state different preferences; the same question gets two personalized answers."""
    from persona_mw.middleware import Middleware

    cfg = default_config()
    # The demo runs the local model's fast setting (4-bit weights: the form the model ships in, about
    # 4x the tokens/s of float32 here); --dtype float32 gives the backend's default.
    cfg.backend = cfg.backend.model_validate({**cfg.backend.model_dump(), "dtype": args.dtype})
    with tempfile.TemporaryDirectory(prefix="persona-mw-demo-") as tmp:
        cfg.store.path = str(Path(tmp) / "demo.db")
        print(f"persona-mw demo: local model SmolLM2-135M-Instruct ({args.dtype}), store", cfg.store.path,
              file=sys.stderr)
        with Middleware(cfg) as mw:
            question = args.question or DEMO_QUESTION
            for user, pref in DEMO_USERS.items():
                mw.feedback(kind="stated", user=user, text=pref)
            for user, pref in DEMO_USERS.items():
                r = mw.chat(user=user, messages=[{"role": "user", "content": question}])
                print(f"\n=== user {user!r} stated: {pref!r}")
                print(f"Q: {question}")
                print(f"A: {r.text}")
                print(r.trace.render())
    return 0


class _Progress:
    """``generating... 12s`` on stderr while an answer is being generated, when stderr is a terminal
    (a 135M model on two cores takes tens of seconds); nothing when it is a pipe or a file."""

    def __init__(self, label: str = "generating", stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.active = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        t0 = time.monotonic()
        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.25):
            self.stream.write(f"\r{frames[i % 4]} {self.label}... {time.monotonic() - t0:.0f}s ")
            self.stream.flush()
            i += 1

    def __enter__(self) -> _Progress:
        if self.active:
            self._thread = threading.Thread(target=self._run, name="persona-mw-progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.stream.write("\r\033[K")
            self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _truncation_note(finish_reason: str | None, max_tokens: int | None) -> None:
    if finish_reason == "length":
        limit = f" of {max_tokens} tokens" if max_tokens else ""
        print(f"note: the answer was cut at the length limit{limit} (finish_reason=length); "
              "raise it with --max-tokens N", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    with _middleware(args) as mw:
        messages = [{"role": "user", "content": args.message}]
        kwargs: dict[str, Any] = {"user": args.user, "messages": messages, "context": args.context,
                                  "groups": args.group or []}
        if args.max_tokens is not None:
            kwargs["max_tokens"] = args.max_tokens
        limit = args.max_tokens or getattr(mw.backend, "max_new_tokens", None)
        if args.stream:
            progress = _Progress("thinking")
            progress.__enter__()
            try:
                for chunk in mw.stream(**kwargs):
                    progress.stop()  # the first token is the progress from here on
                    if chunk.done:
                        print()
                        _truncation_note(chunk.finish_reason, limit)
                        if args.trace and chunk.trace:
                            print(chunk.trace.render(), file=sys.stderr)
                    else:
                        print(chunk.delta, end="", flush=True)
            finally:
                progress.stop()
        else:
            with _Progress():
                r = mw.chat(**kwargs)
            print(r.text)
            _truncation_note(r.choices[0].finish_reason if r.choices else None, limit)
            if args.trace:
                print(r.trace.render(), file=sys.stderr)
    return 0


def _add_api_keys(cfg: Config, specs: list[str] | None) -> None:
    """``--api-key TENANT=KEY`` flags, added to the config's ``server.api_keys``."""
    for spec in specs or []:
        tenant, sep, key = spec.partition("=")
        if not sep or not tenant or not key:
            raise PersonaError(f"--api-key expects TENANT=KEY, got {spec!r}")
        from pydantic import ValidationError

        from persona_mw.config import ServerConfig

        try:
            added = ServerConfig(api_keys={tenant: [key]}).api_keys[tenant]
        except ValidationError as exc:
            raise PersonaError(f"--api-key {tenant}=...: {exc.errors()[0]['msg']}") from None
        cfg.server.api_keys.setdefault(tenant, []).extend(added)


def cmd_serve(args: argparse.Namespace) -> int:
    from persona_mw.server import serve

    cfg = _config(args)
    if args.max_body_bytes:
        cfg.server.max_body_bytes = args.max_body_bytes
    _add_api_keys(cfg, args.api_key)
    from persona_mw.middleware import Middleware

    mw = Middleware(cfg, run_jobs=False if args.no_jobs else None)  # else the config's server.run_jobs
    try:
        auth = f"{len(cfg.server.api_keys)} tenant(s)" if cfg.server.api_keys else "open: no API keys configured"
        print(f"persona-mw serving on http://{args.host}:{args.port}/v1 ({auth})", file=sys.stderr, flush=True)
        serve(mw, host=args.host, port=args.port)
    finally:
        mw.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run after-turn jobs (memory extraction, profile refits, FERMI, persona inference) and the
    feedback jobs of dead processes, claimed from the store until stopped (SIGTERM/SIGINT), or with
    ``--once`` until none is left."""
    import signal

    from persona_mw.middleware import Middleware

    # This process runs jobs whatever the config's server.run_jobs says (that one is for serve).
    mw = Middleware(_config(args), run_jobs=True)
    # The tenants of server.api_keys have stores of their own (a file beside, a schema): their jobs too.
    mws = [mw, *(mw.for_tenant(t) for t in sorted(mw.config.server.api_keys))]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"persona-mw worker {os.getpid()} on {mw.config.store.path} ({len(mws) - 1} tenant(s))",
          file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            # Unclaimed jobs (servers run with --no-jobs), jobs of dead holders (a killed worker or
            # server) and claims older than --stale-after (a holder that hangs).
            started = sum(m.resume_jobs(stale_after_s=args.stale_after) for m in mws)
            for m in mws:
                m.drain()  # also the jobs the startup resumption took
            if started:
                continue
            if args.once:  # nothing this worker may take now (jobs held by live processes stay theirs)
                break
            stop.wait(args.poll)
    finally:
        for m in reversed(mws):
            m.close()
    print(json.dumps({"jobs_run": sum(m.jobs.resumed for m in mws)}), flush=True)
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    """The MCP server: stdio (one tenant, or the open store) or streamable HTTP (API keys -> tenants)."""
    from persona_mw.mcp_server import McpAccess, _import_mcp

    try:
        _import_mcp()
    except ImportError as exc:
        raise PersonaError(str(exc)) from None
    cfg = _config(args)
    _add_api_keys(cfg, args.api_key)
    tenant = args.tenant or os.environ.get("PERSONA_MW_TENANT") or None
    tenants = sorted(cfg.server.api_keys)
    if args.transport == "http" and args.tenant is not None:
        raise PersonaError("--tenant is for stdio: over HTTP each request's API key names its tenant")
    if args.transport == "stdio":
        if tenants and tenant is None:
            raise PersonaError("server.api_keys is configured: over stdio name the tenant to serve with --tenant "
                               f"(one of: {', '.join(tenants)})")
        if tenant is not None and tenants and tenant not in tenants:
            raise RequestError(f"unknown tenant {tenant!r}: not in server.api_keys ({', '.join(tenants)})",
                               field="tenant")
    else:
        tenant = None
    from persona_mw.middleware import Middleware

    mw = Middleware(cfg)
    try:
        access = McpAccess(mw, tenant=tenant)
        if args.transport == "stdio":
            import anyio

            from persona_mw.mcp_server import build_mcp_server

            server = build_mcp_server(access)

            async def run() -> None:
                try:
                    await server.run_stdio_async()
                finally:
                    await access.aclose()

            anyio.run(run)
        else:
            import uvicorn

            from persona_mw.mcp_server import mcp_http_app

            auth = f"{len(tenants)} tenant(s)" if tenants else "open: no API keys configured"
            print(f"persona-mw MCP on http://{args.host}:{args.port}/mcp ({auth})", file=sys.stderr, flush=True)
            uvicorn.run(mcp_http_app(access, host=args.host), host=args.host, port=args.port, log_level="warning")
    finally:
        mw.close()
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    event: dict[str, Any] = {"user": args.user, "context": args.context}
    if args.stated:
        event |= {"kind": "stated", "text": args.stated, "polarity": "like"}
    elif args.avoid:
        event |= {"kind": "stated", "text": args.avoid, "polarity": "avoid"}
    elif args.json:
        try:
            extra = json.loads(args.json)
        except json.JSONDecodeError as exc:
            raise PersonaError(f"--json is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise PersonaError("--json must be a JSON object")
        for key in ("user", "context"):  # given twice they must agree: never a silent override
            flag = getattr(args, key)
            if key in extra and flag is not None and extra[key] != flag:
                raise RequestError(f"--json has {key} {extra[key]!r} but --{key} is {flag!r}; give it once",
                                   field=key)
        event |= {k: v for k, v in extra.items() if v is not None or k not in ("user", "context")}
    else:
        raise PersonaError("give one of --stated TEXT, --avoid TEXT or --json EVENT")
    with _middleware(args) as mw:
        print(mw.feedback(event))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    with _middleware(args) as mw:
        if args.action == "show":
            out = _profile_with_reports(mw, args.user, mw.profile(args.user, context=args.context))
            _print_json(out if args.full else _compact(out))
        elif args.action == "export":
            data = mw.export_user(args.user)
            if args.out:
                Path(args.out).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
                print(f"wrote {args.out}", file=sys.stderr)
            else:
                _print_json(data)
        elif args.action == "forget":
            mw.profile(args.user)  # an unknown user fails here, before any question
            if not args.yes and sys.stdin.isatty():
                answer = input(f"Delete everything stored about user {args.user!r} (feedback, memories, profiles, "
                               "traces)? This cannot be undone. [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("nothing deleted", file=sys.stderr)
                    return 1
            _print_json({"forgotten": args.user, "deleted": mw.forget(args.user)})
        elif args.action == "rebuild":
            _print_json(mw.rebuild(args.user))
    return 0


def _profile_with_reports(mw: Any, user: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` plus the sections plugins add to ``profile show`` (``persona_profile_report``)."""
    out = dict(data)
    for sections in mw.host.pm.hook.persona_profile_report(user=user, profiles=data["profiles"]):
        if sections:
            out.update(sections)
    return out


def _compact(data: Any, limit: int = 16) -> Any:
    """``data`` with long numeric vectors (a profile's 4,499 weights) replaced by a one-line summary;
    ``--full`` prints them whole."""
    if isinstance(data, dict):
        return {k: _compact(v, limit) for k, v in data.items()}
    if isinstance(data, list):
        if len(data) > limit and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
            import math

            norm = math.sqrt(sum(float(x) * float(x) for x in data))
            return f"<{len(data)} numbers, norm {norm:.3g}; --full shows them>"
        return [_compact(v, limit) for v in data]
    return data


def cmd_jobs(args: argparse.Namespace) -> int:
    """Pending after-turn jobs (a crash or a failure left them): list them, or run them again now."""
    from persona_mw.middleware import Middleware

    with Middleware(_config(args), run_jobs=True) as mw:  # `resume` runs them here, whatever server.run_jobs says
        if args.action == "list":
            _print_json(mw.store.list_jobs(args.user))
        else:
            started = mw.resume_jobs(stale_after_s=args.stale_after)
            mw.drain()
            _print_json({"resumed": started, "still_pending": len(mw.store.list_jobs())})
    return 0


def cmd_redact(args: argparse.Namespace) -> int:
    """Show what ``privacy.redact`` would store for a text (the config's kinds, or --kinds)."""
    from persona_mw.privacy import BUILTIN_DETECTORS, Redactor

    cfg = _config(args)
    if args.kinds:
        cfg.privacy.redact = [k.strip() for k in args.kinds.split(",") if k.strip()]
    elif not cfg.privacy.redact:
        cfg.privacy.redact = list(BUILTIN_DETECTORS)
    r = Redactor.from_config(cfg.privacy)
    print(r.redact(args.text))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    """Long-term memory of one user: list, search, forget (one memory with --id, or all)."""
    with _middleware(args) as mw:
        mem = mw.memory
        mem.require_user(args.user)
        if args.action == "list":
            rows = mem.list(args.user, include_superseded=args.history, context=args.context)
            _print_json([m.model_dump(mode="json", exclude={"embedding"}) for m in rows])
        elif args.action == "search":
            query = args.query or args.query_opt
            if not query:
                raise RequestError("memory search needs a query: persona-mw memory search --user U --query 'QUERY'")
            hits = mem.search(args.user, query, k=args.k, context=args.context, mode=args.mode)
            _print_json([h.as_dict() for h in hits])
        elif args.action == "forget":
            n = mem.forget(args.user, memory_id=args.id)
            _print_json({"user": args.user, "memory": args.id, "deleted": n})
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    with _middleware(args) as mw:
        if args.action == "show":
            if not args.user:
                raise PersonaError("graph show needs a user: persona-mw graph show USER")
            if not mw.store.has_user(args.user):
                from persona_mw.errors import UnknownUserError

                raise UnknownUserError(f"unknown user {args.user!r}")
            _print_json(mw.graph.describe(args.user, args.context))
        elif args.action in ("join", "leave"):
            if not args.user or not args.group:
                raise PersonaError(f"graph {args.action} needs a user and a group: "
                                   f"persona-mw graph {args.action} USER GROUP")
            _print_json(getattr(mw, args.action)(args.user, args.group))
        elif args.action == "export":
            import networkx as nx

            g = mw.graph.export_graph()
            out = args.out or "persona-graph.graphml"
            nx.write_graphml(g, out)
            print(f"wrote {out}: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges", file=sys.stderr)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from persona_mw.manager import PluginHost

    host = PluginHost(autoload=True)
    rows: list[dict[str, Any]] = []
    for name, cls in sorted(host.plugin_types.items()):
        hooks = sorted(a for a in dir(cls) if a.startswith("persona_") and hasattr(getattr(cls, a), "persona_mw_impl"))
        mod = sys.modules.get(cls.__module__)
        rows.append({"name": name, "kind": "plugin", "class": f"{cls.__module__}.{cls.__qualname__}",
                     "version": getattr(mod, "__version__", None) or _dist_version(cls.__module__), "hooks": hooks})
    for name in sorted(host.backend_types):
        rows.append({"name": name, "kind": "backend", "hooks": []})
    for row in host.describe():
        rows.append({"name": row["name"], "kind": "module", "version": row["version"], "hooks": row["hooks"],
                     "source": row["source"]})
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['kind']:<8} {r['name']:<24} {r.get('version') or '':<8} {', '.join(r['hooks'])}")
    if args.hooks:
        from persona_mw.stages import STAGES

        print("\nhooks (in order):")
        for stage in STAGES:
            print(f"  {stage.phase:<9} {stage.hook:<28} {stage.combine:<12} {', '.join(stage.paths)}")
    return 0


def _dist_version(module: str) -> str | None:
    from persona_mw import __version__

    return __version__ if module.startswith("persona_mw") else None


def cmd_config(args: argparse.Namespace) -> int:
    from persona_mw.manager import PluginHost

    cfg = load_config(args.file)
    host = PluginHost(autoload=cfg.autoload_plugins)
    host.build_pipeline(cfg)  # validates every plugin section with its own model
    host.check_names(cfg)  # reward names, backend types and model names, as startup would
    print(f"{args.file}: ok ({len(cfg.pipeline)} plugin(s): {', '.join(p.instance_name for p in cfg.pipeline)})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from persona_mw.eval.cli import run_eval

    if args.benchmark == "style":
        return run_eval(args.benchmark, args.data, args.out, prompts=args.prompts, users=args.users,
                        methods=args.methods, backend=args.backend, config=args.config, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if args.benchmark in ("fermi", "lora"):
        return run_eval(args.benchmark, args.data, args.out, history=args.history, test=args.test, seed=args.seed,
                        fermi=args.fermi, residual=args.residual)
    if args.benchmark in ("locomo", "prefeval"):
        return run_eval(args.benchmark, args.data, args.out, conversations=args.conversations, topics=args.topics,
                        turns=args.turns, forms=args.forms, limit=args.limit, seed=args.seed, backend=args.backend,
                        store=args.store, folds=args.folds, baselines=not args.no_baselines)
    return run_eval(args.benchmark, args.data, args.out, folds=args.folds, inner_folds=args.inner_folds)


def cmd_db(args: argparse.Namespace) -> int:
    from persona_mw.store import open_store

    if args.action == "migrate":
        if args.source or args.target:
            raise PersonaError("db migrate takes the store from --store or the config, not --from/--to")
        cfg = _config(args)
        path = cfg.store.path
        if "#" in path:  # an explicit migrate runs the migrations whatever store.migrate says
            path = path.replace("&migrate=0", "").replace("#migrate=0&", "#").replace("#migrate=0", "")
        store = open_store(path)
        try:
            _print_json({"store": repr(store), "schema_version": store.schema_version()})
        finally:
            store.close()
        return 0
    if not args.source or not args.target:
        raise PersonaError("db copy needs --from SOURCE and --to TARGET",
                           hint="e.g. persona-mw db copy --from persona.db --to postgresql://user@host/db")
    from persona_mw.store.copy import copy_store

    source, target = open_store(args.source), open_store(args.target)
    try:
        report = copy_store(source, target, log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        source.close()
        target.close()
    _print_json(report)
    return 0 if not report["mismatched_users"] else 1


def cmd_models(args: argparse.Namespace) -> int:
    from persona_mw import models

    if args.action == "list":
        for spec in models.list_models():
            print(f"{spec.name:<26} {'cached' if spec.cached else 'not cached':<11} {spec.description}")
    elif args.action == "pull":
        path = models.resolve(args.name)
        print(path)
    return 0


# -- parser -----------------------------------------------------------------------------------


AddCommand = Callable[..., argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-mw", description="Middleware that personalizes any LLM.")
    parser.add_argument("--version", action="version", version=f"persona-mw {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if config:
            p.add_argument("--config", help="pipeline YAML (default: $PERSONA_MW_CONFIG or the embedded default)")
            p.add_argument("--store", help="a SQLite store path or a postgresql:// URL (overrides the config)")
        p.set_defaults(func=func)
        return p

    _add_turn_commands(add)
    _add_user_commands(add)
    _add_admin_commands(add)
    _add_eval_command(add)
    _plugin_commands(sub)
    return parser


def _add_turn_commands(add: AddCommand) -> None:
    """demo, chat, serve, feedback."""
    p = add("demo", cmd_demo, "two users, two stated preferences, two answers from the local model", config=False)
    p.add_argument("--question", help="the question both users ask")
    p.add_argument("--dtype", default="int4", choices=["int4", "int8", "float32", "bfloat16"],
                   help="the local model's weights (default int4, the fast setting; the backend's default is float32)")

    p = add("chat", cmd_chat, "send one message as a user")
    p.add_argument("--user", "-u", required=True, help="the user's id (letters, digits and _.-+@)")
    p.add_argument("--context", "-c", help="a context tag for this request, e.g. coding")
    p.add_argument("--group", "-g", action="append", help="a group the user belongs to (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--max-tokens", type=int, help="length limit of the answer in tokens (default: the backend's)")
    p.add_argument("--trace", action="store_true", help="print the trace to stderr")
    p.add_argument("message", help="what the user says")

    p = add("serve", cmd_serve, "OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="port to listen on (default 8700)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default: config, 1 MiB)")
    p.add_argument("--api-key", action="append", metavar="TENANT=KEY",
                   help="require this key for TENANT (repeatable; adds to the config's server.api_keys)")
    p.add_argument("--no-jobs", action="store_true",
                   help="record after-turn jobs for `persona-mw worker` processes instead of running them here")

    p = add("worker", cmd_worker, "run after-turn jobs (memory extraction, profile refits, FERMI, persona "
            "inference) claimed from the store, for servers started with --no-jobs, and finish the "
            "feedback events a killed process left half-applied")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between looks for new jobs (default 0.5)")
    p.add_argument("--stale-after", type=float, default=300.0,
                   help="take over a job another live process claimed longer ago than this (default 300 s)")
    p.add_argument("--once", action="store_true", help="exit when no job is left that this worker may take")

    p = add("mcp", cmd_mcp, "MCP server (Model Context Protocol): memories, feedback, profile and the "
            "personalized prompt as tools, over stdio or streamable HTTP")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                   help="stdio (default: for a client that starts the server) or http (streamable HTTP at /mcp)")
    p.add_argument("--host", default="127.0.0.1", help="with http: address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8701, help="with http: port to listen on (default 8701)")
    p.add_argument("--api-key", action="append", metavar="TENANT=KEY",
                   help="require this key for TENANT (repeatable; adds to the config's server.api_keys)")
    p.add_argument("--tenant", help="with stdio: the tenant whose store to serve (default: $PERSONA_MW_TENANT; "
                   "required when API keys are configured)")

    p = add("feedback", cmd_feedback, "record feedback for a user")
    p.add_argument("--user", "-u", required=True, help="the user's id")
    p.add_argument("--context", "-c", help="the context the feedback applies to (default: everywhere)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stated", help="a preference the user likes, in words")
    g.add_argument("--avoid", help="something the user wants avoided, in words")
    g.add_argument("--json", help='a feedback event as JSON, e.g. {"kind": "choice", ...}')


def _add_user_commands(add: AddCommand) -> None:
    """profile, jobs, redact, memory, graph."""
    p = add("profile", cmd_profile, "show, export, forget or rebuild a user's profile")
    p.add_argument("action", choices=["show", "export", "forget", "rebuild"], help="what to do")
    p.add_argument("user", help="the user's id")
    p.add_argument("--context", "-c", help="with show: resolve the scope in this context")
    p.add_argument("--out", help="with export: write JSON here")
    p.add_argument("--full", action="store_true", help="with show: print preference vectors whole (long)")
    p.add_argument("--yes", "-y", action="store_true", help="with forget: do not ask for confirmation")

    p = add("jobs", cmd_jobs, "pending background (after-turn) jobs: list, or resume them now")
    p.add_argument("action", choices=["list", "resume"], help="what to do")
    p.add_argument("--user", "-u", help="with list: only this user's")
    p.add_argument("--stale-after", type=float, default=0.0,
                   help="with resume: only jobs claimed longer ago than this many seconds (default 0: all)")

    p = add("redact", cmd_redact, "show a text as privacy.redact would store it")
    p.add_argument("text", help="the text to redact")
    p.add_argument("--kinds", help="comma-separated PII kinds (default: the config's, else all built-in)")

    p = add("memory", cmd_memory, "a user's long-term memories: list, search, forget")
    p.add_argument("action", choices=["list", "search", "forget"], help="what to do")
    p.add_argument("query", nargs="?", help="with search: what to look for (or --query)")
    p.add_argument("--query", "-q", dest="query_opt", help="with search: what to look for")
    p.add_argument("--user", "-u", required=True, help="the user's id")
    p.add_argument("--context", "-c", help="only this context's memories (and its scope, for search)")
    p.add_argument("--k", type=int, default=10, help="with search: results (default 10)")
    p.add_argument("--mode", choices=["fused", "hybrid", "bm25", "dense"], default="fused", help="with search: retriever")
    p.add_argument("--history", action="store_true", help="with list: include superseded memories")
    p.add_argument("--id", help="with forget: only this memory (and its history); default: all of the user's")

    p = add("graph", cmd_graph, "the preference graph: show a user's neighbourhood, join or leave a group "
            "(permanent membership), or export it all as GraphML")
    p.add_argument("action", choices=["show", "join", "leave", "export"], help="what to do")
    p.add_argument("user", nargs="?", help="with show, join, leave: the user")
    p.add_argument("group", nargs="?", help="with join, leave: the group")
    p.add_argument("--context", "-c", help="with show: include the user's nodes in this context")
    p.add_argument("--out", help="with export: the GraphML file (default persona-graph.graphml)")


def _add_admin_commands(add: AddCommand) -> None:
    """plugins, config, models."""
    p = add("plugins", cmd_plugins, "list plugins, backends and their hooks", config=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--hooks", action="store_true", help="also list every hook and its combine rule")

    p = add("config", cmd_config, "validate a pipeline YAML", config=False)
    p.add_argument("action", choices=["validate"], help="what to do")
    p.add_argument("file", help="the pipeline YAML file")

    p = add("models", cmd_models, "local models: list, or pull (fetch and cache) one", config=False)
    p.add_argument("action", choices=["list", "pull"], help="what to do")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="with pull: the model (default %(default)s)")


def _add_eval_command(add: AddCommand) -> None:
    p = add("eval", cmd_eval, "benchmarks: profiles from choices (dsp), pluralistic users (traits), "
            "style following (style)", config=False)
    p.add_argument("benchmark", choices=["dsp", "traits", "style", "fermi", "lora", "locomo", "prefeval"], help="which benchmark")
    p.add_argument("--data", required=True, help="folder in the benchmark's layout")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--prompts", type=int, default=24, help="style: prompts (the folder's queries, in file order)")
    p.add_argument("--users", type=int, default=6, help="style: simulated users (fixed seed)")
    p.add_argument("--methods", help="style: comma-separated methods (default: all registered)")
    p.add_argument("--backend", help="style: a local model name/path or a litellm model (default: the local model); "
                   "prefeval: a litellm model that judges the options (default: local scorers)")
    p.add_argument("--config", help="style: the pipeline YAML the 'pipeline' method runs (default: the embedded one)")
    p.add_argument("--seed", type=int, default=0,
                   help="style: seed of users and decoding; prefeval: seed of the option shuffle; "
                   "fermi, lora: seed of the split and the histories")
    p.add_argument("--max-new-tokens", type=int, default=96, help="style: answer length cap in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="style: sequences decoded together")
    p.add_argument("--history", type=int, default=20, help="fermi, lora: choices observed per user")
    p.add_argument("--test", type=int, default=24, help="fermi, lora: held-out queries scored per user")
    p.add_argument("--fermi", help="lora: an `eval fermi` result (its --out) of the same seed, history and test "
                   "queries, whose persona/optimized figures join the report")
    p.add_argument("--residual", action="store_true", help="lora: also report lora_member, a user with the same "
                   "choices who is a member of the group, trained with the plugin's residual: true over the group's "
                   "adapter")
    p.add_argument("--conversations", help="locomo: comma-separated sample_ids (default: all)")
    p.add_argument("--topics", help="prefeval: comma-separated topics (default: all)")
    p.add_argument("--turns", default="0,10,100,300", help="prefeval: distractor turns N, comma-separated")
    p.add_argument("--forms", default="explicit,choice,persona", help="prefeval: preference forms, comma-separated")
    p.add_argument("--limit", type=int, help="prefeval: items per topic (default: all)")
    p.add_argument("--folds", type=int, help="K-fold cross-validation, reporting mean, spread and per-fold values. "
                   "dsp, traits: nested (outer folds over queries or statements x users; every setting chosen by an "
                   "inner CV on the training folds). locomo: the retrieval settings chosen on the training folds "
                   "(folds over conversations when there are at least K, else over questions)")
    p.add_argument("--inner-folds", type=int, default=2, help="dsp, traits: folds of the inner CV (default %(default)s)")
    p.add_argument("--no-baselines", action="store_true", help="prefeval: skip the no_memory/bm25_top5 baselines")
    p.add_argument("--store", help="locomo: run through this store (a SQLite path or a postgresql:// DSN; "
                   "Postgres gets a fresh schema, dropped after). Default: a temporary SQLite file")

    p = add("db", cmd_db, "the store's schema and data: migrate (apply pending schema migrations), "
            "copy (move a deployment to another store, e.g. SQLite to Postgres, checked user by user)")
    p.add_argument("action", choices=["migrate", "copy"], help="what to do")
    p.add_argument("--from", dest="source", help="with copy: the store to read (a SQLite path or store URL)")
    p.add_argument("--to", dest="target", help="with copy: the store to write (a postgresql:// DSN or path); "
                   "must be empty")


def _plugin_commands(sub: Any) -> None:
    """Let plugins add subcommands (``persona_register_commands``)."""
    from persona_mw.manager import PluginHost

    try:
        PluginHost(autoload=True).pm.hook.persona_register_commands(cli=sub)
    except PersonaError as exc:
        print(f"warning: plugin commands unavailable: {exc}", file=sys.stderr)


def _version() -> str:
    from persona_mw import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: argparse gives an optional positional (``memory search --user ana "q"``) its
    # empty value when it reaches it before the options, and then calls the word itself unrecognized.
    args, extra = parser.parse_known_args(argv)
    late = [name for cmd, name in (("memory", "query"), ("graph", "user"))
            if args.command == cmd and getattr(args, name, "-") is None]
    while extra and late and not extra[0].startswith("-"):
        setattr(args, late.pop(0), extra.pop(0))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (BackendError, PluginError) as exc:
        if os.environ.get("PERSONA_MW_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PersonaError as exc:
        if os.environ.get("PERSONA_MW_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
