"""Scale-out throughput (issue #15): requests/s and p95 ADDED latency through real `persona-mw serve`
processes on loopback: 1, 2 and 4 workers on one Postgres (pgserver) versus 1 worker on SQLite,
the same client load, one run -> benchmarks/results/pg_throughput.json.

- The upstream model is an instant OpenAI-compatible server (a bare Starlette app in its own process);
  each `persona-mw serve` reaches it through its litellm backend, as a deployment would reach vLLM.
- "Added latency" is the latency through persona-mw minus the latency of calling that upstream
  directly, same client, same load, at the same percentile.
- Pipeline: `stated` + `memory` (the default: BM25, no embedding model on the request path) +
  `profile`; after-turn jobs run in each serve process (memory extraction). 1 request in 5 is a
  feedback event (`stated` or `choice`), the rest chat completions, over 64 users.
- The clients spread their requests round-robin over the workers (no load balancer in between).
- Closed loop: ``--clients`` concurrent clients, each sends its next request when the last returns.

This machine has 2 cores, shared by the clients, the workers, Postgres and other jobs: with more
workers than cores the workers compete for the same CPU, so only the ratios mean something here.

Run: nice -n 5 .venv/bin/python benchmarks/pg_throughput.py [--requests 1500] [--clients 32]
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

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """backend: {{type: litellm, model: openai/instant, api_base: "{upstream}/v1", api_key: x}}
pipeline:
  - use: stated
  - use: memory
    embedder: false
    top_k: 3
  - use: profile
"""
USERS = 64


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream(port: int) -> None:
    """Child process: the instant model server."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "Sure, here it is."}}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_up(url: str, proc: subprocess.Popen[bytes], path: str = "/healthz", timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not start")


