"""A forget does not rewrite other users' profiles (found by ``make soak-pg``): the ``profile`` plugin's
forget hook used to refit every user's profile from a snapshot of the stored events and write it over
whatever was there, so the online updates other workers made meanwhile were lost (or, for an event
stored before the snapshot and applied after it, counted twice): profiles drifted from a rebuild of
their events. Two Middlewares on one store (two workers): one records choices for a user while the
other forgets other users; every comparison is counted once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

CONFIG = "pipeline: [{use: stated}, {use: profile, features: {embedding: false, ngram_dim: 64}}]\n"
CHOICES = 120


def _mw(url: str) -> Any:
    from persona_mw import Middleware, parse_config
    from persona_mw.testing import ScriptedBackend

    return Middleware(parse_config(CONFIG), store=url, backend=ScriptedBackend(), autoload=False)


def _race(url: str) -> None:
    from persona_mw.nodes import user_node

    a, b = _mw(url), _mw(url)
    done = threading.Event()
    errors: list[BaseException] = []

    def record() -> None:
        try:
            for i in range(CHOICES):
                a.feedback(kind="choice", user="keep", prompt=f"q{i}", chosen=f"short {i}",
                           rejected=[f"a much longer answer number {i} " * 3])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def forget_others() -> None:
        i = 0
        while not done.is_set():
            i += 1
            b.feedback(kind="choice", user=f"gone{i}", prompt="q", chosen="yes", rejected=["no, not that " * 3])
            b.forget(f"gone{i}")

    threads = [threading.Thread(target=record), threading.Thread(target=forget_others)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        prof = a.store.get_profile(user_node("keep"))
        assert prof is not None
        assert prof.evidence == CHOICES
        assert prof.extra["profile"]["pairs"] == CHOICES  # every online update kept, none twice
        a.rebuild("keep")
        again = a.store.get_profile(user_node("keep"))
        assert again is not None and again.extra["profile"]["pairs"] == CHOICES
    finally:
        a.close()
        b.close()


def test_forget_keeps_other_users_online_updates_sqlite(tmp_path: Path) -> None:
    _race(str(tmp_path / "shared.db"))


def test_forget_keeps_other_users_online_updates_postgres(pg_server: str) -> None:
    from tests.conftest import fresh_pg_url

    _race(fresh_pg_url(pg_server))
