"""Isolation: randomized requests from look-alike users and tenants through every entry point never
show one user's (or tenant's) data to another — in prompts, answers, traces, profiles or exports."""

from __future__ import annotations

from typing import Any

import pytest

from persona_mw import hookimpl
from persona_mw.testing import registered
from persona_mw.types import Message

from .probes import OPEN, World, run_probes


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_isolation_probes_find_no_leak(tmp_path: Any, kind: str, request: Any) -> None:
    """The same probes on both stores (Postgres: a schema per store, tenants in schemas of their own)."""
    store_url = None
    if kind == "postgres":
        from ..conftest import fresh_pg_url

        uri = request.getfixturevalue("pg_server")
        store_url = lambda name: fresh_pg_url(uri, name)  # noqa: E731
    result = run_probes(tmp_path, n=200, users=10, seed=1, store_url=store_url)
    assert result["probes"] >= 200
    assert result["leaks"] == []
    assert result["controls_failed"] == []  # every user's own preference did reach their prompt


class LeakyPlugin:
    """A deliberately broken plugin: puts user000's stated preferences into everyone's prompt."""

    def __init__(self, mw: Any) -> None:
        self.mw = mw

    @hookimpl
    def persona_rewrite(self, turn: Any, messages: list[Message]) -> list[Message]:
        prof = self.mw.store.get_profile("user:user000")
        return [*messages, Message(role="system", content=" ".join(p.text for p in prof.stated))]


def test_the_probes_catch_a_leaky_plugin(tmp_path: Any, store_url: Any) -> None:
    """The probe is not vacuous: one plugin that reads another user's profile is caught at once."""
    with World(tmp_path, users=6, seed=2, store_url=lambda name: store_url()).running() as world:
        with registered(world.open_mw, LeakyPlugin(world.open_mw), "leaky"):
            for user in world.user_ids[1:]:
                text, _ = world.ask("python", OPEN, user)
                world.check(OPEN, user, text, "python response")
        assert len(world.leaks) == len(world.user_ids) - 1
