"""Continuous batching through ``persona-mw serve`` with the local model, on loopback.

Starts ``persona-mw serve`` (the embedded SmolLM2-135M-Instruct, no plugins, a temporary store) in a
subprocess and measures with real streaming HTTP clients:

- ``clients1``: one streaming client, ``--requests`` answers one after another (aggregate tokens/s);
- ``clients8``: 8 streaming clients at once, each asking ``--requests`` answers back to back, so later
  answers join a batch that is already running: aggregate tokens/s and time to first token (p50/p95);
- ``overload``: 32 clients at once against ``max_batch`` 8 and ``max_queue`` 16: how many got an answer,
  how many a 503 with ``Retry-After``, how many timed out or failed otherwise.

Tokens are counted by re-tokenizing each answer with the model's tokenizer. The JSON
(``benchmarks/results/server_throughput.json``) carries the load average before and after (the
machine is shared: compare the ratios of one run, not absolute figures) and a top-level ``ratios``
object: ``clients8_vs_1`` (aggregate tokens/s of 8 clients over 1) and ``ttft_p95_s``.
By default the server runs the backend's defaults (``dtype: float32``, ``max_new_tokens: 128``); stop 29
measured 16/64/128 tokens at float32 and int4 as well (``benchmarks/results/server_throughput_*tok_*.json``).
Run: ``nice -n 5 .venv/bin/python benchmarks/server_throughput.py [--dtype int4] [--threads 1] [--tokens 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "server_throughput.json"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Describe a walk through a forest in autumn.",
    "Give me some advice for learning to play the guitar.",
    "Tell me about the history of the bicycle.",
    "Write a poem about the sea at night.",
    "Explain why the sky is blue in simple words.",
    "Describe your ideal weekend in the mountains.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    cfg = tmp / "serve.yaml"
    threads = f"  threads: {args.threads}\n" if args.threads else ""
    cfg.write_text(
        "backend:\n  type: transformers\n  model: smollm2-135m-instruct\n"
        f"  max_new_tokens: {args.tokens}\n  max_batch: 8\n  max_queue: 16\n  dtype: {args.dtype}\n{threads}"
        "pipeline: []\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONA_MW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    exe = Path(sys.executable).with_name("persona-mw")
    cmd = [str(exe), "serve", "--config", str(cfg), "--store", str(tmp / "p.db"), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"))
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("server exited: " + (tmp / "serve.log").read_text()[-2000:])
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, user: str,
                      max_tokens: int | None = None) -> dict[str, Any]:
    """One streaming chat completion: status, Retry-After, time to first content, text, elapsed."""
    body: dict[str, Any] = {"model": "local", "user": user, "stream": True,
                            "messages": [{"role": "user", "content": prompt}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    started = time.perf_counter()
    first: float | None = None
    text = ""
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                        "elapsed": time.perf_counter() - started}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:]).get("choices", [{}])[0].get("delta", {}).get("content")
                if delta:
                    first = first if first is not None else time.perf_counter() - started
                    text += delta
    except httpx.TimeoutException:
        return {"status": "timeout", "elapsed": time.perf_counter() - started}
    except httpx.HTTPError as exc:
        return {"status": f"error: {type(exc).__name__}", "elapsed": time.perf_counter() - started}
    return {"status": 200, "ttft": first, "text": text, "elapsed": time.perf_counter() - started}


async def clients(url: str, count: int, requests: int, timeout: float,
                  max_tokens: int | None = None) -> tuple[list[dict[str, Any]], float]:
    """``count`` clients at once, each ``requests`` answers back to back; (results, wall seconds)."""
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def user(i: int) -> list[dict[str, Any]]:
            return [await one_request(client, url, PROMPTS[(i + k) % len(PROMPTS)], f"u{i}", max_tokens)
                    for k in range(requests)]

        started = time.perf_counter()
        per_user = await asyncio.gather(*(user(i) for i in range(count)))
        wall = time.perf_counter() - started
    return [r for rs in per_user for r in rs], wall


def summary(results: list[dict[str, Any]], wall: float, tok: Any) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(len(tok.encode(r["text"], add_special_tokens=False)) for r in ok)
    ttfts = sorted(r["ttft"] for r in ok if r.get("ttft") is not None)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] if ttfts else None
    return {
        "requests": len(results), "answered": len(ok), "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 3) if wall else None,
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "ttft_p95_s": round(p95, 3) if p95 is not None else None,
    }


def overload_counts(results: list[dict[str, Any]]) -> dict[str, Any]:
    refused = [r for r in results if r["status"] == 503]
    return {
        "clients": len(results),
        "answered_200": sum(r["status"] == 200 for r in results),
        "refused_503": len(refused),
        "refused_503_with_retry_after": sum(bool(r.get("retry_after")) for r in refused),
        "retry_after_values_s": sorted({int(r["retry_after"]) for r in refused if r.get("retry_after")}),
        "timeouts": sum(r["status"] == "timeout" for r in results),
        "other": sum(r["status"] not in (200, 503, "timeout") for r in results),
        "slowest_refusal_s": round(max((r["elapsed"] for r in refused), default=0.0), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128,
                    help="max_new_tokens of every answer (default: the backend's default, 128)")
    ap.add_argument("--requests", type=int, default=2, help="answers per client, back to back")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (backend.threads)")
    ap.add_argument("--dtype", default="float32",
                    help="the server's backend.dtype (default: the backend's default, float32; int4: the fast one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request (s)")
    ap.add_argument("--overload-tokens", type=int, default=4,
                    help="max_tokens of the 32 overload clients (only the 503 counts matter there)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from persona_mw import models

    _, tok = models.load("smollm2-135m-instruct")
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "ratios": {"clients8_vs_1": None, "ttft_p95_s": None},
        "targets": {"clients8_vs_1": ">= 4", "ttft_p95_s": "< 1 s", "overload": "503 + Retry-After, no timeouts"},
        "settings": {"max_new_tokens": args.tokens, "requests_per_client": args.requests, "dtype": args.dtype,
                     "overload_max_tokens": args.overload_tokens, "threads": args.threads,
                     "max_batch": 8, "max_queue": 16},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "python": sys.version.split()[0]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def save() -> None:  # after each phase: a run cut short still leaves what it measured
        report["machine"]["loadavg_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        proc = start_server(Path(d), args, port)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(clients(url, 1, 1, args.timeout, 4))  # warm-up: first forward, allocator
            report["clients1"] = one = summary(*asyncio.run(clients(url, 1, args.requests, args.timeout)), tok)
            save()
            report["clients8"] = eight = summary(*asyncio.run(clients(url, 8, args.requests, args.timeout)), tok)
            ratio = eight["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else None
            report["ratios"] = {"clients8_vs_1": round(ratio, 3) if ratio else None,
                                "ttft_p95_s": eight["ttft_p95_s"]}
            save()
            over = asyncio.run(clients(url, 32, 1, args.timeout, args.overload_tokens))[0]
            report["overload_32_clients_max_queue_16"] = overload_counts(over)
            save()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
