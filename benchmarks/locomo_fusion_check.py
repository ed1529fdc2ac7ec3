"""Fused search over candidate sets against the fusion it replaced, on LoCoMo (issue #20).

One ingestion (the ``eval locomo`` recipe: every turn raw + rule extraction), then each question is
embedded once and searched by three managers over the same store: ``reference`` (the full-vector
z-fusion and hand-written BM25 of commit b821912, loaded from git), ``candidates`` (this code, every
LoCoMo user below the ANN threshold: exact scan, candidate-set fusion, bm25s) and ``ann`` (this code,
``ann_threshold=50``: every user through the HNSW graph). R@k overall and per category for each, and
how often the top 10 is the same as the reference's.

Run: nice -n 5 python benchmarks/locomo_fusion_check.py [conv-26,conv-30]  ->  results/locomo_fusion_check.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
REF = "b821912"


def _reference_manager_class(tmp: str):
    """``MemoryManager`` as of ``REF`` (its index.py and manager.py), importable next to this code."""
    pkg = Path(tmp) / "ref_memory"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("index", "manager"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{REF}:persona_mw/memory/{name}.py"],
                             capture_output=True, text=True, check=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("from persona_mw.memory.index import", "from ref_memory.index import"))
    sys.path.insert(0, tmp)
    spec = importlib.util.find_spec("ref_memory.manager")
    assert spec is not None
    from ref_memory.manager import MemoryManager  # type: ignore[import-not-found]

    return MemoryManager


def main(convs: list[str] | None) -> dict:
    from persona_mw.eval.locomo import CATEGORIES, KS, _middleware, evidence_ids, load, recall, sessions
    from persona_mw.memory import MemoryManager

    out_path = ROOT / "benchmarks" / "results" / "locomo_fusion_check.json"
    res: dict = {"benchmark": "locomo_fusion_check", "reference": REF, "conversations": convs or "all",
                 "load_average_at_start": [round(x, 1) for x in os.getloadavg()]}
    rows: dict[str, list[tuple[int, dict[int, float]]]] = {"reference": [], "candidates": [], "ann": []}
    same_top10 = {"candidates": 0, "ann": 0}
    with tempfile.TemporaryDirectory() as tmp:
        Ref = _reference_manager_class(tmp)
        mw = _middleware(tmp)
        mem = mw.memory
        emb = mem.embedder
        ann = MemoryManager(mw.store, graph=mw.graph, embedder=emb, ann_threshold=50)
        ref = Ref(mw.store, graph=mw.graph, embedder=emb)
        t0 = time.perf_counter()
        for ci, conv in enumerate(load(os.environ.get("LOCOMO", "/work/shared/data/locomo"), convs)):
            user = f"locomo-{ci}"
            for _, date, msgs in sessions(conv):
                if msgs:
                    mem.add_raw(user, msgs, session_date=date)
                    mem.ingest(user, msgs, session_date=date)
            qas = [q for q in conv["qa"] if isinstance(q, dict) and q.get("question") and evidence_ids(q)]
            for q in qas:
                text = str(q["question"])
                qv = mem._embed([text])[0]
                ev, cat = evidence_ids(q), int(q.get("category", 0))
                tops = {}
                for name, mm in (("reference", ref), ("candidates", mem), ("ann", ann)):
                    hits = mm.search(user, text, k=max(KS), query_vector=qv)
                    tops[name] = [h.memory.id for h in hits[:10]]
                    prov = [h.memory.provenance for h in hits]
                    rows[name].append((cat, {k: recall(ev, prov, k) for k in KS}))
                for name in same_top10:
                    same_top10[name] += tops[name] == tops["reference"]
            res["questions"] = len(rows["reference"])
            res["graph_owners"] = ann.index.graph_owners()
            res["seconds"] = round(time.perf_counter() - t0, 1)
            metrics: dict[str, dict[str, float]] = {}
            for name, rs in rows.items():
                m = {f"R@{k}": round(sum(r[k] for _, r in rs) / len(rs), 4) for k in KS}
                for c, cname in CATEGORIES.items():
                    sub = [r for cc, r in rs if cc == c]
                    if sub:
                        m.update({f"R@{k}/{cname}": round(sum(r[k] for r in sub) / len(sub), 4) for k in KS})
                metrics[name] = m
            res["metrics"] = metrics
            res["same_top10_as_reference"] = {k: round(v / len(rows["reference"]), 4) for k, v in same_top10.items()}
            res["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
            out_path.write_text(json.dumps(res, indent=2) + "\n")  # after each conversation: partial runs count
            print(conv["sample_id"], json.dumps(res["metrics"]["reference"]["R@10"]),
                  json.dumps({k: v["R@10"] for k, v in metrics.items()}), res["same_top10_as_reference"], flush=True)
        mw.close()
    return res


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else None)
