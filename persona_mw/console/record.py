"""Record each turn's final prompt in its trace (``Trace.prompt``), for the console's trace view.

A ``persona_decoding`` hook that runs last (after every rewrite): it copies ``turn.messages`` into the
trace, each message through the store's redactor (the user's own words are otherwise not stored) and
cut at ``limits.max_trace_text_chars``. It returns nothing, so it changes nothing of the turn.

Merge note: the natural home of this is one line in ``Pipeline.prepare_messages``; it is a hook here
because that module is being rewritten in parallel.
"""

from __future__ import annotations

import logging
from typing import Any

from persona_mw.manager import hookimpl

log = logging.getLogger(__name__)

PLUGIN_NAME = "console_prompt"
MAX_PROMPT_CHARS = 20_000


class PromptRecorder:
    def __init__(self, store: Any, max_chars: int) -> None:
        self.store = store
        self.max_chars = max_chars

    @hookimpl(trylast=True)
    def persona_decoding(self, turn: Any, backend: Any) -> None:
        try:
            redactor = getattr(self.store, "redactor", None)
            budget = MAX_PROMPT_CHARS
            out: list[dict[str, str]] = []
            for msg in turn.messages:
                text = str(getattr(msg, "text", None) or getattr(msg, "content", "") or "")
                if redactor is not None:
                    text = redactor.redact(text)
                cut = min(self.max_chars, budget)
                if len(text) > cut:
                    text = text[:cut] + "..."
                budget -= len(text)
                out.append({"role": str(getattr(msg, "role", "")), "content": text})
                if budget <= 0:
                    break
            turn.trace.prompt = out
            turn.note(f"recorded the final prompt ({len(out)} message(s))")
        except Exception as exc:  # never fail a turn for the console's record
            log.warning("could not record the final prompt: %s", exc)


def record_prompts(mw: Any) -> None:
    """Register the recorder on ``mw``'s plugin manager once (idempotent)."""
    pm = getattr(getattr(mw, "host", None), "pm", None)
    if pm is None or pm.has_plugin(PLUGIN_NAME):
        return
    limits = getattr(getattr(mw, "config", None), "limits", None)
    max_chars = int(getattr(limits, "max_trace_text_chars", 0) or 4000)
    try:
        pm.register(PromptRecorder(mw.store, max(max_chars, 4000)), name=PLUGIN_NAME)
    except ValueError:  # registered meanwhile by another request
        pass
