"""Expert logit arithmetic: DeRa / EFT / proxy-tuning / MOD (ALGORITHMS.md §7.1-7.4, §10).

``z = s_base + sum_i w_i (s_expert_i - s_anti_i)`` per step. An expert (and its anti-expert) is a
model plus an optional system prompt:

- on the main model (``model`` unset) it is an extra prompt stream, decoded in the same batch as
  the answer with its own KV cache (a "prompt expert": e.g. one per preference dimension gives
  MOD-style mixing with per-user weights);
- on another local model it runs beside the base with its own KV cache, one forward per step,
  fed the answer's token ids -- so it must share the base's vocabulary: a pair whose vocabularies
  differ is refused with an error naming both (equal up to trailing added tokens is accepted, and
  the logits are sliced to the shared part, as proxy-tuning and MOD do).

Weights per user: ``Profile.extra["experts"]["weights"][name]`` on the scope's nodes, combined with
the scope's weights; the expert's ``weight`` where no node sets one. LoRA adapters mixed at the logits
are the ``lora`` plugin's ``mixing: logits`` (the same prompt streams, each with its node's adapter:
``Decoding.stream_adapters``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.errors import ConfigError, PluginError
from persona_mw.types import Decoding, Message, Turn
from persona_mw.plugins._steering import check_white_box, require_white_box

KEY = "experts"


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="unique name (per-user weights refer to it)")
    model: str | None = Field(default=None, description="registry name or path; unset: the main model")
    system: str | None = Field(default=None, description="system prompt the expert sees")
    anti_model: str | None = Field(default=None, description="anti-expert model; unset: the expert's model")
    anti_system: str | None = Field(default=None, description="system prompt of the anti-expert (unset: none)")
    weight: float = Field(default=1.0, ge=-20.0, le=20.0,
                          description="w_i in s_base + sum_i w_i (s_expert_i - s_anti_i), where no node sets its own")


def vocab_overlap(tok_a: Any, tok_b: Any, name_a: str = "a", name_b: str = "b") -> int:
    """The number of shared leading token ids, or a PluginError when the vocabularies differ.

    Equal vocabularies, or equal up to tokens added at the end of one of them, share ids
    ``0 .. n-1``; anything else (a different tokenizer) cannot be mixed token by token.
    """
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    ia = {i: t for t, i in va.items()}
    ib = {i: t for t, i in vb.items()}
    n = min(len(ia), len(ib))
    mismatched = [i for i in range(n) if ia.get(i) != ib.get(i)]
    if mismatched:
        i = mismatched[0]
        raise PluginError(
            f"experts: {name_a!r} and {name_b!r} do not share a vocabulary ({len(va)} vs {len(vb)} tokens; "
            f"{len(mismatched)} of the first {n} ids differ, e.g. id {i} is {ia.get(i)!r} vs {ib.get(i)!r}), "
            "so their next-token scores cannot be combined",
            plugin="experts",
            hint="use experts from the same model family (same tokenizer), or rerank whole answers instead",
        )
    return n


class _ModelStream:
    """A logits processor running another local model beside the base, with its own KV cache."""

    def __init__(self, model: Any, tok: Any, fmt: Any, messages: list[Message], system: str | None,
                 vocab: int) -> None:
        self.model, self.tok, self.fmt = model, tok, fmt
        msgs = [m for m in messages if m.role != "system"]
        self.messages = ([Message(role="system", content=system)] if system else []) + msgs
        self.vocab = vocab
        self.cache: Any = None
        self.seen = 0
        self.mask: Any = None

    def logits(self, input_ids: Any, prompt_len: int) -> Any:
        import torch
        from transformers import DynamicCache

        rows = input_ids.shape[0]
        gen = input_ids[:, prompt_len:]
        with torch.inference_mode():
            if self.cache is None:
                special = not getattr(self.tok, "chat_template", None)
                ids = self.tok(self.fmt(self.messages), return_tensors="pt", add_special_tokens=special)["input_ids"]
                ids = torch.cat([ids.expand(rows, -1), gen], dim=1)
                self.cache = DynamicCache(config=self.model.config)
                self.mask = torch.ones_like(ids)
                step = ids
            else:
                step = gen[:, self.seen:]
                self.mask = torch.cat([self.mask, torch.ones_like(step)], dim=1)
            self.seen = gen.shape[1]
            out = self.model(input_ids=step, attention_mask=self.mask, cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1, : self.vocab].to(torch.float32)


class Experts:
    """Decode ``s_base + sum_i w_i (s_expert_i - s_anti_i)`` with per-user weights."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        experts: list[ExpertSpec] = Field(min_length=1, description="the experts (a prompt or another local model each)")

    def __init__(self, config: Config, name: str = "experts") -> None:
        self.config = config
        self.name = name
        self._models: dict[str, tuple[Any, Any, Any, int]] = {}
        self._ctx: PluginContext | None = None

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        check_white_box(self, ctx, "experts")
        self._ctx = ctx
        names = [e.name for e in self.config.experts]
        if len(set(names)) != len(names):
            raise ConfigError(f"plugin {self.name!r}: expert names must be unique, got {names}")

    def _other(self, backend: Any, name: str) -> tuple[Any, Any, Any, int]:
        """(model, tokenizer, prompt formatter, shared vocab size) of another local model."""
        if name not in self._models:
            if self._ctx is None:
                raise PluginError(f"plugin {self.name!r} was not started (persona_startup did not run)",
                                  plugin=self.name, hook="persona_decoding")
            other = self._ctx.local_model(name)  # the backend registry builds and owns it
            n = vocab_overlap(backend.tokenizer, other.tokenizer, getattr(backend, "model_name", "base"), name)
            self._models[name] = (other.model, other.tokenizer, other.format_prompt, n)
        model, tok, fmt, n = self._models[name]
        return model, tok, fmt, n

    def _weights(self, turn: Turn) -> dict[str, float]:
        out = {}
        for e in self.config.experts:
            total = wsum = 0.0
            for node in (turn.scope.nodes if turn.scope else []):
                prof = turn.profiles.get(node.id)
                raw = ((prof.extra.get(KEY) or {}).get("weights") or {}).get(e.name) if prof else None
                total += node.weight * (float(raw) if isinstance(raw, (int, float)) else e.weight)
                wsum += node.weight
            out[e.name] = total / wsum if wsum > 0 else e.weight
        return out

    @hookimpl
    def persona_decoding(self, turn: Turn, backend: Any) -> Decoding | None:
        require_white_box(self, backend, "experts")
        weights = self._weights(turn)
        base = [m for m in turn.messages if m.role != "system"]
        system = [m for m in turn.messages if m.role == "system"]
        streams: list[list[Message]] = []
        plan: list[tuple[float, Any, Any]] = []  # (w, expert source, anti source); int = stream index
        vocab = backend.model.config.vocab_size
        for e in self.config.experts:
            w = weights[e.name]

            def source(model: str | None, sys_text: str | None) -> Any:
                msgs = ([Message(role="system", content=sys_text)] if sys_text else system) + base
                if model is None or model == getattr(backend, "model_name", None):
                    if msgs == turn.messages:
                        return -1  # the answer's own prompt: its row, no extra stream
                    if msgs in streams:
                        return streams.index(msgs)  # one row per distinct prompt
                    streams.append(msgs)
                    return len(streams) - 1
                m, tok, fmt, n = self._other(backend, model)
                return _ModelStream(m, tok, fmt, msgs, sys_text, n)

            plan.append((w, source(e.model, e.system), source(e.anti_model or e.model, e.anti_system)))
        turn.note(", ".join(f"{k}: w={v:.3g}" for k, v in weights.items())
                  + f"; {len(streams)} prompt stream(s), "
                  + f"{sum(1 for _, a, b in plan for s in (a, b) if not isinstance(s, int))} model stream(s)")
        if any(not isinstance(s, int) for _, a, b in plan for s in (a, b)):
            # Model experts need the answer's token ids: a logits processor sees them; it runs the
            # other models and adds their deltas (same formula, applied after the prompt streams).
            prompt_ids_len: dict[str, int] = {}

            def model_delta(input_ids: Any, scores: Any) -> Any:
                p = prompt_ids_len.setdefault("p", input_ids.shape[1])
                out = scores
                for w, ex, anti in plan:
                    if isinstance(ex, int) and isinstance(anti, int):
                        continue
                    if isinstance(ex, int) or isinstance(anti, int):
                        raise PluginError("experts: an expert and its anti-expert must both be on the main model "
                                          "or both on other models", plugin=self.name)
                    out = out + w * (_pad_to(ex.logits(input_ids, p), vocab) - _pad_to(anti.logits(input_ids, p), vocab))
                return out

            prompt_plan = [(w, a, b) for w, a, b in plan if isinstance(a, int) and isinstance(b, int)]
            return Decoding(source=self.name, streams=streams,
                            combine=_prompt_combine(prompt_plan) if prompt_plan else None,
                            logits_processors=[model_delta], meta={"weights": weights})
        return Decoding(source=self.name, streams=streams, combine=_prompt_combine(plan), meta={"weights": weights})


def _prompt_combine(plan: list[tuple[float, Any, Any]]) -> Any:
    def combine(main: Any, scores: Any) -> Any:
        def row(i: int) -> Any:
            return main if i == -1 else scores[:, i, :]

        out = main.clone()
        for w, ex, anti in plan:
            out = out + w * (row(ex) - row(anti))
        return out

    return combine


def _pad_to(logits: Any, vocab: int) -> Any:
    """Expert logits on the shared ids; ids only the base has get no delta (0)."""
    import torch

    if logits.shape[-1] >= vocab:
        return logits[:, :vocab]
    pad = torch.zeros((logits.shape[0], vocab - logits.shape[-1]), dtype=logits.dtype)
    return torch.cat([logits, pad], dim=1)


def set_weights(middleware: Any, node: str, weights: dict[str, float]) -> None:
    """Per-node expert weights (``{expert_name: w}``), overriding the config's."""
    def change(prof: Any) -> None:
        prof.extra.setdefault(KEY, {}).setdefault("weights", {}).update({k: float(v) for k, v in weights.items()})

    middleware.update_profile(node, change)