def start_workers(n: int, config: Path, store: str) -> list[tuple[subprocess.Popen[bytes], str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = []
    for w in range(n):
        kind = "pg" if store.startswith("postgres") else "sqlite"
        log = open(config.parent / f"worker-{kind}-{n}-{w}.log", "ab")
        port = free_port()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "persona-mw"), "serve", "--config", str(config),
                                 "--store", store, "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        out.append((proc, f"http://127.0.0.1:{port}"))
    for proc, url in out:
        wait_up(url, proc)
    return out


def request_of(i: int, direct: bool) -> tuple[str, dict[str, Any]]:
    user = f"u{i % USERS}"
    if not direct and i % 5 == 4:
        if (i // 5) % 2:
            return "/v1/feedback", {"kind": "stated", "user": user, "text": f"Keep answers under {20 + i % 30} words."}
        return "/v1/feedback", {"kind": "choice", "user": user, "prompt": "Explain tides",
                                "chosen": "Tides come from the moon's pull.", "rejected": ["Water moves."]}
    topic = ("tides", "bread", "python lists", "the violin", "my garden", "train tickets")[i % 6]
    text = f"I live in Lyon and I love {topic}. Can you tell me more about {topic}? (#{i})"
    return "/v1/chat/completions", {"model": "instant", "user": user, "messages": [{"role": "user", "content": text}]}


async def load(urls: list[str], requests: int, clients: int, direct: bool) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"/v1/chat/completions": [], "/v1/feedback": []}
    errors: dict[str, int] = {}
    next_index = 0
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                path, body = request_of(i, direct)
                t0 = time.perf_counter()
                try:
                    r = await client.post(urls[i % len(urls)] + path, json=body)
                    code = str(r.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                lat[path].append((time.perf_counter() - t0) * 1000)
                if code not in ("200", "201"):
                    errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    chat = lat["/v1/chat/completions"]
    out: dict[str, Any] = {"requests": requests, "errors": errors, "elapsed_s": round(elapsed, 2),
                           "req_per_s": round(requests / elapsed, 1),
                           "chat_p50_ms": round(pct(chat, 0.5), 1), "chat_p95_ms": round(pct(chat, 0.95), 1)}
    if lat["/v1/feedback"]:
        out["feedback_p95_ms"] = round(pct(lat["/v1/feedback"], 0.95), 1)
    return out


def run_case(name: str, n: int, store: str, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    workers = start_workers(n, config, store)
    try:
        urls = [u for _, u in workers]
        asyncio.run(load(urls, min(200, args.requests), args.clients, False))  # warm-up (imports, pools, caches)
        res = asyncio.run(load(urls, args.requests, args.clients, False))
        res["workers"] = n
        res["store"] = "sqlite" if name.startswith("sqlite") else "postgres"
        print(name, json.dumps(res), flush=True)
        return res
    finally:
        for proc, _ in workers:
            proc.terminate()
        for proc, _ in workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pg_throughput.json"))
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        upstream(args.upstream)
        return
    import pgserver

    load_start = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="pg-throughput-"))
    print("logs in", tmp, flush=True)
    up_port = free_port()
    up = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    up_url = f"http://127.0.0.1:{up_port}"
    srv = pgserver.get_server(str(tmp / "pg"), cleanup_mode="delete")
    results: dict[str, Any] = {}
    try:
        wait_up(up_url, up, "/v1/chat/completions")
        config = tmp / "bench.yaml"
        config.write_text(CONFIG.format(upstream=up_url))
        # the floor: the same clients calling the instant upstream directly
        asyncio.run(load([up_url], 200, args.clients, True))
        results["direct"] = asyncio.run(load([up_url], args.requests, args.clients, True))
        print("direct", json.dumps(results["direct"]), flush=True)
        results["sqlite_1"] = run_case("sqlite_1", 1, str(tmp / "bench.db"), config, args)
        write(args, results, load_start, partial=True)
        for n in (1, 2, 4):
            # a fresh schema per case: every case starts from an empty store
            results[f"pg_{n}"] = run_case(f"pg_{n}", n, srv.get_uri() + f"#schema=bench_{n}", config, args)
            write(args, results, load_start, partial=n != 4)
    finally:
        up.terminate()
        up.wait(10)
        srv.cleanup()
def write(args: argparse.Namespace, results: dict[str, Any], load_start: list[float], *, partial: bool) -> None:
    """The JSON, after each case (a run cut short keeps what it measured, marked ``partial``)."""
    base = results["direct"]["chat_p95_ms"]
    for r in results.values():
        if "workers" in r:
            r["added_chat_p95_ms"] = round(r["chat_p95_ms"] - base, 1)

    def ratio(a: str, b: str) -> dict[str, float]:
        return {"req_per_s": round(results[a]["req_per_s"] / results[b]["req_per_s"], 3),
                "added_chat_p95_ms": round(results[a]["added_chat_p95_ms"] / max(results[b]["added_chat_p95_ms"], 0.1), 3)}

    report = {
        "benchmark": "pg_throughput",
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + ".venv/bin/python benchmarks/pg_throughput.py "
                   f"--requests {args.requests} --clients {args.clients}",
        "clients": args.clients, "requests_per_case": args.requests, "users": USERS,
        "mix": "4 of 5 chat completions, 1 of 5 feedback (stated or choice)",
        "pipeline": ["stated", "memory (BM25, no embedder)", "profile"],
        "backend": "litellm -> an instant OpenAI-compatible upstream on loopback",
        "results": results,
        "ratios": {f"{a}/{b}": ratio(a, b) for a, b in (("pg_1", "sqlite_1"), ("pg_2", "pg_1"), ("pg_4", "pg_1"))
                   if a in results and b in results},
        "partial": partial,
        "load_average_before": load_start,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "note": ("This machine has 2 CPU cores, shared by the load generator, every worker, Postgres, the "
                 "upstream and other jobs (see the load averages): more workers than cores cannot add "
                 "throughput here, so the absolute numbers say little and the ratios are what to read. Scaling "
                 "on a machine with a core per worker was not measured."),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"]), flush=True)


if __name__ == "__main__":
    main()
