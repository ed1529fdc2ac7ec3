"""``make soak-pg``: the multi-worker soak on one Postgres (issue #15). Not in CI.

A PostgreSQL 16 + pgvector from ``pgserver`` (in a temp folder); ``persona-mw db migrate``; 4 ``persona-mw
serve --no-jobs`` processes and 1 ``persona-mw worker`` on it (real subprocesses of the CLI, loopback ports),
their backend the instant ``echo`` backend of tests/reliability/soak_pg_cli.py (the caller gets the whole
prompt back, so another user's data in a prompt shows up as a foreign marker); 64 concurrent
clients (httpx, asyncio) doing interleaved chat / feedback (stated, choice, rating) / forget / reads for
overlapping users, each request to a random serve process (one user hits every process); every few
seconds a random serve process (every 4th time the job worker) is killed with SIGKILL and restarted.

Reported (last stdout line = JSON, also benchmarks/results/soak_pg.json):

- ``lost_events``: acknowledged feedback (201) missing from the store after the run, except events of a
  user whose forget had not finished before the event was sent (forgotten after, or overlapping);
- ``profile_drift``: users whose stored profile (evidence, stated preferences, comparison pairs) differs
  from a rebuild from their events (``Middleware.rebuild``, the ``profile rebuild`` verb);
- ``jobs_lost``: jobs left in the store after the worker drained them, plus acknowledged chat turns
  whose after-turn effect (the turn kept verbatim as a memory, ``store_turns``) is missing (same forget rule);
- ``leaks``: isolation probes (markers as in tests/reliability/probes.py) where a user's chat answer,
  profile, export, memories or memory search held a marker of another user;
- ``5xx_outside_kill_windows`` (must be 0) and ``5xx_in_kill_windows``: HTTP 5xx and connection errors.
  The kill window of a kill is [SIGKILL, the restarted process answering /healthz + 2 s], on the killed
  process's port only; a request is in it when its [sent, answered] interval overlaps it.

    python -m tests.reliability.soak_pg [--duration 240] [--clients 64] [--users 48] [--kill-every 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SERVERS = 4
GRACE_S = 2.0  # after a restarted process answers /healthz


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text() -> str:
    return ("backend: {type: echo}\n"  # registered by tests/reliability/soak_pg_cli.py
            "logging: {level: WARNING}\n"
            "pipeline:\n"
            "  - use: stated\n    placement: user_suffix\n    budget_tokens: 2000\n"
            "  - use: profile\n    features: {embedding: false, ngram_dim: 256}\n"
            "  - use: memory\n    embedder: false\n    mode: bm25\n    store_turns: true\n    turn_window: 0\n")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n--- start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=str(REPO))

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_ready(client: Any, port: int, proc: Proc, timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: see {proc.log}")
        try:
            r = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            if r.status_code == 200:
                return time.monotonic()
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout} s: see {proc.log}")


@dataclass
class Ledger:
    """What the clients sent and what was acknowledged, by user (times: time.monotonic())."""

    users: list[str]
    owned: dict[str, set[str]] = field(default_factory=dict)  # user -> markers handed out for them
    owner: dict[str, str] = field(default_factory=dict)  # marker -> user
    events: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # acked feedback: (marker, sent)
    cut: dict[str, list[str]] = field(default_factory=dict)  # feedback sent, no answer (a kill): markers
    turns: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # acked chats: (marker, sent)
    forgets: dict[str, list[float]] = field(default_factory=dict)  # end (answer or error) of each forget sent
    # port, sent, end, kind, outcome, user
    requests: list[tuple[int, float, float, str, str, str]] = field(default_factory=list)
    probes: int = 0
    leaks: list[str] = field(default_factory=list)
    echo_missing: int = 0
    own_stated_seen: int = 0
    other_4xx: list[str] = field(default_factory=list)
    forget_share: float = 0.01

    def marker(self, user: str) -> str:
        from .probes import marker

        mk = marker()
        self.owned.setdefault(user, set()).add(mk)
        self.owner[mk] = user
        return mk

    def check(self, user: str, text: str, where: str) -> None:
        from .probes import _MARK

        self.probes += 1
        foreign = sorted({m for m in _MARK.findall(text) if m in self.owner and self.owner[m] != user})
        if foreign:
            self.leaks.append(f"{where}: {user} saw {[(m, self.owner[m]) for m in foreign[:3]]}")

    def expected(self, user: str, sent: float) -> bool:
        """An acknowledged write must be in the store unless a forget of its user ended after it was sent."""
        return all(end < sent for end in self.forgets.get(user, []))


async def one_request(client: Any, ledger: Ledger, rng: random.Random, ports: list[int]) -> None:
    user = rng.choice(ledger.users)
    port = rng.choice(ports)
    base = f"http://127.0.0.1:{port}"
    roll = rng.random()
    kind, mk = "chat", None
    try:
        sent = time.monotonic()
        if roll < 0.40:
            mk = ledger.marker(user)
            body = {"model": "m", "user": user, "stream": rng.random() < 0.2,
                    "messages": [{"role": "user", "content": f"Tell me about subject {rng.randrange(10**6)}, note {mk}"}]}
            r = await client.post(base + "/v1/chat/completions", json=body)
        elif roll < 0.75:
            mk = ledger.marker(user)
            kind = rng.choice(("stated", "stated", "choice", "rating"))
            ev: dict[str, Any] = {"kind": kind, "user": user}
            if kind == "stated":
                ev["text"] = f"I like answers about item {rng.randrange(1000)}, ref {mk}"
            elif kind == "choice":
                ev.update(prompt=f"which one? {mk}", chosen=f"short answer {rng.randrange(1000)}",
                          rejected=[f"a much longer answer number {rng.randrange(1000)} " * 3])
            else:
                ev.update(prompt=f"rate this {mk}", response=f"an answer {rng.randrange(1000)}",
                          rating=round(rng.random(), 2))
            r = await client.post(base + "/v1/feedback", json=ev)
        elif roll < 0.75 + ledger.forget_share:
            kind = "forget"
            r = await client.delete(f"{base}/v1/users/{user}")
        else:
            kind = rng.choice(("profile", "export", "memories", "search"))
            path = {"profile": f"/v1/users/{user}/profile", "export": f"/v1/users/{user}",
                    "memories": f"/v1/users/{user}/memories?include_superseded=true",
                    "search": f"/v1/users/{user}/memories/search?q=subject+answers+note&k=50&mode=bm25"}[kind]
            r = await client.get(base + path)
    except Exception as exc:  # connection refused / reset (a killed process), timeout
        end = time.monotonic()
        ledger.requests.append((port, sent, end, kind, f"error:{type(exc).__name__}", user))
        if kind in ("stated", "choice", "rating") and mk is not None:
            ledger.cut.setdefault(user, []).append(mk)
        if kind == "forget":
            ledger.forgets.setdefault(user, []).append(end)
        await asyncio.sleep(0.05)
        return
    end = time.monotonic()
    ledger.requests.append((port, sent, end, kind, str(r.status_code), user))
    if kind == "forget":
        ledger.forgets.setdefault(user, []).append(end)
    if r.status_code >= 500 or (r.status_code >= 400 and r.status_code != 404):
        if r.status_code < 500:
            ledger.other_4xx.append(f"{kind} {r.status_code} {r.text[:200]}")
        return
    if kind == "chat" and r.status_code == 200:
        text = r.text
        ledger.check(user, text, "chat answer")
        if mk not in text:
            ledger.echo_missing += 1
        if any(m in text for m in ledger.owned[user] if m != mk):
            ledger.own_stated_seen += 1
        ledger.turns.setdefault(user, []).append((mk or "", sent))
    elif kind in ("stated", "choice", "rating") and r.status_code == 201:
        ledger.events.setdefault(user, []).append((mk or "", sent))
    elif kind in ("profile", "export", "memories", "search") and r.status_code == 200:
        ledger.check(user, r.text, f"GET {kind}")


async def clients(n: int, ledger: Ledger, ports: list[int], until: float, seed: int) -> None:
    import httpx

    # No keep-alive: a pooled connection the server closes as it is reused fails without the server
    # having failed (a client-side race that would count as a 5xx-like error outside any kill window).
    limits = httpx.Limits(max_connections=n * 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def loop(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < until:
                await one_request(client, ledger, rng, ports)

        await asyncio.gather(*(loop(i) for i in range(n)))


async def killer(servers: list[Proc], worker: Proc, until: float, every: float, seed: int,
                 windows: list[tuple[int, float, float]], kills: dict[str, int]) -> None:
    import httpx

    rng = random.Random(seed)
    n = 0
    async with httpx.AsyncClient() as client:
        while every > 0:
            await asyncio.sleep(rng.uniform(0.75 * every, 1.25 * every))
            if time.monotonic() >= until:
                return
            n += 1
            if n % 4 == 2:  # the job worker (at least once in any run of two kills or more)
                worker.kill()
                worker.start()
                kills["worker"] += 1
                continue
            victim = rng.choice(servers)
            assert victim.port is not None
            t_kill = time.monotonic()
            victim.kill()
            victim.start()
            ready = await wait_ready(client, victim.port, victim)
            windows.append((victim.port, t_kill, ready + GRACE_S))
            kills["serve"] += 1


def classify(ledger: Ledger, windows: list[tuple[int, float, float]]) -> dict[str, Any]:
    inside = outside = 0
    examples: list[str] = []
    for port, sent, end, kind, outcome, _user in ledger.requests:
        if not (outcome.startswith("error") or outcome.startswith("5")):
            continue
        if any(p == port and sent <= w1 and end >= w0 for p, w0, w1 in windows):
            inside += 1
        else:
            outside += 1
            if len(examples) < 10:
                examples.append(f"{kind} on :{port} -> {outcome}")
    return {"in": inside, "out": outside, "examples": examples}


def drain_jobs(store: Any, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        left = len(store.list_jobs())
        if not left:
            return 0, time.monotonic() - t0
        time.sleep(1.0)
    return len(store.list_jobs()), time.monotonic() - t0


def verify(url: str, cfg_text: str, ledger: Ledger) -> dict[str, Any]:
    """After the run (every process stopped): events kept, after-turn effects, profiles vs rebuilds,
    and one last isolation pass over every user's export."""
    from persona_mw import Middleware, parse_config
    from persona_mw.nodes import user_node
    from persona_mw.testing import ScriptedBackend

    cfg = parse_config(cfg_text)
    mw = Middleware(cfg, store=url, backend=ScriptedBackend(), autoload=False, run_jobs=False)
    lost: list[str] = []
    missing_effects: list[str] = []
    drift: list[str] = []
    cut_stored = 0  # events of requests cut by a kill that were stored anyway (their effects: the worker's)
    try:
        for user in ledger.users:
            stored = json.dumps([e.model_dump(mode="json") if hasattr(e, "model_dump") else e
                                 for e in mw.store.list_feedback(user)], default=str)
            for mk, sent in ledger.events.get(user, []):
                if ledger.expected(user, sent) and mk not in stored:
                    lost.append(f"{user}: {mk}")
            cut_stored += sum(mk in stored for mk in ledger.cut.get(user, []))
            mems = " ".join(m.text for m in mw.store.list_memories(user_node(user), include_superseded=True))
            for mk, sent in ledger.turns.get(user, []):
                if ledger.expected(user, sent) and mk not in mems:
                    missing_effects.append(f"{user}: turn {mk}")
            export = json.dumps(mw.store.export_user(user), default=str)
            ledger.check(user, export, "final export")
            before = mw.store.get_profile(user_node(user))
            if not mw.store.has_user(user):  # forgotten last: nothing to rebuild, nothing may be left
                if before is not None:
                    drift.append(f"{user}: a profile without the user")
                continue
            mw.rebuild(user)
            after = mw.store.get_profile(user_node(user))
            if _profile_key(before) != _profile_key(after):
                drift.append(f"{user}: stored {_short(before)} rebuilt {_short(after)}")
    finally:
        mw.close()
    return {"lost": lost, "missing_effects": missing_effects, "drift": drift, "cut_stored": cut_stored}


