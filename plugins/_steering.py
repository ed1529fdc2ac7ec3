"""Shared pieces of the white-box steering plugins (contrast, experts, args, vectors).

- ``check_white_box``: at startup, a steering plugin on a black-box backend is a ``ConfigError``
  (``on_error: fail``) or is skipped turn by turn with a ``PluginError`` in the trace
  (``on_error: skip``) -- never a silent no-op.
- ``scope_value``: a per-user setting read from the nodes of the request's scope
  (``Profile.extra[plugin][field]``), combined with the scope's weights; nodes without one
  contribute the config default.
- ``scope_preferences``: the stated preferences that apply to the request, most specific first.
- ``preference_pairs``: (prompt, chosen, rejected) triples from stored choice and edit events.
"""

from __future__ import annotations

from typing import Any, Iterable

from persona_mw.errors import PluginError
from persona_mw.nodes import USER_KINDS, most_specific_first
from persona_mw.context import PluginContext
from persona_mw.types import ChoiceFeedback, EditFeedback, Message, Turn


def is_white_box(backend: Any) -> bool:
    caps = getattr(backend, "capabilities", None)
    return bool(getattr(caps, "white_box", False))


def check_white_box(plugin: Any, ctx: PluginContext, kind: str) -> None:
    """Refuse a black-box main backend at startup unless the plugin's policy is ``skip``."""
    backend = ctx.backend()
    if is_white_box(backend) or ctx.policy == "skip":
        return
    raise ctx.config_error(
        f"plugin {plugin.name!r} ({kind}) steers decoding and needs a "
        f"white-box backend, but {getattr(backend, 'name', type(backend).__name__)!r} exposes no logits",
        hint="use `backend: {type: transformers}`, or set `on_error: skip` to skip it on black-box backends "
        "(each skipped turn is recorded in the trace)",
    )


def require_white_box(plugin: Any, backend: Any, kind: str) -> None:
    """At turn time: a clear PluginError (the policy decides: fail the turn or skip, in the trace)."""
    if not is_white_box(backend):
        raise PluginError(
            f"plugin {plugin.name!r} ({kind}) needs a white-box backend; "
            f"{getattr(backend, 'name', type(backend).__name__)!r} is black-box, so it was not applied",
            plugin=plugin.name, hook="persona_decoding",
            hint="use the transformers backend for steering",
        )


def scope_value(turn: Turn, key: str, field: str, default: float) -> float:
    """``sum_n w_n * v_n`` over the scope's nodes, ``v_n = Profile.extra[key][field]`` or ``default``."""
    if turn.scope is None or not turn.scope.nodes:
        return float(default)
    total = 0.0
    weight = 0.0
    for node in turn.scope.nodes:
        prof = turn.profiles.get(node.id)
        raw = (prof.extra.get(key) or {}).get(field) if prof is not None else None
        value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else float(default)
        total += node.weight * value
        weight += node.weight
    return total / weight if weight > 0 else float(default)


def scope_preferences(turn: Turn, include_inherited: bool = True) -> list[tuple[str, str]]:
    """(text, polarity) of every stated preference in scope, most specific node first, deduplicated."""
    if turn.scope is None:
        return []
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for node in most_specific_first(turn.scope.nodes):
        if not include_inherited and node.kind not in USER_KINDS:
            continue
        prof = turn.profiles.get(node.id)
        if prof is None:
            continue
        for pref in sorted(prof.stated, key=lambda p: -p.created_at):
            text = " ".join(pref.text.split())
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            out.append((text, pref.polarity))
    return out


def preference_block(prefs: Iterable[tuple[str, str]], header: str) -> str:
    lines = [f"- {'Avoid: ' if pol == 'avoid' else ''}{text}" for text, pol in prefs]
    return header + "\n" + "\n".join(lines) if lines else ""


def event_pairs(events: Iterable[Any]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for each chosen/rejected pair in choice and edit events."""
    pairs: list[tuple[str, str, str]] = []
    for ev in events:
        if isinstance(ev, ChoiceFeedback):
            pairs += [(ev.prompt, ev.chosen, r) for r in ev.rejected]
        elif isinstance(ev, EditFeedback):
            pairs.append((ev.prompt, ev.after, ev.before))
    return pairs


def chat_texts(backend: Any, prompt: str, responses: list[str]) -> tuple[str, list[str]]:
    """The prompt as the backend formats it, and prompt + each response (for feature passes)."""
    prefix = backend.format_prompt([Message(role="user", content=prompt or "")])
    return prefix, [prefix + r for r in responses]


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a causal LM (Llama, Gemma, Mistral, Qwen... layouts)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise PluginError(f"cannot find the decoder layers of {type(model).__name__}", plugin="steering")
