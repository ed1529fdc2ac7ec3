"""Where a plugin's block of context goes in the prompt: the one placement function.

``stated`` and ``memory`` place their blocks with it, ``fermi`` its persona prompt and ``contrast``
its "with" preferences; each keeps its own wording of the user turn through ``user_format``.
"""

from __future__ import annotations

from typing import Literal

from persona_mw.types import Message, StashKey

Placement = Literal["user_suffix", "user_prefix", "system"]

# How the block joins the last user message, per placement (``{text}``: the message, ``{block}``).
USER_FORMAT: dict[str, str] = {
    "user_suffix": "{text}\n\n({block})",
    "user_prefix": "({block})\n\n{text}",
}

# Preference texts (casefolded) that a plugin other than ``stated`` puts in the prompt itself (the
# ``contrast`` plugin's "with" prompt): set at gather, so ``memory`` leaves those out of its block
# and a preference is in the prompt once.
PLACED_PREFERENCES: StashKey[set[str]] = StashKey("placed_preferences")


def place_block(messages: list[Message], block: str, placement: str, system_note: str | None = None,
                user_format: str | None = None) -> list[Message]:
    """A new message list with ``block`` added (an empty block adds nothing).

    ``system``: appended to the system message after a blank line, followed there by
    ``system_note`` if given (a system message is created when there is none). ``user_suffix`` /
    ``user_prefix``: joined to the last user message by ``user_format`` (``{text}`` and
    ``{block}``; default ``USER_FORMAT[placement]``: the block in parentheses after / before it).
    """
    out = list(messages)
    if not block:
        return out
    if placement == "system":
        if system_note:
            block = block + "\n" + system_note
        sys_idx = next((i for i, m in enumerate(out) if m.role == "system"), None)
        if sys_idx is None:
            return [Message(role="system", content=block), *out]
        out[sys_idx] = out[sys_idx].with_text(out[sys_idx].text + "\n\n" + block)
        return out
    if placement not in USER_FORMAT:
        raise ValueError(f"unknown placement {placement!r} (user_suffix, user_prefix or system)")
    last = max(i for i, m in enumerate(out) if m.role == "user")
    fmt = user_format if user_format is not None else USER_FORMAT[placement]
    out[last] = out[last].with_text(fmt.format(text=out[last].text, block=block))
    return out


__all__ = ["PLACED_PREFERENCES", "Placement", "USER_FORMAT", "place_block"]
