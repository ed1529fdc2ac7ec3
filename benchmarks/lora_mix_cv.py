"""Cross-validation of how much a user's own adapter weighs against their group's (issue #18).

`persona-mw eval lora` found that a new user with 5 own choices ranks held-out answers *worse* with
the graph's mix of their adapter and their group's (``lora_group@5``) than with the group's alone
(``lora_group@0``). The mix gives the user's adapter ``n / (n + k)`` of the weight (the graph's
shrinkage, ``k`` its prior strength, 5 by default). This measures, on the simulated users' own choices
(never ``eval lora``'s test queries), the held-out pairwise of the mix for ``k`` in ``--ks``, with
``n`` = 5 and 15 own choices: each user's 20 choices are dealt into 4 folds; the user's adapter is
trained on ``n`` of the other folds' choices, the group's on ``--members`` members' choices of the
same domain drawn from prompts the user never answered, and the mix scores the fold's 5 choices as
``eval lora`` scores test queries.

    python benchmarks/lora_mix_cv.py --data <data>/dsp --out benchmarks/results/lora_mix_cv.json

Not a test. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the DSP folder")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated user indices to run (the draws stay those of all users)")
    ap.add_argument("--ns", default="5,15", help="own choices of the user's adapter")
    ap.add_argument("--ks", default="0,2.5,5,10,20,40,inf", help="prior strengths (0: the user's alone, inf: the group's)")
    ap.add_argument("--residual", action="store_true", help="also train the user's adapter as a residual over the "
                    "frozen group adapter (train_lora's base) and score it served as the graph mix, G + n/(n+5) R, and "
                    "alone, G + R; with the fold's first 2 prompts' ppl ratio for n = 15")
    ap.add_argument("--ppl-prompts", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_mix_cv.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from benchmarks.lora_cv import _scores
    from persona_mw.adapters.transformers import TransformersBackend
    from persona_mw.eval.dsp import load
    from persona_mw.eval.lora import _choices, _splits
    from persona_mw.plugins import _lora
    from persona_mw.plugins._fermi_score import response_logprobs
    from persona_mw.plugins.lora import LoraAdapters
    from persona_mw.types import Message

    torch.set_num_threads(1)
    ns = [int(x) for x in args.ns.split(",")]
    ks = [float(x) for x in args.ks.split(",")]
    s = LoraAdapters(LoraAdapters.Config(job_seconds=None)).settings()
    items = load(args.data)
    doms = list(items[0]["responses"])
    _test_q, obs, r = _splits(items, 0, 20, 24)  # eval lora's draws; its test queries are not read
    gr = np.random.default_rng(7)
    b = TransformersBackend(model="smollm2-135m-instruct", threads=1)
    m, tok = b.model, b.tokenizer

    def fmt(p: str) -> str:
        return b.format_prompt([Message(role="user", content=p)])

    def pairs_of(evs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return [(e["prompt"], e["chosen"], x) for e in evs for x in e["rejected"]]

    def score(choices: list[dict[str, Any]], adapter: Any) -> Any:
        hs = _lora.install(m, adapter) if adapter is not None else []
        try:
            return np.asarray(response_logprobs(m, tok, [fmt(e["prompt"]) for e in choices],
                                                [[e["chosen"], *e["rejected"]] for e in choices], max_response_tokens=32))
        finally:
            for h in hs:
                h.remove()

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for di in range(args.users):
        user = f"d{di}-u0"
        picks = r.choice(obs, size=20, replace=False)
        mine = _choices(user, items, picks, doms, doms[di], r)
        rest = np.asarray([q for q in obs if q not in set(picks.tolist())])
        pooled = [e for mi in range(args.members)
                  for e in _choices(f"d{di}-m{mi}", items, gr.choice(rest, size=20, replace=False), doms, doms[di], gr)]
        if args.only and str(di) not in args.only.split(","):
            continue
        group, gst = _lora.train_lora(m, tok, fmt, pairs_of(pooled[-40:]), s)  # the plugin's cap: 40 events
        print(f"{user}: group adapter {gst['total_seconds']} s", flush=True)
        fold_of = np.random.default_rng(1234 + di).permutation(len(mine)) % 4
        for f in range(4):
            train = [e for e, k in zip(mine, fold_of) if k != f]
            held = [e for e, k in zip(mine, fold_of) if k == f]
            row: dict[str, Any] = {"user": user, "fold": f, "base": _scores(score(held, None))["pairwise"]}
            for n in ns:
                own, _ = _lora.train_lora(m, tok, fmt, pairs_of(train[:n]), s)
                for k in ks:
                    wu = 1.0 if k == 0 else (0.0 if k == float("inf") else n / (n + k))
                    mix = _lora.merge([(own, wu), (group, 1.0 - wu)])
                    row[f"n{n}:k{k:g}"] = _scores(score(held, mix))["pairwise"]
                if args.residual:
                    res, _ = _lora.train_lora(m, tok, fmt, pairs_of(train[:n]), s, base=group)
                    r_only = _lora.Adapter({k2: (a[group.r:], b[:, group.r:]) for k2, (a, b) in res.weights.items()},
                                           r=res.r - group.r, alpha=res.alpha, targets=res.targets)
                    served = _lora.merge([(group, 1.0), (r_only, n / (n + 5.0))], normalize=False)
                    row[f"n{n}:res_served"] = _scores(score(held, served))["pairwise"]
                    row[f"n{n}:res_alone"] = _scores(score(held, res))["pairwise"]
                    if n == max(ns) and args.ppl_prompts:
                        qs = [fmt(e["prompt"]) for e in held[: args.ppl_prompts]]
                        p0 = _lora.answer_perplexity(m, tok, qs, None)
                        for name, ad in (("res_served", served), ("k0", own), ("kinf", group), ("k5", _lora.merge(
                                [(own, n / (n + 5.0)), (group, 5.0 / (n + 5.0))]))):
                            row[f"ppl_n{n}:{name}"] = _lora.answer_perplexity(m, tok, qs, ad) / p0
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k not in ("user", "fold")]
    res = {"benchmark": "lora_mix_cv", "data": args.data, "members": args.members, "ns": ns, "ks": ks,
           "pairwise": {k: round(float(np.mean([x[k] for x in rows])), 4) for k in keys},
           "pairwise:sd_users": {k: round(float(np.std([np.mean([x[k] for x in rows if x["user"] == u])
                                                         for u in sorted({x["user"] for x in rows})])), 4) for k in keys},
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(res["pairwise"], indent=1))


if __name__ == "__main__":
    main()
