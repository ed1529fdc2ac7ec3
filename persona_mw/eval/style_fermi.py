"""The ``fermi`` method of ``persona-mw eval style``: the online loop, simulated honestly.

Simulated users have stated preferences and no choices, so the method makes the choices first:

1. every user states their preferences (``mw.state``), which seed FERMI's persona prompt;
2. for each *training* prompt (``TRAIN_PROMPTS``: our own general questions, never the eval
   prompts) the local model writes two candidates — the plain answer and the answer to the
   prompt with the user's statements in the user turn — and the simulated user picks the one
   whose style metrics (the eval's own ``metric``) move in its direction on more dimensions
   (a tie: no choice recorded);
3. the choices go in as ``choice`` feedback; the ``fermi`` plugin's job optimizes each user's prompt
   (white-box scorer on the local model, deterministic proposals and one optimizer call);
4. the eval prompts are answered through ``mw.achat`` with the ``fermi`` plugin in the pipeline.

Cost beyond the answers: ``len(TRAIN_PROMPTS) * (users + 1)`` training answers and one
optimization job per user.
"""

from __future__ import annotations

from typing import Any

from persona_mw.eval.style import DIMENSIONS, UP_SIDE, SimUser, StyleRun, method, metric, run_middleware
from persona_mw.nodes import user_node
from persona_mw.types import Message

TRAIN_PROMPTS: tuple[str, ...] = (
    "Why do leaves change colour in autumn?",
    "How can I get better at remembering names?",
    "What makes a good cup of coffee?",
    "Why is exercise good for you?",
)

FERMI_SETTINGS: dict[str, Any] = {"background": False, "every": len(TRAIN_PROMPTS), "optimizer_calls": 1,
                                  "max_response_tokens": 32, "job_seconds": None, "groups": False}


def prefers(user: SimUser, a: str, b: str) -> int:
    """+1 if ``user`` prefers ``a``, -1 if ``b``, 0 on a tie: dimensions moved in the user's direction."""
    votes = 0
    for dim in DIMENSIONS:
        up = user.sides[dim] == UP_SIDE[dim]
        d = metric(dim, a) - metric(dim, b)
        if d:
            votes += 1 if (d > 0) == up else -1
    return (votes > 0) - (votes < 0)


@method("fermi", white_box=True)
def _fermi(run: StyleRun) -> list[list[str]]:
    mw = run.middleware({"pipeline": [{"use": "fermi", **FERMI_SETTINGS}]})
    run.state_all(mw)
    plain = run.generate([[Message(role="user", content=p)] for p in TRAIN_PROMPTS])
    stated = run.generate([[Message(role="user", content=p + "\n\n(" + " ".join(u.statements()) + ")")]
                           for u in run.users for p in TRAIN_PROMPTS])
    n = len(TRAIN_PROMPTS)
    made = 0
    plugin = mw.plugin("fermi")
    for ui, u in enumerate(run.users):
        mine = 0
        for pi, p in enumerate(TRAIN_PROMPTS):
            a, b = stated[ui * n + pi], plain[pi]
            pick = prefers(u, a, b)
            if pick == 0 or not a.strip() or not b.strip() or a == b:
                continue
            chosen, rejected = (a, b) if pick > 0 else (b, a)
            mw.feedback(kind="choice", user=u.id, prompt=p, chosen=chosen, rejected=[rejected])
            made += 1
            mine += 1
        if mine and not plugin.state_of(mw.store.get_profile(user_node(u.id))).get("history"):
            run.run(plugin.optimize(user_node(u.id)))  # fewer choices than 'every': optimize once anyway
    run.notes.append(f"fermi: {made} simulated choices from {n} training prompts")
    return run_middleware(run, mw)


__all__ = ["FERMI_SETTINGS", "TRAIN_PROMPTS", "prefers"]
