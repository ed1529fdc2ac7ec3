"""Every public verb has an async twin (issue #21: profile, export and forget included) that gives what
the sync verb gives, so async servers and agents never block their event loop on the store."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from persona_mw import Middleware, parse_config
from persona_mw.testing import ScriptedBackend

VERBS = ["chat", "prepare", "complete", "feedback", "state", "rebuild", "profile", "export_user", "forget",
         "join", "leave", "groups", "trace", "resume_jobs", "drain"]


def test_each_public_verb_has_an_async_twin() -> None:
    for verb in VERBS:
        twin = getattr(Middleware, "a" + verb, None)
        assert twin is not None, f"Middleware.a{verb} is missing"


def test_async_twins_answer_as_the_sync_verbs(store_url: Callable[[], str]) -> None:
    cfg = parse_config("pipeline: [{use: stated}]\n")
    cfg.store.path = store_url()
    with Middleware(cfg, backend=ScriptedBackend(), autoload=False) as mw:

        async def run() -> dict[str, Any]:
            await mw.astate("Answer in one short sentence.", user="ana")
            await mw.ajoin("ana", "team")
            resp = await mw.achat(user="ana", messages=[{"role": "user", "content": "hi"}])
            await mw.adrain()
            out = {"profile": await mw.aprofile("ana"), "export": await mw.aexport_user("ana"),
                   "groups": await mw.agroups("ana"), "trace": await mw.atrace(resp.trace.id)}
            return out

        got = asyncio.run(run())
        sync = mw.profile("ana")
        assert got["profile"]["scope"] == sync["scope"]
        assert {n: p["stated"] for n, p in got["profile"]["profiles"].items()} == {
            n: p["stated"] for n, p in sync["profiles"].items()}
        assert got["export"]["feedback"] == mw.export_user("ana")["feedback"]
        assert got["groups"] == mw.groups("ana") == ["team"]
        assert got["trace"] == mw.trace(got["trace"]["id"])
        assert any(s["text"] == "Answer in one short sentence." for s in got["profile"]["profiles"]["user:ana"]["stated"])
