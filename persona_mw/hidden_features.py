"""Response features from a local language model's hidden states (the profile's optional ``lm`` block).

A sentence embedder such as MiniLM is trained to place texts by *what they say*; two answers to one
question land close together whatever their register. A choice-based profile mostly has to tell
*how* an answer is written (a business reader's answer from an academic's, a storyteller's from a
plain one) on questions it has never seen. The middle layers of a decoder carry that register:
on the DSP dev slice (5 answers per question, one per domain, the right one to be picked for a new
question) a linear Bradley-Terry model on the mean layer-8 state of SmolLM2-135M picked the domain's
answer 0.58 of the time from pooled choices, where style + n-grams + MiniLM reached 0.51 (see
``docs/notes/lm-features.md``).

``HiddenStateEncoder(model, layer)``: the model's first ``layer`` decoder layers only (loaded as a
private, truncated copy: the serving model is never touched; an 8-layer copy of SmolLM2-135M holds
0.23 GB and runs about a quarter of the model's layers, with no LM head), the mean over tokens of the last one's output (before any norm),
then each row standardized over its own dimensions and clipped to +-3 (the few "massive activation"
dimensions of a decoder would otherwise be the whole vector), L2-normalized. No corpus statistics:
a row depends on its text alone, so a fitted profile keeps its meaning across processes.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

import numpy as np

from persona_mw.errors import PersonaError

_encoders: dict[tuple[str, int, int], HiddenStateEncoder] = {}
_guard = threading.Lock()


class HiddenStateEncoder:
    """Texts -> (n, hidden size) float32 rows from a local model's layer ``layer`` (1-based)."""

    def __init__(self, model: str, layer: int, max_tokens: int = 384, batch_size: int = 8) -> None:
        if layer < 1:
            raise ValueError("layer counts decoder layers from 1")
        self.model_name = model
        self.layer = layer
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._parts: tuple[Any, Any] | None = None
        self._lock = threading.Lock()
        self._dim: int | None = None

    def _path(self) -> Any:
        from persona_mw.errors import ModelNotFound
        from persona_mw.models import resolve

        try:
            return resolve(self.model_name)
        except ModelNotFound as exc:
            raise PersonaError(f"profile features: local model {self.model_name!r} not found",
                               hint="features.lm names a model of `persona-mw models` or a local folder") from exc

    @property
    def dim(self) -> int:
        """The model's hidden size (read from its config: no weights loaded)."""
        if self._dim is None:
            cfg = json.loads((self._path() / "config.json").read_text(encoding="utf-8"))
            self._dim = int(cfg["hidden_size"])
        return self._dim

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._parts is None:
                from persona_mw.models import _require_local

                try:
                    _require_local()
                except ImportError as exc:
                    raise PersonaError(f"profile features: {exc}", hint="pip install 'persona-mw[local]'") from exc
                import torch
                from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
                from transformers.utils import logging as hf_logging

                path = self._path()
                cfg = AutoConfig.from_pretrained(str(path))
                if self.layer > int(cfg.num_hidden_layers):
                    raise PersonaError(f"profile features: lm_layer {self.layer} > the {cfg.num_hidden_layers} "
                                       f"layers of {self.model_name!r}")
                cfg.num_hidden_layers = self.layer
                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # untyped in transformers; the unused deeper layers' weights are expected
                bars = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers
                try:
                    tok = AutoTokenizer.from_pretrained(str(path))
                    # the causal-LM class: checkpoints with tied embeddings store them once, as the LM head
                    model = AutoModelForCausalLM.from_pretrained(str(path), config=cfg, dtype=torch.float32).model
                finally:
                    hf_logging.set_verbosity(verbosity)
                    if bars:
                        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers
                model.norm = torch.nn.Identity()  # the layer's own output, as hidden_states[layer]
                model.eval()
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                tok.padding_side = "right"  # causal: right pads change no real token's state
                self._parts = (model, tok)
                self._dim = int(cfg.hidden_size)
        return self._parts

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        import torch

        model, tok = self._load()
        out = np.zeros((len(texts), self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = tok([texts[i] or " " for i in idx], return_tensors="pt", padding=True, truncation=True,
                            max_length=self.max_tokens)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[idx] = mean.float().numpy()
        return standardize_rows(out)


def standardize_rows(x: np.ndarray) -> np.ndarray:
    """Each row centred and scaled over its own dimensions, clipped to +-3, L2-normalized."""
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.maximum(x.std(axis=1, keepdims=True), 1e-6)
    x = np.clip(x, -3.0, 3.0)
    out: np.ndarray = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)).astype(np.float32)
    return out


def hidden_encoder(model: str, layer: int, max_tokens: int = 384) -> HiddenStateEncoder:
    """One shared encoder per (model, layer, max_tokens) in this process (it holds no per-party cache)."""
    key = (model, layer, max_tokens)
    with _guard:
        enc = _encoders.get(key)
        if enc is None:
            enc = _encoders[key] = HiddenStateEncoder(model, layer, max_tokens)
        return enc


__all__ = ["HiddenStateEncoder", "hidden_encoder", "standardize_rows"]
