"""``persona-mw profile show``'s "prompts": a node's current prompt, its memory and score history."""

from __future__ import annotations

from typing import Any

from persona_mw.types import Profile


def prompt_report(profile: Profile, name: str = "fermi") -> dict[str, Any] | None:
    """The current prompt and its score history, for ``persona-mw profile show``."""
    st = profile.extra.get(name)
    if not st:
        return None
    best = next((p for p in st.get("prompts", []) if p["id"] == st.get("best")), None)
    return {
        "prompt": profile.prompt,
        "prompt_id": st.get("best"),
        "score": None if best is None else round(best.get("score", 0.0), 4),
        "accuracy": None if best is None else round(best.get("acc", 0.0), 3),
        "source": None if best is None else best.get("source"),
        "history": [{"at": h.get("at"), "accepted": h.get("accepted"), "score": h.get("best_score"),
                     "accuracy": h.get("best_acc"), "prompt_id": h.get("prompt_id"), "examples": h.get("examples"),
                     "proposed": h.get("proposed"), "aux_calls": h.get("aux_calls"), "errors": h.get("errors")}
                    for h in st.get("history", [])],
        "memory": [{"id": p["id"], "source": p.get("source"), "score": p.get("score"), "accuracy": p.get("acc"),
                    "text": p.get("text")} for p in st.get("prompts", [])],
    }




def prompt_reports(plugins: list[tuple[str, Any]], profiles: dict[str, Any]) -> dict[str, Any]:
    """``{node: prompt_report}`` for the nodes in ``profiles`` (dumped or models) that have an optimized prompt;
    ``plugins`` is ``(name, instance)`` of the pipeline's entries (``PluginContext.plugins()``)."""
    from .plugin import Fermi

    names = [name for name, inst in plugins if isinstance(inst, Fermi)] or ["fermi"]
    out: dict[str, Any] = {}
    for node, prof in profiles.items():
        prof = prof if isinstance(prof, Profile) else Profile.model_validate(prof)
        for name in names:
            rep = prompt_report(prof, name)
            if rep is not None:
                out[node if len(names) == 1 else f"{node} ({name})"] = rep
    return out
