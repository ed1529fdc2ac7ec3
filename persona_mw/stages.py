"""The stage table: the one place that says, for every hook, how it is run.

Each row names a hook, the phase it belongs to, how the results of several plugins combine,
which entry paths run it, what its result must be (checked at the boundary, so a plugin
returning garbage fails with its name), how the trace summarizes a result, and whether the
hook runner awaits it under the plugin's failure policy. Everything else derives from it: the
hookspecs' ``firstresult`` markers (``persona_mw.hookspecs``), the pipeline's order and result
checks (``persona_mw.pipeline``), trace summaries, ``persona_mw.testing.HookRecorder``, the
``persona-mw plugins --hooks`` listing and the hook reference page. A new hook is a row here,
a spec in ``hookspecs`` and a call in the pipeline; ``tests/test_stages.py`` fails until all three agree.

Combine modes:
  collect      every implementation runs; the non-None results are gathered in order
  chain        every implementation runs; each receives the previous one's result and may
               return a replacement (None = unchanged)
  firstresult  implementations run in order until one returns non-None
  broadcast    every implementation runs; results are ignored (hooks that return nothing)

Runners:
  awaited      the pipeline's hook runner: arguments a plugin declares, coroutines awaited,
               the plugin's ``on_error`` policy applied (``fail`` raises ``PluginError`` naming
               it, ``skip`` logs and goes on); ``ConfigError`` from startup always propagates
  (offload)    an awaited stage whose plain-function implementations run on a thread of their
               plugin, one call at a time per plugin (``persona_feedback``: store work that must
               not stall the event loop; ``persona_forget`` runs in the forgetting thread already)
  sync         registration hooks, called while the plugin manager is built (before any event
               loop or pipeline exists): plain functions only; an ``async def`` implementation is
               refused when it is registered (``PluginError`` naming the plugin and the hook)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import TypeAdapter

from persona_mw.types import Candidate, ContextItem, Decoding, Message, Scope

Combine = Literal["collect", "chain", "firstresult", "broadcast"]
Phase = Literal["startup", "turn", "learning"]
Runner = Literal["awaited", "sync"]

# The entry paths of the Middleware. ``chat`` and ``stream`` run the whole turn; ``prepare`` is the
# split turn of the integrations (``prepare``/``complete``: the litellm callback, the OpenAI
# wrapper, the LangChain model's callers) whose LLM call happens elsewhere, so it cannot run
# decoding, generate, score, select or correct.
ENTRY_PATHS: dict[str, str] = {
    "construct": "Middleware(...) / PluginHost: registries, then startup",
    "cli": "the persona-mw CLI building its parser",
    "chat": "chat / achat",
    "stream": "stream / astream",
    "prepare": "prepare + complete (litellm callback, OpenAI wrapper)",
    "feedback": "feedback / afeedback / rebuild",
    "forget": "forget / aforget",
}

_messages_adapter: TypeAdapter[list[Message]] = TypeAdapter(list[Message])


@dataclass(frozen=True)
class Stage:
    """One row of the table."""

    hook: str
    phase: Phase
    combine: Combine
    paths: tuple[str, ...]
    runner: Runner = "awaited"
    check: Callable[[Any], Any] | None = None
    summary: Callable[[Any], str] | None = None
    # Errors a hook raises that pass through the runner unchanged, whatever the plugin's policy.
    passes: tuple[str, ...] = ()
    # True: a plain-function (not ``async def``) implementation runs on a thread of its own plugin
    # (one call at a time per plugin, as on the event loop), so its store writes and retry sleeps do
    # not stall the requests the same process is serving.
    offload: bool = False

    @property
    def firstresult(self) -> bool:
        return self.combine == "firstresult"


def describe_items(items: Any, limit: int = 4, width: int = 40) -> str:
    """``added 2 items: stated like "Answer in one short sentence." (user:ana); ...``: which items,
    not only how many (the first ``limit``, each text cut at ``width`` characters)."""
    items = list(items)
    parts = []
    for it in items[:limit]:
        text = " ".join(str(getattr(it, "text", it)).split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        kind = getattr(it, "kind", "item")
        pol = getattr(it, "polarity", None)
        node = getattr(it, "node", None)
        parts.append(f"{kind}{' ' + pol if pol else ''} \"{text}\"{f' ({node})' if node else ''}")
    more = f"; +{len(items) - limit} more" if len(items) > limit else ""
    return f"added {len(items)} item{'s' if len(items) != 1 else ''}: " + "; ".join(parts) + more


_TURN = ("chat", "stream")
_ALL_TURNS = ("chat", "stream", "prepare")

STAGES: tuple[Stage, ...] = (
    Stage("persona_register_plugins", "startup", "broadcast", ("construct",), runner="sync"),
    Stage("persona_register_backends", "startup", "broadcast", ("construct",), runner="sync"),
    Stage("persona_register_rewards", "startup", "broadcast", ("construct",), runner="sync"),
    Stage("persona_register_detectors", "startup", "broadcast", ("construct",), runner="sync"),
    Stage("persona_startup", "startup", "broadcast", ("construct",), passes=("ConfigError",)),
    Stage("persona_register_commands", "startup", "broadcast", ("cli",), runner="sync"),
    Stage("persona_resolve_scope", "turn", "firstresult", _ALL_TURNS,
          check=Scope.model_validate, summary=lambda r: f"granularity {r.granularity}"),
    Stage("persona_gather", "turn", "collect", _ALL_TURNS,
          check=lambda r: [ContextItem.model_validate(i) for i in r], summary=describe_items),
    Stage("persona_rewrite", "turn", "chain", _ALL_TURNS,
          check=_messages_adapter.validate_python, summary=lambda r: f"{len(r)} message(s)"),
    Stage("persona_decoding", "turn", "collect", _TURN, check=Decoding.model_validate),
    Stage("persona_generate", "turn", "firstresult", _TURN,
          check=lambda r: [Candidate.model_validate(c) for c in r], summary=lambda r: f"{len(r)} candidate(s)"),
    Stage("persona_score", "turn", "collect", _TURN,
          check=lambda r: {str(k): [float(x) for x in v] for k, v in dict(r).items()},
          summary=lambda r: "scored: " + ", ".join(r)),
    Stage("persona_select", "turn", "firstresult", _TURN, check=int, summary=lambda r: f"picked {r}"),
    Stage("persona_correct", "turn", "chain", _TURN, check=Candidate.model_validate,
          summary=lambda r: "edited the answer"),
    Stage("persona_after_turn", "turn", "broadcast", _ALL_TURNS),
    Stage("persona_feedback", "learning", "broadcast", ("feedback",), offload=True),
    Stage("persona_forget", "learning", "broadcast", ("forget",)),
    Stage("persona_profile_report", "startup", "collect", ("cli",), runner="sync"),
)

BY_HOOK: dict[str, Stage] = {s.hook: s for s in STAGES}


def stage(hook: str) -> Stage:
    """The row of ``hook``; a clear error for a hook the table does not know."""
    try:
        return BY_HOOK[hook]
    except KeyError:
        raise KeyError(f"{hook!r} has no row in persona_mw.stages.STAGES") from None


def of_phase(phase: Phase) -> dict[str, Combine]:
    """``{hook: combine}`` of one phase, in table order."""
    return {s.hook: s.combine for s in STAGES if s.phase == phase}


def on_path(path: str) -> list[str]:
    """The hooks an entry path runs, in order."""
    if path not in ENTRY_PATHS:
        raise KeyError(f"unknown entry path {path!r} (known: {', '.join(ENTRY_PATHS)})")
    return [s.hook for s in STAGES if path in s.paths]


def summarize(hook: str, result: Any) -> str:
    """The trace summary of a hook's result ('' when it has none)."""
    row = BY_HOOK.get(hook)
    if result is None or row is None or row.summary is None:
        return ""
    return row.summary(result)


def paths_doc() -> str:
    """Which stages each entry path runs, for the hookspecs docstring and the docs."""
    lines = ["Entry paths (the stages each one runs, in order):"]
    for path, what in ENTRY_PATHS.items():
        hooks = ", ".join(h.removeprefix("persona_") for h in on_path(path))
        lines.append(f"  {path:<10} {what}: {hooks}")
    return "\n".join(lines)


__all__ = ["BY_HOOK", "ENTRY_PATHS", "STAGES", "Stage", "describe_items", "of_phase", "on_path", "paths_doc",
           "stage", "summarize"]
