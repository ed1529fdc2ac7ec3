"""200 concurrent writers of feedback and chat turns against one store (shared with the soak run, on a SQLite file)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from persona_mw import Middleware, parse_config
from persona_mw.testing import ScriptedBackend


def _mw(db: str) -> Middleware:
    cfg = parse_config("pipeline: [{use: stated}]\n")
    cfg.store.path = db
    return Middleware(cfg, backend=ScriptedBackend(), autoload=False)


def concurrent_writers(db: Path | str, writers: int = 200, each: int = 5, instances: int = 4,
                       users: int = 20) -> dict[str, Any]:
    """``writers`` threads spread over ``instances`` Middlewares (separate connections to one store: a
    SQLite file, or any store URL),
    each writing ``each`` events plus one chat turn; then counts what the file holds."""
    mws = [_mw(str(db)) for _ in range(instances)]
    ids: list[str] = []
    traces: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def write(w: int) -> None:
        mw = mws[w % instances]
        user = f"w{w % users}"
        try:
            start.wait()
            for i in range(each):
                ev = ({"kind": "stated", "text": f"pref {w}-{i}"} if i % 2 else
                      {"kind": "choice", "prompt": "q", "chosen": f"short {w} {i}", "rejected": [f"long {w} {i}"]})
                got = mw.feedback(user=user, **ev)
                with lock:
                    ids.append(got)
            r = mw.chat(user=user, messages=f"hello from writer {w}")
            with lock:
                traces.append(r.trace.id)
        except Exception as exc:  # counted, never hidden
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # async writers too: one Middleware's async API under asyncio.gather
    async def async_writes() -> list[str]:
        return list(await asyncio.gather(*(mws[0].afeedback(user=f"a{k % users}", kind="stated", text=f"async {k}")
                                           for k in range(writers))))

    try:
        ids += asyncio.run(async_writes())
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    for mw in mws[1:]:
        mw.close()
    mw = mws[0]
    stored = {e.id for e in mw.store.list_feedback()}
    stored_traces = sum(mw.store.get_trace(t) is not None for t in traces)
    # profiles written by several connections: counts may lag, the events are the truth
    drift = 0
    for u in sorted({f"w{k % users}" for k in range(writers)} | {f"a{k % users}" for k in range(writers)}):
        prof = mw.store.get_profile(f"user:{u}")
        drift += abs((prof.evidence if prof else 0) - mw.store.count_feedback(u))
        mw.rebuild(u)
        prof = mw.store.get_profile(f"user:{u}")
        if prof is None or prof.evidence != mw.store.count_feedback(u):
            errors.append(f"rebuild of {u} gave evidence {prof.evidence if prof else None}")
    mw.close()
    return {"written": len(ids) + len(traces), "events_acked": len(ids), "events_lost": len(set(ids) - stored),
            "turns_acked": len(traces), "traces_lost": len(traces) - stored_traces, "errors": errors,
            "profile_drift_before_rebuild": drift}
