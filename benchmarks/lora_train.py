"""Training time of ONE LoRA adapter on 20 choices (issue #18: under 60 s on the 2-core machine).

The 20 DSP choices of ``eval lora`` / ``eval fermi``'s user d0-u0 (seed 0: each chosen answer over
its 4 rejected, 80 pairs), the lora plugin's settings (``LoraAdapters.Config`` defaults, changed
with ``--set key=value``) with the job's time budget lifted (``job_seconds: null``) so every step
runs. The model is loaded once; the job runs ``--runs`` times (same pairs, same seed) and the
MEDIAN wall time is the figure, with the per-phase split (prepare = the no-grad pass over the
sequences; forward / backward / optimizer summed over the steps), the loss, CPU seconds and the
load average before and after. ``met``: median wall < 60 s.

Run: ``.venv/bin/python benchmarks/lora_train.py [--data DSP_DIR] [--runs 3] [--threads N]
[--variant before=pack=false,bf16=false --variant after=]
[--set steps=20 --set lr=0.005]``. Writes ``benchmarks/results/lora_train.json`` (``--out``
another name). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL_SECONDS = 60.0


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values as JSON where they parse, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def user_pairs(data: str, user: int = 0) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]], str]:
    """The observed choices of eval fermi's user ``d{user}-u0`` (seed 0), their pairs, the domain."""
    from persona_mw.eval.dsp import load
    from persona_mw.eval.lora import _choices, _splits

    items = load(data)
    doms = list(items[0]["responses"])
    _test, obs, r = _splits(items, 0, 20, 24)
    mine: list[dict[str, Any]] = []
    for di in range(user + 1):  # the same draws as eval fermi's users before this one
        mine = _choices(f"d{di}-u0", items, r.choice(obs, size=20, replace=False), doms, doms[di], r)
    return mine, [(e["prompt"], e["chosen"], x) for e in mine for x in e["rejected"]], doms[user]


def settings(overrides: dict[str, Any]) -> Any:
    from persona_mw.plugins.lora import LoraAdapters

    fields = LoraAdapters.Config.model_fields
    cfg = LoraAdapters.Config(**{"job_seconds": None, **{k: v for k, v in overrides.items() if k in fields}})
    s = LoraAdapters(cfg).settings()
    for k, v in overrides.items():  # TrainSettings-only knobs (``pack``: false is the padded rows of before)
        if k not in fields:
            setattr(s, k, v)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/dsp", help="the DSP folder")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the job (default: the plugin's "
                    "setting, else torch's)")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=key=value,key=value: settings timed against the others in the same run (runs "
                         "interleaved; the first is the headline); default: one, the settings as given")
    ap.add_argument("--set", action="append", default=[], help="a lora plugin setting, key=value")
    ap.add_argument("--out", default="lora_train.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.plugins import _lora
    from persona_mw.types import Message

    load_before = os.getloadavg()
    overrides = parse_sets(args.set)
    s = settings(overrides)
    mine, pairs, _dom = user_pairs(args.data)
    backend = TransformersBackend(model="smollm2-135m-instruct", threads=1)
    model, tok = backend.model, backend.tokenizer
    variants = {"default": {}}
    if args.variant:
        variants = {}
        for v in args.variant:
            label, _, sets = v.partition("=")
            variants[label] = parse_sets([x for x in sets.split(",") if x])
    base_threads = torch.get_num_threads()

    def fmt(p: str) -> str:
        return backend.format_prompt([Message(role="user", content=p)])

    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        for label, extra in variants.items():  # interleaved, so the machine's load hits every variant alike
            s = settings({**overrides, **extra})
            s.threads = args.threads or s.threads or base_threads
            torch.set_num_threads(s.threads)  # (the job sets it too; code before the setting did not)
            c0, t0 = time.process_time(), time.perf_counter()
            _adapter, stats = _lora.train_lora(model, tok, fmt, pairs, s)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            runs.append({"variant": label, "threads": s.threads, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), **stats,
                         "load": round(os.getloadavg()[0], 2)})
            print(f"run {i + 1}: {json.dumps(runs[-1])}", flush=True)
    keys = ("prepare_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds", "seconds")

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"median_wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
                "median_phase_seconds": {k.removesuffix("_seconds") if k != "seconds" else "loop":
                                         statistics.median(float(r.get(k) or 0.0) for r in rs) for k in keys},
                "median_cpu_share": round(statistics.median(r["cpu_seconds"] / r["wall_seconds"] for r in rs), 3)}

    by = {label: summary([r for r in runs if r["variant"] == label]) for label in variants}
    first = next(iter(variants))
    head = by[first]
    s = settings({**overrides, **variants[first]})
    s.threads = args.threads or s.threads or base_threads
    result = {
        "benchmark": "lora_train",
        "settings": {"choices": len(mine), "pairs": len(pairs),
                     **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
                     "start_layer": _lora.first_trained_layer(model, s.top_layers),
                     "overrides": overrides, "variants": variants, "data": "DSP, eval lora's user d0-u0 (seed 0)"},
        **head,
        "by_variant": {k: {**v, "ratio_to_first": round(v["median_wall_seconds"] / head["median_wall_seconds"], 3)}
                       for k, v in by.items()},
        "runs": runs,
        "goal_seconds": GOAL_SECONDS, "met": head["median_wall_seconds"] < GOAL_SECONDS,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    out = ROOT / "benchmarks" / "results" / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("median_wall_seconds", "median_phase_seconds", "by_variant", "met",
                                             "load_before", "load_after")}, indent=2))


if __name__ == "__main__":
    main()
