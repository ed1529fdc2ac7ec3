"""Cross-validation of the lora plugin's training settings on the users' own choices (issue #18).

`persona-mw eval lora`'s simulated users (seed 0, ``--history`` choices each: the same draws) are the
data; the held-out test queries that `eval lora` scores are never read. For each user, their choices
are dealt into ``--folds`` folds; an adapter is trained (the plugin's job, its time budget lifted) on
the other folds' choices and scored on the fold's own choices the way `eval lora` scores test
queries: the mean per-token log-likelihood of each answer's first 32 tokens, ``pairwise`` (the chosen
answer over each rejected one), ``top1`` (over all of them), ``pairwise_raise`` (the same on the
rise over the base model), and the base model's ``pairwise`` on the same choices. Each ``--variant
NAME=key=value,key=value`` is one setting of the plugin (``base`` = the defaults); all variants run
interleaved in one process, 1 torch thread, so their times compare.

    python benchmarks/lora_cv.py --data <data>/dsp --variant dpo= --variant simpo=loss=simpo

Writes ``--out`` (JSON): per variant the mean and spread over users x folds, per user, and the train
seconds. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _parse(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition("=")
    sets: dict[str, Any] = {}
    for kv in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [...] belong to a list
        k, _, v = kv.partition("=")
        sets[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    return name, sets


def _scores(lp: Any) -> dict[str, float]:
    import numpy as np

    lp = np.asarray(lp)
    own, oth = lp[:, :1], lp[:, 1:]
    return {"pairwise": float((oth < own).mean()), "top1": float((oth < own).all(1).mean()),
            "margin": float((own - oth).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the DSP folder")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value,... (lora plugin settings)")
    ap.add_argument("--ppl-prompts", type=int, default=2, help="held-out prompts per fold whose greedy answers' "
                    "perplexity under the base model is compared with the base model's own (0: skip)")
    ap.add_argument("--scales", default="", help="comma-separated adapter scales (e.g. 1,0.5,0.25): each fold's "
                    "adapter is also scored scaled by each, with the ppl ratio on the fold's own last 2 training "
                    "prompts beside the held-out one (the fluency guard's probe, docs/notes/lora5.md)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_cv.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.eval.dsp import load
    from persona_mw.eval.lora import _choices, _splits
    from persona_mw.plugins import _lora
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.plugins.lora import LoraAdapters
    from persona_mw.types import Decoding, GenerationParams, Message

    torch.set_num_threads(1)
    scales = [float(x) for x in args.scales.split(",") if x.strip()]
    variants = dict(_parse(v) for v in (args.variant or ["base="]))
    settings = {n: LoraAdapters(LoraAdapters.Config(**{**v, "job_seconds": None})).settings() for n, v in variants.items()}
    items = load(args.data)
    doms = list(items[0]["responses"])
    _test_q, obs, r = _splits(items, 0, args.history, 24)  # the test queries are not read
    b = TransformersBackend(model="smollm2-135m-instruct", threads=1)
    m, tok = b.model, b.tokenizer

    def fmt(p: str) -> str:
        return b.format_prompt([Message(role="user", content=p)])

    def score(choices: list[dict[str, Any]], adapter: Any) -> Any:
        hs = _lora.install(m, adapter) if adapter is not None else []
        try:
            return np.asarray(response_logprobs(m, tok, [fmt(e["prompt"]) for e in choices],
                                                [[e["chosen"], *e["rejected"]] for e in choices],
                                                max_response_tokens=32))
        finally:
            for h in hs:
                h.remove()

    def ppl(prompts: list[str], adapter: Any) -> float:
        """Perplexity under the base model of the greedy 32-token answers (with ``adapter``) to ``prompts``."""
        msgs = [[Message(role="user", content=p)] for p in prompts]
        dec = [Decoding(source="cv", activation_hooks=[_lora.adapter_hook(adapter)])] if adapter is not None else []
        cands = asyncio.run(b.generate_batch(msgs, params=GenerationParams(max_tokens=32, temperature=0.0), decoding=dec))
        answers = [c.text or "." for c in sorted(cands, key=lambda c: c.index)]
        lps = response_logprobs(m, tok, [fmt(p) for p in prompts], [[a] for a in answers], max_response_tokens=32)
        return math.exp(-float(np.mean([row[0] for row in lps])))

    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in variants}
    base_rows: list[dict[str, Any]] = []
    t_all, load0 = time.perf_counter(), os.getloadavg()[0]
    for di in range(args.users):
        user = f"d{di}-u0"
        mine = _choices(user, items, r.choice(obs, size=min(args.history, len(obs)), replace=False), doms, doms[di], r)
        fold_of = np.random.default_rng(1234 + di).permutation(len(mine)) % args.folds
        for f in range(args.folds):
            train = [e for e, k in zip(mine, fold_of) if k != f]
            held = [e for e, k in zip(mine, fold_of) if k == f]
            lp0 = score(held, None)
            qs = [e["prompt"] for e in held[: args.ppl_prompts]]
            ppl0 = ppl(qs, None) if qs else float("nan")
            base_rows.append({"user": user, "fold": f, **_scores(lp0), "ppl": ppl0})
            pairs = [(e["prompt"], e["chosen"], x) for e in train for x in e["rejected"]]
            for name, s in settings.items():
                ad, stats = _lora.train_lora(m, tok, fmt, pairs, s)
                lp = score(held, ad)
                rise = _scores(lp - lp0)
                row = {"user": user, "fold": f, **_scores(lp), "pairwise_raise": rise["pairwise"],
                       "ppl_ratio": ppl(qs, ad) / ppl0 if qs else float("nan"),
                       "train_seconds": stats["total_seconds"], "loss_last": stats["loss_last"]}
                if scales:
                    own = [e["prompt"] for e in train[-2:]]
                    own0 = ppl(own, None)
                    row["scales"] = {}
                    for sc in scales:
                        a2 = _lora.scaled(ad, sc)
                        lp2 = score(held, a2)
                        row["scales"][str(sc)] = {**_scores(lp2), "pairwise_raise": _scores(lp2 - lp0)["pairwise"],
                                                  "ppl_ratio": ppl(qs, a2) / ppl0, "train_ppl_ratio": ppl(own, a2) / own0}
                rows[name].append(row)
                print(name, json.dumps(row), f"base pairwise {base_rows[-1]['pairwise']:.3f}", flush=True)

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("pairwise", "top1", "margin", "pairwise_raise", "ppl_ratio", "train_seconds"):
            if rs and k in rs[0]:
                v = np.array([x[k] for x in rs])
                out[k] = round(float(v.mean()), 4)
                out[f"{k}:sd_users"] = round(float(np.std([np.mean([x[k] for x in rs if x["user"] == u])
                                                           for u in sorted({x["user"] for x in rs})])), 4)
        return out

    res = {"benchmark": "lora_cv", "data": args.data, "users": args.users, "history": args.history,
           "folds": args.folds, "variants": variants, "base": summary(base_rows),
           "results": {n: summary(rs) for n, rs in rows.items()}, "rows": rows, "base_rows": base_rows,
           "seconds": round(time.perf_counter() - t_all, 1), "load_before": load0, "load_after": os.getloadavg()[0]}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"base": res["base"], "results": res["results"]}, indent=2))


if __name__ == "__main__":
    main()
