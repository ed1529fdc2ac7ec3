"""CAA steering vectors per graph node (ALGORITHMS.md §8.1).

From a node's chosen/rejected pairs, the vector is the mean over pairs of
``mean_pos(h_L(prompt + chosen)) - mean_pos(h_L(prompt + rejected))``: the residual stream at the
output of decoder layer ``L``, averaged over the response's tokens (free-form answers have no
single answer-letter position as CAA's A/B items do). It is stored as a running sum and count in
``Profile.extra["vectors"]`` (with the model and layer it belongs to), so each new choice or edit
costs two forward passes and the mean stays exact. ``forget`` removes it with the profile.

At generation the vectors of the scope's nodes are combined with the scope's weights
(renormalized over the nodes that have one) and ``strength * v`` is added to layer ``L``'s output
at every position (prompt and answer, as BiPO and most re-implementations do; with a KV cache
this is the same as adding it at each new position).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.errors import PluginError, RequestError
from persona_mw.nodes import user_node
from persona_mw.types import Decoding, Feedback, Turn
from persona_mw.plugins._steering import (
    chat_texts,
    check_white_box,
    decoder_layers,
    event_pairs,
    require_white_box,
    scope_value,
)

KEY = "vectors"


def default_layer(model: Any) -> int:
    """About 40% of the depth (CAA used layer 13 of Llama-2-7B's 32)."""
    n = len(decoder_layers(model))
    return max(0, min(n - 1, round(0.4 * n)))


def pair_differences(model: Any, tok: Any, backend: Any, pairs: list[tuple[str, str, str]], layer: int,
                     max_tokens: int = 128) -> Any:
    """``[len(pairs), d]`` activation differences (torch thread; one forward per text)."""
    import torch

    layers = decoder_layers(model)
    grabbed: list[Any] = []

    def grab(_mod: Any, _inp: Any, out: Any) -> None:
        grabbed.append((out[0] if isinstance(out, tuple) else out).detach())

    handle = layers[layer].register_forward_hook(grab)
    special = not getattr(tok, "chat_template", None)
    diffs = []
    try:
        with torch.inference_mode():
            for prompt, chosen, rejected in pairs:
                prefix, texts = chat_texts(backend, prompt, [chosen, rejected])
                start = len(tok.encode(prefix, add_special_tokens=special))
                means = []
                for text in texts:
                    ids = tok.encode(text, add_special_tokens=special)[: start + max_tokens]
                    grabbed.clear()
                    model(input_ids=torch.tensor([ids]), use_cache=False)
                    h = grabbed[-1][0, min(start, len(ids) - 1):, :].to(torch.float32)
                    means.append(h.mean(dim=0))
                diffs.append(means[0] - means[1])
    finally:
        handle.remove()
    return torch.stack(diffs) if diffs else torch.zeros((0, model.config.hidden_size))


async def learn_pairs(middleware: Any, node: str, pairs: list[tuple[str, str, str]], *,
                      layer: int | None = None, backend: Any = None) -> dict[str, Any]:
    """Add (prompt, chosen, rejected) pairs to ``node``'s steering vector; returns the stored state."""
    backend = backend or middleware.backend
    if not pairs:
        raise RequestError("no chosen/rejected pairs to learn a steering vector from", field="pairs")
    model_name = getattr(backend, "model_name", getattr(backend, "name", ""))

    def work(model: Any, tok: Any) -> tuple[int, list[float], int]:
        nonlocal layer
        if layer is None:
            layer = default_layer(model)
        d = pair_differences(model, tok, backend, pairs, layer)
        return layer, d.sum(dim=0).tolist(), int(d.shape[0])

    lay, total, count = await backend.call(work)
    state: dict[str, Any] = {}

    def change(prof: Any) -> None:
        old = prof.extra.get(KEY) or {}
        if old.get("model") == model_name and old.get("layer") == lay and len(old.get("sum", [])) == len(total):
            s = [a + b for a, b in zip(old["sum"], total)]
            n = int(old.get("n", 0)) + count
        else:
            s, n = total, count
        prof.extra[KEY] = {"model": model_name, "layer": lay, "sum": s, "n": n}
        state.update(prof.extra[KEY])

    middleware.update_profile(node, change)
    return state


def combined_vector(turn: Turn, model_name: str, layer: int) -> tuple[list[float] | None, dict[str, float]]:
    """The scope-weighted mean of the nodes' vectors for this model and layer (None if none)."""
    if turn.scope is None:
        return None, {}
    acc: list[float] | None = None
    used: dict[str, float] = {}
    wsum = 0.0
    for node in turn.scope.nodes:
        prof = turn.profiles.get(node.id)
        st = (prof.extra.get(KEY) if prof is not None else None) or {}
        if not st or st.get("model") != model_name or st.get("layer") != layer or not st.get("n") or node.weight <= 0:
            continue
        vec = [x / st["n"] for x in st["sum"]]
        acc = [node.weight * x for x in vec] if acc is None else [a + node.weight * x for a, x in zip(acc, vec)]
        used[node.id] = node.weight
        wsum += node.weight
    if acc is None or wsum <= 0:
        return None, {}
    return [a / wsum for a in acc], used


def add_vector_hook(layer: int, vector: Any, strength: float) -> Any:
    """An activation hook ``hook(model) -> handle`` adding ``strength * vector`` to layer ``layer``'s output.

    It is marked ``hook.residual = (layer, tensor)``: the local backend then decodes the request in its
    continuous batch and adds the vector to that request's rows itself (the same numbers as the hook)."""
    import torch

    v = torch.as_tensor(vector, dtype=torch.float32) * float(strength)

    def install(model: Any) -> Any:
        from persona_mw.logits import residual_hook

        return decoder_layers(model)[layer].register_forward_hook(residual_hook(v))

    install.residual = (layer, v)  # type: ignore[attr-defined]  # read by the backend's scheduler
    return install


class SteeringVectors:
    """Add the scope's CAA steering vector to the residual stream while generating."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        layer: int | None = Field(default=None, ge=0, description="decoder layer (default: ~40% of the depth)")
        strength: float = Field(default=4.0, ge=-50.0, le=50.0,
                                description="multiplier where no node in scope sets its own")
        learn_on_feedback: bool = Field(default=True,
                                        description="add each choice/edit event to the user's vector")
        mode: Literal["caa", "bipo"] = Field(default="caa", description="caa: running mean difference per "
                                             "event; bipo: a vector learned with BiPO's objective every "
                                             "`bipo_every` events (the lora plugin's training loop)")
        bipo_every: int = Field(default=20, ge=1, description="bipo: new events before the vector is retrained")
        bipo_lr: float = Field(default=1e-2, gt=0, description="bipo: AdamW learning rate")
        bipo_steps: int = Field(default=40, ge=1, description="bipo: optimizer steps per job")
        bipo_seconds: float | None = Field(default=60.0, gt=0, description="bipo: time budget of one job's loop")

    def __init__(self, config: Config | None = None, name: str = "vectors") -> None:
        self.config = config or self.Config()
        self.name = name
        self._middleware: Any = None

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        check_white_box(self, ctx, "vectors")
        self._middleware = ctx

    def _layer(self, backend: Any) -> int:
        if self.config.layer is not None:
            n = len(decoder_layers(backend.model))
            if self.config.layer >= n:
                raise PluginError(f"vectors: layer {self.config.layer} but the model has {n} layers",
                                  plugin=self.name, hook="persona_decoding")
            return self.config.layer
        return default_layer(backend.model)

    @hookimpl
    def persona_decoding(self, turn: Turn, backend: Any) -> Decoding | None:
        require_white_box(self, backend, "vectors")
        layer = self._layer(backend)
        vec, used = combined_vector(turn, getattr(backend, "model_name", getattr(backend, "name", "")), layer)
        if vec is None:
            turn.note("no steering vector in scope")
            return None
        strength = scope_value(turn, KEY, "strength", self.config.strength)
        norm = math.sqrt(sum(x * x for x in vec))
        turn.note(f"layer {layer}, strength {strength:.3g}, |v|={norm:.3g}, nodes "
                  + ", ".join(f"{k}:{w:.2f}" for k, w in used.items()))
        return Decoding(source=self.name, activation_hooks=[add_vector_hook(layer, vec, strength)],
                        meta={"layer": layer, "strength": strength, "nodes": used})

    @hookimpl
    async def persona_feedback(self, event: Feedback, store: Any) -> None:
        if not self.config.learn_on_feedback or self._middleware is None:
            return
        pairs = event_pairs([event])
        if not pairs:
            return
        backend = self._middleware.backend()
        if not hasattr(backend, "call"):
            return
        node = user_node(event.user)
        if self.config.mode == "bipo":
            await self._bipo_event(node, event, backend)
            return
        layer = self._layer(backend) if self.config.layer is not None else None
        await learn_pairs(self._middleware, node, pairs, layer=layer, backend=backend)

    async def _bipo_event(self, node: str, event: Feedback, backend: Any) -> None:
        """Count the event; every ``bipo_every`` events retrain the node's BiPO vector (a job)."""
        box: dict[str, int] = {}

        def count(prof: Any) -> None:
            st = dict(prof.extra.get(KEY) or {})
            st["pending"] = box["n"] = int(st.get("pending", 0)) + 1
            prof.extra[KEY] = st

        self._middleware.update_profile(node, count)
        if box["n"] >= self.config.bipo_every:
            self._middleware.schedule(self.train_bipo(node, event.user, backend))

    async def train_bipo(self, node: str, user: str, backend: Any) -> dict[str, Any]:
        """Learn ``node``'s vector with BiPO from the user's stored pairs (replaces the stored one)."""
        from persona_mw.plugins._lora import TrainSettings, train_bipo
        from persona_mw.plugins.lora import LEARN_KINDS, all_pairs

        events = self._middleware.store.list_feedback(user=user, kinds=LEARN_KINDS)
        pairs = all_pairs(events)
        if not pairs:
            return {}
        layer = self._layer(backend)
        s = TrainSettings(lr=self.config.bipo_lr, steps=self.config.bipo_steps, seconds=self.config.bipo_seconds)

        def fmt(p: str) -> str:
            return str(chat_texts(backend, p, [])[0])

        vec, stats = await backend.call(lambda m, t: train_bipo(m, t, fmt, pairs, layer, s))
        model_name = getattr(backend, "model_name", getattr(backend, "name", ""))
        state: dict[str, Any] = {}

        def store(prof: Any) -> None:
            prof.extra[KEY] = {"model": model_name, "layer": layer, "sum": vec, "n": 1, "method": "bipo",
                               "pending": 0, "events": len(events), "stats": stats}
            state.update(prof.extra[KEY])

        self._middleware.update_profile(node, store)
        return state
