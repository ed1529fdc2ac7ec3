"""Latency the focus (``hops.focus_weight``) adds on LoCoMo's questions (docs/notes/multihop.md, stop 31):
(a) one embedding of the question less its names, never cached; (b) the second hop alone (first hop
memoised, embeddings cached), the stop-30 default vs the setting given, alternating.

Run: python benchmarks/focus_latency.py <data>/locomo '{"prf_k": 1, "prf_weight": 0.5, "speaker_weight": 1.0, "focus_weight": 4.0}'
"""
import json
import os
import sys
import tempfile
import time

import numpy as np

from persona_mw.eval import locomo as L
from persona_mw.memory.hops import names, without_names

convs = L.load(sys.argv[1])
mw = L._middleware(tempfile.mkdtemp(prefix="loco31-"))
mem = mw.memory
OLD = {"prf_k": 3, "prf_weight": 0.25, "link_weight": 0.5, "speaker_weight": 1.0, "session_penalty": 0.1}
NEW = json.loads(sys.argv[2])
qs = []
for ci, conv in enumerate(convs):
    user = f"locomo-{ci}"
    for _, date, msgs in L.sessions(conv):
        mem.add_raw(user, msgs, session_date=date)
        mem.ingest(user, msgs, session_date=date)
    qs += [(user, q["question"]) for q in conv["qa"] if q.get("question") and L.evidence_ids(q)]
t = []
for i, (_, q) in enumerate(qs):
    rest = without_names(q, names(q)) + f" #{i}{os.getpid()}"  # distinct: never a cache hit
    t0 = time.perf_counter()
    mem._embed([rest])
    t.append(time.perf_counter() - t0)
print(f"embed one rest (uncached): p50 {1e3*np.percentile(t,50):.1f} ms p95 {1e3*np.percentile(t,95):.1f} ms")
mem.first_hop_memo = {}
for u, q in qs:
    mem.search(u, q, k=10, hops=NEW)  # warm: first hop memoised, focus embedding cached
res = {"old": [], "new": []}
for rep in range(3):
    for u, q in qs:
        for name, s in (("old", OLD), ("new", NEW)) if rep % 2 == 0 else (("new", NEW), ("old", OLD)):
            t0 = time.perf_counter()
            mem.search(u, q, k=10, hops=s)
            res[name].append(time.perf_counter() - t0)
for name, v in res.items():
    print(f"second hop {name}: p50 {1e3*np.percentile(v,50):.2f} ms p95 {1e3*np.percentile(v,95):.2f} ms")
print("load", os.getloadavg())
