"""Bounded work under attack (issue #17): another tenant's chat latency while one tenant sends
group bombs, size bombs, join/context/stated spam. Part of ``make soak``; alone:

    python -m tests.reliability.soak_bounds [--idle 300] [--during 300] [--bombers 2] [--latency-ms 50] [--rate 4]

Every tenant gets the same rate limit, ``server.rate_limit: {requests_per_s: 10, burst: 10,
bytes_per_token: 16384, hold_s: 1}`` (``RATE_LIMIT``; the victim sends 4 small req/s, 1 token each;
an 84 KB size bomb costs 6; the bombers send flat out and get 429s, held 1 s each, whose
Retry-After they ignore).
The victim tenant's p95 during the attack must stay within 2x its idle p95; its requests go out
at a fixed rate (open loop), so a server stalled by a bomb delays every request due meanwhile. The attacker runs in
separate processes (its own CPU work is not charged to the server's interpreter); the backend
answers after ``--latency-ms`` (a remote LLM's latency), the rest is the real server, store and
pipeline (stated preferences, profile, BM25 memory). Prints a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEYS = {"victim": ["key-victim"], "attacker": ["key-attacker"]}
# The same per-tenant rate limit for victim and attacker (server.rate_limit): the victim's 4 small
# req/s fit well inside it, the attacker's flat-out loops get 429s before their bodies are read.
RATE_LIMIT = {"requests_per_s": 10.0, "burst": 10, "bytes_per_token": 16384, "hold_s": 1.0}
PIPELINE = """server:
  rate_limit: {requests_per_s: %(requests_per_s)s, burst: %(burst)s, bytes_per_token: %(bytes_per_token)s,
               hold_s: %(hold_s)s}
pipeline:
  - use: stated
  - use: profile
    features: {embedding: false, ngram_dim: 256}
  - use: memory
    embedder: false
    mode: bm25
    store_turns: true
