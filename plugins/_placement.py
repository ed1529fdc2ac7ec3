"""Where a plugin's block of context goes in the prompt (shared by ``stated`` and ``memory``)."""

from __future__ import annotations

from typing import Literal

from persona_mw.types import Message, StashKey

Placement = Literal["user_suffix", "user_prefix", "system"]

# Preference texts (casefolded) that a plugin other than ``stated`` puts in the prompt itself (the
# ``contrast`` plugin's "with" prompt): set at gather, so ``memory`` leaves those out of its block
# and a preference is in the prompt once.
PLACED_PREFERENCES: StashKey[set[str]] = StashKey("placed_preferences")


def place_block(messages: list[Message], block: str, placement: str, system_note: str | None = None) -> list[Message]:
    """A new message list with ``block`` added: in parentheses after (``user_suffix``) or before
    (``user_prefix``) the last user message, or appended to the system message (``system``; one is
    created when there is none), followed there by ``system_note`` if given."""
    out = list(messages)
    if placement == "system":
        if system_note:
            block = block + "\n" + system_note
        sys_idx = next((i for i, m in enumerate(out) if m.role == "system"), None)
        if sys_idx is None:
            return [Message(role="system", content=block), *out]
        out[sys_idx] = out[sys_idx].with_text(out[sys_idx].text + "\n\n" + block)
        return out
    last = max(i for i, m in enumerate(out) if m.role == "user")
    text = out[last].text
    new = f"{text}\n\n({block})" if placement == "user_suffix" else f"({block})\n\n{text}"
    out[last] = out[last].with_text(new)
    return out
