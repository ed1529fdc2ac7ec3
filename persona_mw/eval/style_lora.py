"""The ``lora`` method of ``persona-mw eval style``: per-user LoRA adapters from simulated choices.

Simulated users state preferences and make no choices, so their choices are made as for the
``vectors`` and ``args`` methods (``persona_mw.eval.style_steering.training_pairs``): for each of that
module's ``TRAIN_PROMPTS`` (never the eval prompts) the model answers once plainly and once with the
user's statements in the user turn, and the answer that moves more of the user's own style metrics
in their direction is ``chosen`` (ties dropped). Then:

1. the choices go in as ``choice`` feedback through ``mw.feedback`` on a Middleware with the ``lora``
   plugin (``LORA_SETTINGS``: the plugin's defaults, user nodes only, trained inline);
2. each user's adapter is trained once on all their choices (``LoraAdapters.train_node``), a user
   without a choice gets none;
3. the eval prompts, plain (no statements: the method measures what the adapter learned), are
   decoded for all users together in batches of ``run.batch_size``, each row with its own user's
   scope adapter (``LoraAdapters.scope_adapter``, the one serving picks) through
   ``persona_mw.plugins._lora.row_hooks``; a row without an adapter is the base model exactly.

Cost beyond the answers: ``len(TRAIN_PROMPTS) * (users + 1)`` training answers (shared with
``vectors`` / ``args`` in one run) and one training job per user (``job_seconds`` each at most).
"""

from __future__ import annotations

from typing import Any

from persona_mw.errors import PersonaError
from persona_mw.eval.style import StyleRun, method
from persona_mw.nodes import user_node
from persona_mw.types import Decoding, Message

# The plugin's defaults except: inline training, user nodes only, and no automatic job (``every`` is
# out of reach): the method trains each user once on all their choices.
LORA_SETTINGS: dict[str, Any] = {"background": False, "node_kinds": ["user"], "every": 1_000_000}


def train_adapters(run: StyleRun) -> tuple[Any, list[Any]]:
    """The Middleware with the users' choices and adapters, and each user's scope adapter (or None)."""
    from persona_mw.eval.style_steering import training_pairs
    from persona_mw.types import ChatRequest, Turn

    if not run.white_box:
        raise PersonaError("the lora method needs the local white-box backend (transformers)")
    pairs = training_pairs(run)
    mw = run.middleware({"pipeline": [{"use": "lora", **LORA_SETTINGS}]})
    plugin = mw.plugin("lora")
    adapters: list[Any] = []
    trained = []
    for u in run.users:
        for prompt, chosen, rejected in pairs[u.id]:
            mw.feedback(kind="choice", user=u.id, prompt=prompt, chosen=chosen, rejected=[rejected])
        if pairs[u.id]:
            entry = run.run(plugin.train_node(user_node(u.id), seed=run.seed)) or {}
            trained.append(f"{u.id}: {len(pairs[u.id])} choices, "
                           f"{(entry.get('stats') or {}).get('total_seconds', 0.0):.0f} s")
        req = ChatRequest(user=u.id, messages=[Message(role="user", content="hi")])
        scope, profiles = mw.graph.resolve(req)
        adapter, _used, _notes = plugin.scope_adapter(Turn(request=req, scope=scope, profiles=profiles),
                                                      run.backend.model_name)
        adapters.append(adapter)
    run.notes.append("lora adapters: " + ("; ".join(trained) or "none (no user made a choice)"))
    return mw, adapters


@method("lora", white_box=True)
def _lora(run: StyleRun) -> list[list[str]]:
    """The plain prompt decoded with the user's LoRA adapter (trained on simulated choices), all users
    in mixed-adapter batches."""
    from persona_mw.plugins._lora import row_hooks

    _mw, adapters = train_adapters(run)
    rows = [(ui, p) for ui in range(len(run.users)) for p in run.prompts]
    flat: list[str] = []
    for start in range(0, len(rows), run.batch_size):
        chunk = rows[start:start + run.batch_size]
        ads = [adapters[ui] for ui, _ in chunk]
        decoding = None
        if any(a is not None for a in ads):
            decoding = [Decoding(source="lora", activation_hooks=[lambda m, ads=ads: row_hooks(m, ads)])]
        # One call per chunk of at most batch_size rows: the backend decodes it as one batch, row i
        # with ads[i].
        flat += run.generate([[Message(role="user", content=p)] for _, p in chunk], decoding=decoding)
    n = len(run.prompts)
    return [flat[i * n:(i + 1) * n] for i in range(len(run.users))]


__all__ = ["LORA_SETTINGS", "train_adapters"]
