"""``make soak``: the reliability probes at scale (not in CI). Prints a JSON summary as its last line
and writes it to benchmarks/results/soak.json.

    python -m tests.reliability.soak [--probes 10000] [--writers 200] [--cycles 20] [--fuzz 10000]
        [--forget-turns 200] [--ingest-cycles 20] [--fuzz-memory 1000] [--fuzz-model 200] [--bounds 300]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=10_000, help="isolation probes")
    ap.add_argument("--writers", type=int, default=200, help="concurrent writer threads")
    ap.add_argument("--cycles", type=int, default=20, help="SIGKILL crash-recovery cycles")
    ap.add_argument("--fuzz", type=int, default=10_000, help="bad inputs (HTTP and Python API, 70/30)")
    ap.add_argument("--forget-turns", type=int, default=200, help="in-flight turns (JSON+SSE) forgotten mid-generation")
    ap.add_argument("--ingest-cycles", type=int, default=20, help="SIGKILL-during-ingestion cycles")
    ap.add_argument("--fuzz-memory", type=int, default=1000, help="bad inputs through a memory (after-turn) pipeline")
    ap.add_argument("--fuzz-model", type=int, default=200, help="bad inputs through the real local model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bounds", type=int, default=300, help="victim requests idle and under group/size bombs (0: skip)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args()

    import httpx

    from persona_mw import Middleware, parse_config
    from persona_mw.server import create_app, serve_in_thread
    from persona_mw.testing import ScriptedBackend

    from .crash import crash_cycle
    from .fuzz import fuzz_http, fuzz_python
    from .probes import run_probes
    from .soak_bounds import bounds_soak
    from .soak_forget import forget_race, ingest_crashes
    from .writers import concurrent_writers

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="persona-soak-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        (root / "iso").mkdir()
        iso = run_probes(root / "iso", n=args.probes, users=24, seed=args.seed)
        seconds["isolation"] = time.perf_counter() - t
        print(f"isolation: {iso['probes']} probes, {len(iso['leaks'])} leaks", file=sys.stderr, flush=True)

        t = time.perf_counter()
        w = concurrent_writers(root / "writers.db", writers=args.writers, each=10)
        seconds["concurrency"] = time.perf_counter() - t
        print(f"writers: {w['written']} written, {w['events_lost']} lost", file=sys.stderr, flush=True)

        t = time.perf_counter()
        cycles = []
        for c in range(args.cycles):
            cycles.append(crash_cycle(root / "crash.db", seed=args.seed + c, kill_after=40 + 7 * (c % 5)))
        seconds["crash"] = time.perf_counter() - t
        print(f"crash: {len(cycles)} cycles", file=sys.stderr, flush=True)

        t = time.perf_counter()
        cfg = parse_config("pipeline: [{use: stated}]\nprivacy: {redact: [email, phone, card]}\n")
        cfg.store.path = str(root / "fuzz.db")
        mw = Middleware(cfg, backend=ScriptedBackend(), autoload=False)
        mw.feedback(kind="stated", user="ana", text="Be brief.")
        rng = random.Random(args.seed)
        n_http = args.fuzz * 7 // 10
        with serve_in_thread(create_app(mw, max_body_bytes=16 * 1024)) as url, httpx.Client(timeout=30) as client:
            fh = fuzz_http(client, url, rng, n_http)
        fp = fuzz_python(mw, rng, args.fuzz - n_http)
        mw.close()
        seconds["fuzz"] = time.perf_counter() - t

        from .soak_inputs import fuzz_memory, fuzz_model, ok as fuzz_ok

        t = time.perf_counter()
        fm = fuzz_memory(root, args.fuzz_memory, seed=args.seed)
        seconds["fuzz_memory"] = time.perf_counter() - t
        t = time.perf_counter()
        fl = fuzz_model(root, args.fuzz_model, seed=args.seed) if args.fuzz_model else \
            {"tried": 0, "bad": [], "export_bad": [], "jobs_left": 0, "turns_answered": 0}
        seconds["fuzz_model"] = time.perf_counter() - t
        print(f"fuzz: memory {len(fm['bad'])} bad of {fm['tried']}, model {len(fl['bad'])} bad of {fl['tried']}",
              file=sys.stderr, flush=True)

        t = time.perf_counter()
        fr = forget_race(root, turns=args.forget_turns)
        ic = ingest_crashes(root, cycles=args.ingest_cycles, seed=args.seed)
        seconds["forget"] = time.perf_counter() - t
        print(f"forget: {fr['resurrected']} resurrected of {fr['turns']}, {ic['duplicate_memories']} duplicate "
              f"memories in {ic['cycles']} ingestion crashes", file=sys.stderr, flush=True)

        t = time.perf_counter()
        bounds = bounds_soak(root, idle=args.bounds, during=args.bounds) if args.bounds else {"ok": True}
        seconds["bounds"] = time.perf_counter() - t
        print(f"bounds: victim p95 x{bounds.get('victim_p95_ratio')} under bombs", file=sys.stderr, flush=True)

    problems = (fr["errors"][:5] + iso["leaks"][:5] + iso["controls_failed"][:5] + w["errors"][:5] + fh["bad"][:5]
                + fp["bad"][:5] + fm["bad"][:5] + fm["export_bad"][:5] + fl["bad"][:5] + fl["export_bad"][:5])
    summary = {
        "isolation_probes": iso["probes"], "leaks": len(iso["leaks"]),
        "isolation_controls_failed": len(iso["controls_failed"]),
        "events_written_concurrently": w["written"], "concurrent_writers": args.writers,
        "events_lost": w["events_lost"] + w["traces_lost"], "writer_errors": len(w["errors"]),
        "profile_drift_before_rebuild": w["profile_drift_before_rebuild"],
        "crash_cycles": len(cycles),
        "corrupted_databases": sum(c["integrity"] != "ok" for c in cycles),
        "acked_writes_lost_in_crashes": sum(c["lost_events"] for c in cycles),
        "acked_writes_in_crashes": sum(c["acked_events"] + c["acked_turns"] for c in cycles),
        "jobs_pending_at_kill": sum(c["pending_jobs"] for c in cycles),
        "jobs_resumed": sum(c["resumed_jobs"] for c in cycles),
        "after_turn_effects_missing": sum(c["missing_after_turn"] for c in cycles),
        "rebuild_failures": sum(not c["rebuilt_ok"] for c in cycles),
        "fuzzed_inputs": fh["tried"] + fp["tried"], "fuzzed_http": fh["tried"], "fuzzed_python": fp["tried"],
        "server_5xx_or_tracebacks": len(fh["bad"]), "python_api_crashes": len(fp["bad"]),
        "bounds": bounds,
        "forget_race_turns": fr["turns"], "forget_deleted_during_generation": fr["deleted_during_generation"],
        "resurrected_users": fr["resurrected"], "forget_race_errors": fr["error_count"],
        "forget_unscrubbed_at_delete": fr["unscrubbed_at_delete"], "forget_pending_scrub_after": fr["pending_scrub_after"],
        "ingest_crash_cycles": ic["cycles"], "duplicate_memories": ic["duplicate_memories"],
        "ingest_jobs_needing_operator": ic["operator_needed"], "ingest_max_resume_s": ic["max_resume_s"],
        "fuzzed_memory_pipeline": fm["tried"], "fuzz_memory_problems": len(fm["bad"]) + len(fm["export_bad"]),
        "fuzz_memory_turns_answered": fm["turns_answered"], "fuzz_memory_jobs_left": fm["jobs_left"],
        "fuzzed_local_model": fl["tried"], "fuzz_model_problems": len(fl["bad"]) + len(fl["export_bad"]),
        "fuzz_model_turns_answered": fl["turns_answered"], "fuzz_model_jobs_left": fl["jobs_left"],
        "seconds": {k: round(v, 1) for k, v in {**seconds, "total": time.perf_counter() - t0}.items()},
        "examples_of_problems": problems,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    ok = not (summary["leaks"] or summary["events_lost"] or summary["corrupted_databases"]
              or summary["server_5xx_or_tracebacks"] or summary["python_api_crashes"]
              or summary["acked_writes_lost_in_crashes"] or summary["after_turn_effects_missing"]
              or summary["resurrected_users"] or summary["forget_race_errors"] or summary["duplicate_memories"]
              or summary["ingest_jobs_needing_operator"] or not bounds["ok"] or not fuzz_ok(fm) or not fuzz_ok(fl))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
