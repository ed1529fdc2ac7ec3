"""Does maximal marginal relevance (``hops.mmr``) help the LoCoMo second hop, under 5-fold CV?

Report-only (docs/notes/multihop.md, stop 31). One grid (PRF x links x speaker 0.5/1 x session spread x
focus 0/4) is cross-validated three ways: without MMR, with MMR 1 and 2 on every question, and with
MMR 1 and 2 on list questions only; the settings without MMR come first and win ties. The first hop of
each question is computed once (``first_hop_memo``) and re-ranked per setting.

Run: python benchmarks/locomo_mmr_cv.py <data>/locomo benchmarks/results/cv5_locomo_s31_mmr.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from persona_mw.eval import locomo as L


def main(data: str, out_path: str) -> dict[str, Any]:
    convs = L.load(data)
    base = [{"prf_k": n, "prf_weight": w, "link_weight": lw, "speaker_weight": sw, "session_penalty": p,
             **({"focus_weight": fw} if fw else {})}
            for fw in (0.0, 4.0) for n, w in L._PRF for lw in (0.0, 0.5) for sw in (0.5, 1.0) for p in (0.0, 0.1)
            if n or not lw]
    variants = {"no_mmr": base,
                "mmr": base + [dict(g, mmr=m) for m in (1.0, 2.0) for g in base],
                "mmr_lists_only": base + [dict(g, mmr=m, mmr_lists_only=True) for m in (1.0, 2.0) for g in base]}
    grid = list({json.dumps(g, sort_keys=True): g for v in variants.values() for g in v}.values())
    ks = (5, 10, 25)
    per: list[list[tuple[int, int, int, dict[int, float]]]] = [[] for _ in grid]
    with tempfile.TemporaryDirectory(prefix="persona-mw-mmr-") as tmp:
        mw = L._middleware(tmp)
        try:
            mem = mw.memory
            for ci, conv in enumerate(convs):
                user = f"locomo-{ci}"
                for _, date, msgs in L.sessions(conv):
                    if msgs:
                        mem.add_raw(user, msgs, session_date=date)
                        mem.ingest(user, msgs, session_date=date)
                qas = [q for q in conv["qa"] if isinstance(q, dict) and q.get("question") and L.evidence_ids(q)]
                L._grid_rows(mem, user, ci, qas, grid, ks, per)
        finally:
            mw.close()
    idx = {json.dumps(g, sort_keys=True): i for i, g in enumerate(grid)}
    out: dict[str, Any] = {}
    for name, v in variants.items():
        res = L.cross_validate([per[idx[json.dumps(g, sort_keys=True)]] for g in v], v, 5, ks, len(convs))
        m = res["metrics"]
        out[name] = {"settings": len(v),
                     **{k: round(m[f"cv/{k}"], 4) for k in ("R@10", "R@10/multi-hop", "R@25")},
                     **{f"{k}:sd": round(m[f"cv/{k}:sd"], 4) for k in ("R@10", "R@10/multi-hop")},
                     "chosen": [f["chosen"] for f in res["folds"]]}
        print(name, json.dumps(out[name]), flush=True)
    Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
