"""Crash-resume of after-turn ingestion (issue #17): a worker process is SIGKILLed while its memory
plugin ingests a long conversation; the restarted Middleware resumes the job by itself within seconds
(no operator, no ``resume_jobs`` call) and the store holds no duplicate memory. Subprocess-based."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.reliability.crash_ingest import MESSAGES, ingest_crash_cycle
from tests.reliability.soak_forget import forget_race


def test_sigkill_during_ingestion_then_restart_resumes_without_duplicates(store_url: Any) -> None:
    url = store_url()
    for seed in (3, 11):  # one kill among the raw turns, one among the extracted memories (and the same db)
        r = ingest_crash_cycle(url, seed=seed, wait_s=15)
        assert r["pending_at_kill"] == 1, r
        assert r["jobs_left"] == 0 and r["duplicate_memories"] == 0, r
        assert not r["operator_needed"], r  # resumed by the restart itself
    assert r["raw_turns"] == 2 * MESSAGES  # each message of both conversations stored exactly once


def test_soak_forget_race_small(tmp_path: Path, store_url: Any) -> None:
    """The soak's forget phase at a small size: every user deleted while their turn generates."""
    r = forget_race(tmp_path, turns=16, url=store_url())
    assert r["error_count"] == 0, r["errors"]
    assert r["deleted_during_generation"] == 16, r  # every DELETE answered while its turn generated
    assert r["resurrected"] == 0, r["resurrected_examples"]
    assert r["pending_scrub_after"] == 0 and r["secrets_left_in_files"] == 0, r