"""


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1] if len(xs) >= 20 else max(xs)


def _bomber(url: str, seconds: float, seed: int, out: Any) -> None:
    """One attacker process: cycles through the bombs until ``seconds`` have passed."""
    import httpx

    h = {"Authorization": "Bearer key-attacker"}
    statuses: dict[str, dict[int, int]] = {}
    stop = time.monotonic() + seconds
    i = 0

    def note(kind: str, r: httpx.Response) -> None:
        statuses.setdefault(kind, {})
        statuses[kind][r.status_code] = statuses[kind].get(r.status_code, 0) + 1

    groups_bomb = {"user": f"bomber{seed}", "messages": [{"role": "user", "content": "hi"}],
                   "groups": [f"team-{k:05d}" for k in range(20_000)]}  # ~165 KB
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < stop:
            kind = ("groups_bomb", "groups_max", "size_bomb", "join_spam", "context_spam", "stated_spam")[i % 6]
            u = f"bomber{seed}"
            try:
                if kind == "groups_bomb":
                    r = c.post(f"{url}/v1/chat/completions", json=groups_bomb, headers=h)
                elif kind == "groups_max":
                    r = c.post(f"{url}/v1/chat/completions", headers=h, json={
                        "user": u, "messages": [{"role": "user", "content": "hi"}],
                        "groups": [f"g{i}-{k}" for k in range(16)]})
                elif kind == "size_bomb":
                    r = c.post(f"{url}/v1/chat/completions", headers=h, json={
                        "user": u, "messages": [{"role": "user", "content": f"word{i} " * 12_000}]})
                elif kind == "join_spam":
                    r = c.put(f"{url}/v1/users/{u}/groups/j{i}", headers=h)
                elif kind == "context_spam":
                    r = c.post(f"{url}/v1/feedback", headers=h, json={
                        "kind": "stated", "user": u, "context": f"c{i}", "text": f"rule {i}"})
                else:
                    r = c.post(f"{url}/v1/feedback", headers=h, json={"kind": "stated", "user": u,
                                                                      "text": f"rule {i} " + "x" * 1500})
                note(kind, r)
            except httpx.HTTPError as exc:
                statuses.setdefault(kind, {}).setdefault(-1, 0)
                statuses[kind][-1] += 1
                print(f"bomber: {kind}: {exc}", file=sys.stderr)
            i += 1
    out.put(statuses)


def bounds_soak(root: Path, *, idle: int = 300, during: int = 300, bombers: int = 2, latency_ms: float = 50.0,
                rate: float = 4.0) -> dict[str, Any]:
    import httpx

    from persona_mw import Middleware, parse_config
    from persona_mw.server import create_app, serve_in_thread
    from persona_mw.testing import ScriptedBackend

    cfg = parse_config(PIPELINE % RATE_LIMIT)
    cfg.store.path = str(root / "bounds.db")
    mw = Middleware(cfg, backend=ScriptedBackend(delay=latency_ms / 1000), autoload=False)
    lim = mw.config.limits
    victim_h = {"Authorization": "Bearer key-victim"}
    try:
        with serve_in_thread(create_app(mw, api_keys=KEYS)) as url, httpx.Client(timeout=60) as client:
            client.post(f"{url}/v1/feedback", headers=victim_h,
                        json={"kind": "stated", "user": "vic", "text": "Be brief."})

            def victim_chat(j: int) -> float:
                t = time.perf_counter()
                with httpx.Client(timeout=300) as c:
                    r = c.post(f"{url}/v1/chat/completions", headers=victim_h, json={
                        "user": f"vic{j % 4}", "messages": [{"role": "user", "content": f"How do I boil an egg? {j}"}]})
                if r.status_code != 200:
                    raise RuntimeError(f"victim request failed: {r.status_code} {r.text[:200]}")
                return (time.perf_counter() - t) * 1000

            def open_loop(n: int, first: int) -> list[float]:
                """``n`` victim requests sent at a fixed rate whatever the answers' pace (open loop:
                a stalled server delays every request due meanwhile, not just the one in flight)."""
                import concurrent.futures

                with concurrent.futures.ThreadPoolExecutor(64) as pool:
                    futs = []
                    t0 = time.perf_counter()
                    for j in range(n):
                        time.sleep(max(0.0, t0 + j / rate - time.perf_counter()))
                        futs.append(pool.submit(victim_chat, first + j))
                    return [f.result() for f in futs]

            for j in range(10):  # warm-up
                victim_chat(j)
            idle_ms = open_loop(idle, 0)
            seconds = during / rate + 10  # the whole measured window is under attack
            ctx = mp.get_context("spawn")
            q: Any = ctx.Queue()
            procs = [ctx.Process(target=_bomber, args=(url, seconds, k, q), daemon=True) for k in range(bombers)]
            for p in procs:
                p.start()
            time.sleep(4.0)  # the bombers are up and sending
            t_attack = time.monotonic()
            during_ms = open_loop(during, idle)
            attack_s = time.monotonic() - t_attack
            statuses: dict[str, dict[int, int]] = {}
            for p in procs:
                p.join(timeout=seconds + 120)
            for _ in procs:
                for kind, counts in q.get(timeout=30).items():
                    for code, n in counts.items():
                        statuses.setdefault(kind, {})
                        statuses[kind][code] = statuses[kind].get(code, 0) + n
            alive = sum(p.is_alive() for p in procs)
            for p in procs:
                if p.is_alive():
                    p.kill()
    finally:
        mw.close()
    # what the attack left in the attacker's tenant store
    from persona_mw.store import open_store
    from persona_mw.tenancy import tenant_store_path

    st = open_store(tenant_store_path(str(root / "bounds.db"), "attacker"))
    try:
        max_edges = max((len(st.edges_from(f"user:bomber{k}")) for k in range(bombers)), default=0)
        max_contexts = max((sum(1 for n in st.list_nodes("user_context", limit=1_000_000)
                                if n.id.startswith(f"user:bomber{k}@context:")) for k in range(bombers)), default=0)
        group_nodes = len(st.list_nodes("group", limit=1_000_000))
    finally:
        st.close()
    limits = {k: getattr(lim, k) for k in ("max_groups_per_request", "max_groups_per_user", "max_contexts_per_user")
              if hasattr(lim, k)}  # (none before issue #17)
    idle_p95, during_p95 = _p95(idle_ms), _p95(during_ms)
    fives = sum(n for counts in statuses.values() for code, n in counts.items() if code >= 500 or code < 0)
    ratio = during_p95 / idle_p95 if idle_p95 else float("inf")
    return {
        "victim_idle_p95_ms": round(idle_p95, 1), "victim_during_p95_ms": round(during_p95, 1),
        "victim_p95_ratio": round(ratio, 2),
        "victim_idle_median_ms": round(statistics.median(idle_ms), 1),
        "victim_during_median_ms": round(statistics.median(during_ms), 1),
        "victim_idle_max_ms": round(max(idle_ms), 1), "victim_during_max_ms": round(max(during_ms), 1),
        "victim_rate_per_s": rate,
        "victim_requests": {"idle": idle, "during": during}, "attack_seconds": round(attack_s, 1),
        "backend_latency_ms": latency_ms, "bombers": bombers,
        "attacker_requests": {k: {str(c): n for c, n in sorted(v.items())} for k, v in sorted(statuses.items())},
        "attacker_5xx_or_errors": fives, "bombers_left_running": alive,
        "attacker_max_group_edges_per_user": max_edges, "attacker_max_contexts_per_user": max_contexts,
        "attacker_group_nodes": group_nodes,
        "limits": limits,
        "rate_limit_per_tenant": {**RATE_LIMIT, "bytes_per_token": cfg.server.rate_limit.bytes_per_token
                                  if cfg.server.rate_limit else None, "same_for": sorted(KEYS)},
        "attacker_429s": sum(counts.get(429, 0) for counts in statuses.values()),
        "ok": bool(ratio <= 2.0 and fives == 0 and max_edges <= limits.get("max_groups_per_user", 0)
                   and max_contexts <= limits.get("max_contexts_per_user", 0)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=300, help="victim requests with no attack")
    ap.add_argument("--during", type=int, default=300, help="victim requests during the attack")
    ap.add_argument("--bombers", type=int, default=2, help="attacker processes (each sends flat out)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="the scripted backend's answer latency")
    ap.add_argument("--rate", type=float, default=4.0, help="victim requests per second (open loop)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="persona-soak-bounds-") as tmp:
        summary = bounds_soak(Path(tmp), idle=args.idle, during=args.during, bombers=args.bombers,
                              latency_ms=args.latency_ms, rate=args.rate)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
