"""`persona-mw db copy` throughput: a SQLite store with USERS (default 100) users x (100 memories with
384-d vectors + 100 feedback events) copied into a fresh Postgres (pgserver), every export compared.

    .venv/bin/python benchmarks/pg_copy.py   # writes benchmarks/results/pg_db_copy.json
"""
import json
import os
import tempfile
import time

import numpy as np
import pgserver

from persona_mw.store.sqlite import SQLiteStore
from persona_mw.store import open_store
from persona_mw.store.copy import copy_store
from persona_mw.types import Memory, StatedFeedback, Profile

d = tempfile.mkdtemp(prefix="pg-copybench-")
srv = pgserver.get_server(d, cleanup_mode="delete")
try:
    src = SQLiteStore(os.path.join(d, "..", os.path.basename(d) + ".db"))
    rng = np.random.default_rng(0)
    t = time.time()
    for u in range(int(os.environ.get("USERS", "100"))):
        src.put_profile(Profile(node=f"user:u{u}", evidence=u))
        for i in range(100):
            v = rng.standard_normal(384).astype(np.float32)
            src.add_memory(Memory(owner=f"user:u{u}", text=f"memory {i} of user {u} about topic {i % 7}",
                                  embedding=(v / np.linalg.norm(v)).tolist()))
            src.append_feedback(StatedFeedback(user=f"u{u}", text=f"pref {i}"))
    fill = time.time() - t
    dst = open_store(srv.get_uri() + "#schema=copybench")
    rep = copy_store(src, dst)
    rep["fill_s"] = round(fill, 1)
    rep["command"] = "python benchmarks/pg_copy.py (copy_store, the body of `persona-mw db copy`)"
    rep["note"] = "2-core machine shared with other jobs (load ~15); SQLite file -> pgserver Postgres 16.2 on loopback (unix socket)"
    print(json.dumps(rep))
    json.dump(rep, open(os.path.join(os.path.dirname(__file__), "results", "pg_db_copy.json"), "w"), indent=1)
    dst.close()
    src.close()
    os.remove(src.path)
finally:
    srv.cleanup()
