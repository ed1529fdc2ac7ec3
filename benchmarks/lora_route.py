"""What ``lora: {serve: remote}`` routing costs a turn: real turns through the litellm backend against
a fake of vLLM's API on loopback (it answers at once, so the figure is persona-mw's own overhead plus
litellm's), with no lora plugin vs ``serve: remote`` (a user with an adapter the server lists; the
model list cached), the two alternating in ROUNDS rounds of TURNS turns in one run -> JSON with the
ratio of the medians and the machine's load average before and after.

Run: nice -n 10 .venv/bin/python benchmarks/lora_route.py [--turns 100] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
BASE = "base-model"


def fake_vllm(loras: set[str]) -> Any:
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> Any:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in [BASE, *sorted(loras)]]}

    async def chat(request: Request) -> Any:
        model = (await request.json())["model"]
        return {"id": "c", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    return app


def build(url: str, root: Path, db: str, remote: bool) -> Any:
    from persona_mw import Middleware, parse_config
    from persona_mw.adapters.litellm import LiteLLMBackend

    cfg = parse_config(f"pipeline: [{{use: lora, serve: remote, dir: '{root}'}}]\n" if remote else "{}")
    cfg.store.path = db
    backend = LiteLLMBackend(f"openai/{BASE}", api_base=url + "/v1", api_key="x")
    return Middleware(cfg, backend=backend, autoload=False)


def main() -> None:
    from persona_mw.plugins._lora_remote import served_name
    from persona_mw.server import serve_in_thread

    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_route.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lora-route-"))
    entry = {"file": "nodes/x/v1.safetensors", "model": BASE, "version": 1, "evidence": 5, "trained_at": 1.0}
    name = served_name("user:ana", entry)
    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, list[float]] = {"plain": [], "remote": []}
    with serve_in_thread(fake_vllm({name})) as url:
        mws = {"plain": build(url, tmp / "a", str(tmp / "s.db"), False),
               "remote": build(url, tmp / "a", str(tmp / "s.db"), True)}
        mws["remote"].profiles.update("user:ana", lambda p: p.extra.update(lora=dict(entry)))
        for mw in mws.values():
            mw.chat(user="ana", messages="warm up")
        reply = mws["remote"].chat(user="ana", messages="hi")
        assert reply.choices[0].meta["model"] == name, reply.choices[0].meta
        for _ in range(args.rounds):
            for key, mw in mws.items():
                for i in range(args.turns):
                    t = time.perf_counter()
                    mw.chat(user="ana", messages=f"question {i}")
                    times[key].append((time.perf_counter() - t) * 1000)
        for mw in mws.values():
            mw.close()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    report = {"benchmark": "lora_route",
              "command": f"nice -n 10 .venv/bin/python benchmarks/lora_route.py --turns {args.turns} "
                         f"--rounds {args.rounds}",
              "turns_each": len(times["plain"]), "median_ms": med,
              "p95_ms": {k: round(sorted(v)[int(0.95 * len(v))], 3) for k, v in times.items()},
              "ratio_remote_over_plain": round(med["remote"] / med["plain"], 3),
              "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
