"""HTTP server overhead on loopback: requests/s and p95 latency at 32 concurrent clients -> JSON.

Two servers run in their own processes with a backend that answers instantly, so the latency is
the HTTP stack plus the middleware:

- ``baseline``: a bare Starlette/uvicorn endpoint returning an OpenAI-shaped answer (the floor any
  Python OpenAI-compatible server pays);
- ``persona``: ``persona-mw serve``'s app with the stated-preferences plugin on a real SQLite store.

"Added latency" is persona's latency minus the baseline's at the same percentile. Two loads, both
bounded: open loop at ``--rate`` req/s from 32 clients (the goal: p95 added under 10 ms at 200 req/s)
and closed loop (each client sends its next request when the last returns) for max throughput.

Run: python benchmarks/server_overhead.py [--requests 2000] [--out benchmarks/results/server_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CONFIG = "pipeline:\n  - use: stated\n    placement: system\n"
BODY = {"model": "m", "user": "ana", "messages": [{"role": "user", "content": "hello there"}]}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def serve(kind: str, port: int) -> None:
    """Child process: run one server until killed."""
    import uvicorn

    if kind == "baseline":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            text = body["messages"][-1]["content"]
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

        app: Any = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    else:
        from persona_mw import Middleware, parse_config
        from persona_mw.server import create_app
        from persona_mw.testing import ScriptedBackend

        cfg = parse_config(CONFIG)
        cfg.store.path = str(Path(tempfile.mkdtemp()) / "bench.db")
        mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
        mw.feedback(kind="stated", user="ana", text="Answer in one short sentence.")
        app = create_app(mw)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start(kind: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.post(url + "/v1/chat/completions", json=BODY, timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


async def load(url: str, requests: int, clients: int, rate: float | None) -> dict[str, Any]:
    """``requests`` requests from ``clients`` workers; paced at ``rate`` req/s overall when given."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    next_index = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < requests:
                i = next_index
                next_index += 1
                if rate:
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=BODY)
                latencies.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {"requests": requests, "errors": errors, "elapsed_s": round(elapsed, 3),
            "req_per_s": round(requests / elapsed, 1), "p50_ms": round(pct(latencies, 0.5), 2),
            "p95_ms": round(pct(latencies, 0.95), 2), "p99_ms": round(pct(latencies, 0.99), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_overhead.json"))
    ap.add_argument("--serve", choices=["baseline", "persona"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

    results: dict[str, Any] = {}
    for kind in ("baseline", "persona"):
        proc, url = start(kind)
        try:
            asyncio.run(load(url, min(200, args.requests), args.clients, None))  # warm up
            results[kind] = {
                "open_loop": asyncio.run(load(url, args.requests, args.clients, args.rate)),
                "closed_loop": asyncio.run(load(url, args.requests, args.clients, None)),
                # one client, one request at a time: the per-request cost with no queueing
                "sequential": asyncio.run(load(url, min(500, args.requests), 1, None)),
            }
        finally:
            proc.terminate()
            proc.wait(10)
    base, persona = results["baseline"]["open_loop"], results["persona"]["open_loop"]
    report = {
        "benchmark": "server_overhead",
        "clients": args.clients,
        "target_rate_req_per_s": args.rate,
        "backend": "scripted (answers instantly)",
        "plugins": ["stated"],
        "results": results,
        "added_p50_ms_at_rate": round(persona["p50_ms"] - base["p50_ms"], 2),
        "added_p95_ms_at_rate": round(persona["p95_ms"] - base["p95_ms"], 2),
        "goal": "added p95 < 10 ms at 200 req/s, 32 clients",
        "goal_met": persona["p95_ms"] - base["p95_ms"] < 10 and persona["req_per_s"] >= 0.95 * args.rate,
        "max_req_per_s": results["persona"]["closed_loop"]["req_per_s"],
        "added_p95_ms_sequential": round(results["persona"]["sequential"]["p95_ms"]
                                         - results["baseline"]["sequential"]["p95_ms"], 2),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "note": "server and load generator share these cores"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