def traceback_excerpts(logs: list[Path], most: int = 3) -> list[str]:
    """The first ``most`` tracebacks in the processes' logs, each with the 3 lines logged before it."""
    out: list[str] = []
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback") and len(out) < most:
                end = i + 1
                while end < len(lines) and end < i + 60 and (lines[end].startswith((" ", "\t")) or end == i + 1):
                    end += 1
                out.append("\n".join([f"{log.name}:", *lines[max(0, i - 3):min(len(lines), end + 1)]]))
    return out


def _profile_key(prof: Any) -> tuple[Any, ...]:
    if prof is None:
        return (0, (), 0)
    pairs = (prof.extra or {}).get("profile", {}).get("pairs", 0)
    return (prof.evidence, tuple(sorted(s.text for s in prof.stated)), pairs)


def _short(prof: Any) -> tuple[Any, ...]:
    evidence, stated, pairs = _profile_key(prof)
    return (evidence, len(stated), pairs)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=240.0, help="seconds of load (default 240)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--users", type=int, default=48, help="users shared by every client and process (default 48)")
    ap.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between SIGKILLs (default 4)")
    ap.add_argument("--forget-share", type=float, default=0.01, help="share of requests that forget a user")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, database)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak_pg.json"))
    args = ap.parse_args()

    import pgserver

    load_before = _load()
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="persona-soak-pg-"))
    server = pgserver.get_server(str(tmp / "pg"), cleanup_mode=None if args.keep else "delete")
    url = f"{server.get_uri()}#schema=soak&pool_max=8"
    cfg_text = config_text()
    cfg_path = tmp / "persona.yaml"
    cfg_path.write_text(cfg_text)
    cli = [sys.executable, "-m", "tests.reliability.soak_pg_cli"]  # persona-mw, plus the echo backend
    servers = [Proc(f"serve{i}", [], tmp / f"serve{i}.log", port=free_port()) for i in range(SERVERS)]
    for s in servers:
        s.argv = cli + ["serve", "--no-jobs", "--config", str(cfg_path), "--store", url, "--port", str(s.port)]
    worker = Proc("worker", cli + ["worker", "--config", str(cfg_path), "--store", url, "--poll", "0.2"],
                  tmp / "worker.log")
    ledger = Ledger(users=[f"user{i:03d}" for i in range(args.users)], forget_share=args.forget_share)
    windows: list[tuple[int, float, float]] = []
    kills = {"serve": 0, "worker": 0}
    result: dict[str, Any] = {}
    procs = [*servers, worker]
    try:
        migrate = subprocess.run(cli + ["db", "migrate", "--config", str(cfg_path), "--store", url],
                                 capture_output=True, text=True, env=_env(), timeout=300)
        if migrate.returncode != 0:
            raise RuntimeError(f"db migrate failed: {migrate.stderr[-2000:]}")
        for p in procs:
            p.start()

        async def run() -> float:
            import httpx

            async with httpx.AsyncClient() as c:
                for s in servers:
                    assert s.port is not None
                    await wait_ready(c, s.port, s, timeout=300)
            t0 = time.monotonic()
            until = t0 + args.duration
            ports = [s.port for s in servers if s.port is not None]
            await asyncio.gather(clients(args.clients, ledger, ports, until, args.seed),
                                 killer(servers, worker, until, args.kill_every, args.seed, windows, kills))
            return time.monotonic() - t0

        print(f"soak-pg: {SERVERS} serve --no-jobs + 1 worker on {url.split('@')[-1]}, {args.clients} clients, "
              f"{args.duration:.0f} s", file=sys.stderr, flush=True)
        load_duration = asyncio.run(run())
        from persona_mw.store import open_store

        store = open_store(url)
        try:
            jobs_left, drain_s = drain_jobs(store, timeout=240)
        finally:
            store.close()
        for p in (*servers, worker):
            p.stop()
        v = verify(url, cfg_text, ledger)
        c5 = classify(ledger, windows)
        crashed = sum(p.popen is not None and p.popen.returncode not in (0, -signal.SIGTERM) for p in (*servers, worker))
        tracebacks = sum(p.log.read_text(errors="replace").count("Traceback") for p in (*servers, worker))
        excerpts = traceback_excerpts([p.log for p in (*servers, worker)])
        by_kind: dict[str, int] = {}
        for _, _, _, kind, _, _ in ledger.requests:
            by_kind[kind] = by_kind.get(kind, 0) + 1
        ok_requests = sum(r[4].startswith("2") for r in ledger.requests)
        # Users with a feedback request cut by a SIGKILL (no answer): its event is stored with a job that
        # owes its profile writes, which the job worker applies (each write once); a drift among these
        # users would mean that replay failed.
        cut = {r[5] for r in ledger.requests if r[3] in ("stated", "choice", "rating") and r[4].startswith("error")
               and any(p == r[0] and r[1] <= w1 and r[2] >= w0 for p, w0, w1 in windows)}
        drifted = [d.split(":")[0] for d in v["drift"]]
        result = {
            "lost_events": len(v["lost"]),
            "acked_events": sum(len(x) for x in ledger.events.values()),
            "acked_events_checked": sum(ledger.expected(u, s) for u, evs in ledger.events.items() for _, s in evs),
            "profile_drift": len(v["drift"]), "profiles_checked": len(ledger.users),
            "profile_drift_users_with_feedback_cut_by_a_kill": sum(u in cut for u in drifted),
            "feedback_cut_by_a_kill": sum(len(x) for x in ledger.cut.values()),
            "feedback_cut_by_a_kill_but_stored": v["cut_stored"],
            "jobs_lost": jobs_left + len(v["missing_effects"]), "jobs_left_after_drain": jobs_left,
            "after_turn_effects_missing": len(v["missing_effects"]),
            "acked_turns": sum(len(x) for x in ledger.turns.values()),
            "acked_turns_checked": sum(ledger.expected(u, s) for u, ts in ledger.turns.items() for _, s in ts),
            "drain_s": round(drain_s, 1),
            "leaks": len(ledger.leaks), "probes": ledger.probes,
            "echo_missing": ledger.echo_missing, "answers_with_own_earlier_markers": ledger.own_stated_seen,
            "5xx_outside_kill_windows": c5["out"], "5xx_in_kill_windows": c5["in"],
            "kill_window": f"SIGKILL to restarted process answering /healthz + {GRACE_S:.0f} s, killed port only",
            "unexpected_4xx": len(ledger.other_4xx),
            "requests": len(ledger.requests), "requests_ok": ok_requests, "requests_by_kind": by_kind,
            "requests_per_s": round(len(ledger.requests) / load_duration, 1),
            "kills_serve": kills["serve"], "kills_worker": kills["worker"],
            "forgets": sum(len(x) for x in ledger.forgets.values()),
            "server_tracebacks_in_logs": tracebacks, "processes_exited_badly": crashed,
            "serve_processes": SERVERS, "job_workers": 1, "clients": args.clients, "users": args.users,
            "duration_s": round(load_duration, 1), "total_s": round(time.monotonic() - t_start, 1),
            "loadavg_before": load_before, "loadavg_after": _load(),
            "examples": {"lost": v["lost"][:5], "drift": v["drift"][:5], "missing_effects": v["missing_effects"][:5],
                         "leaks": ledger.leaks[:5], "5xx_outside": c5["examples"], "4xx": ledger.other_4xx[:5]},
            "logs": str(tmp) if args.keep else None,
            "traceback_excerpts": excerpts,  # kept here: the logs go with the temp folder
        }
    finally:
        for p in procs:
            p.stop()
        server.cleanup()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    bad = (result["lost_events"] or result["profile_drift"] or result["jobs_lost"] or result["leaks"]
           or result["5xx_outside_kill_windows"] or result["probes"] < 5000 or not result["kills_worker"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
