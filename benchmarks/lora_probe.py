"""One simulated DSP user (eval fermi's user d{--user}-u0, seed 0: the same 20 observed choices), an
adapter trained with the lora plugin's settings (its loss and defaults) (``--set key=value`` changes one; ``--steps``
is ``steps``; the job's time budget is lifted), held-out pairwise / top-1 of ``lora`` vs ``none`` on
the first ``--test`` test queries: the reduced measurement that fits a 2-core machine (the full
``persona-mw eval lora`` does not). Writes benchmarks/results/lora_probe_u{user}{--tag}.json. Not a test."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--user", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the plugin's")
    ap.add_argument("--test", type=int, default=12)
    ap.add_argument("--data", default="/work/shared/data/dsp", help="the DSP folder")
    ap.add_argument("--set", action="append", default=[], help="a lora plugin setting, key=value")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
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
    from persona_mw.types import Message

    torch.set_num_threads(1)
    load0 = os.getloadavg()
    items = load(args.data)
    doms = list(items[0]["responses"])
    test_q, obs, r = _splits(items, 0, 20, args.test)
    for di in range(args.user + 1):  # the same draws as eval fermi's users before this one
        mine = _choices(f"d{di}-u0", items, r.choice(obs, size=20, replace=False), doms, doms[di], r)
    pairs = [(e["prompt"], e["chosen"], x) for e in mine for x in e["rejected"]]
    b = TransformersBackend(model="smollm2-135m-instruct", threads=1)
    m, tok = b.model, b.tokenizer

    def fmt(p: str) -> str:
        return b.format_prompt([Message(role="user", content=p)])

    overrides = {k: v for k, v in (x.split("=", 1) for x in args.set)}
    sets = {k: json.loads(v) if v[:1] in "0123456789-[{tfn" else v for k, v in overrides.items()}
    if args.steps:
        sets["steps"] = args.steps
    s = LoraAdapters(LoraAdapters.Config(**{**sets, "job_seconds": None})).settings()
    c0 = time.process_time()
    ad, stats = _lora.train_lora(m, tok, fmt, pairs, s)
    stats["cpu_seconds"] = round(time.process_time() - c0, 1)
    print("trained", stats, flush=True)
    ctx = [fmt(items[q]["query"]) for q in test_q]
    resps = [[items[q]["responses"][d] for d in doms] for q in test_q]
    own = args.user
    out = {}
    for name, adapter in (("none", None), ("lora", ad)):
        hs = _lora.install(m, adapter) if adapter else []
        try:
            lp = np.asarray(response_logprobs(m, tok, ctx, resps, max_response_tokens=32))
        finally:
            for h in hs:
                h.remove()
        o, oth = lp[:, own][:, None], np.delete(lp, own, 1)
        out[f"pairwise@H20:{name}"] = round(float((oth < o).mean()), 4)
        out[f"top1@H20:{name}"] = round(float((oth < o).all(1).mean()), 4)
        out[f"margin@H20:{name}"] = round(float((o - oth).mean()), 4)
        print(name, out, flush=True)
    res = {"benchmark": "lora_probe", "user": f"d{own}-u0 ({doms[own]})", "seed": 0, "test_queries": args.test,
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
           "overrides": sets,
           "train": stats, "metrics": out, "load_before": [round(x, 2) for x in load0],
           "load_after": [round(x, 2) for x in os.getloadavg()]}
    path = ROOT / "benchmarks" / "results" / f"lora_probe_u{own}{args.tag}.json"
    path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
