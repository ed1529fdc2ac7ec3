"""Response features for preference models: interpretable style metrics and hashed n-grams.

Everything here is offline and numpy-only (no textstat, no NLTK downloads):

- ``style_vector(text)``: the named, interpretable metrics of ``persona_mw.text.style_features``
  — length, reading level (a Flesch-Kincaid grade from our own syllable heuristic), formality
  cues, structure (lists, code, headings, paragraphs), in ``STYLE_NAMES`` order — each squashed
  to a small range by a fixed transform, so no corpus statistics are needed.
- ``NgramHasher``: signed feature hashing of word uni/bi-grams and character n-grams with
  sublinear term frequency and L2 normalization — a TF-IDF-like lexical/style view without a
  fitted vocabulary, so a profile's weight vector keeps its meaning across processes.
- ``Featurizer``: the concatenation ``[style | n-grams | embedding]`` the profile plugin uses,
  described by a ``FeatureSpec`` (stored with each fitted profile so scores stay consistent).

Embeddings come from ``persona_mw.embeddings`` and are only loaded when the spec asks for them.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from persona_mw.text import STYLE_NAMES, latin_words, style_features

# Fixed squashing per metric: (centre, scale) then tanh, so every value lands in (-1, 1).
_STYLE_SCALE: dict[str, tuple[float, float]] = {
    "log_words": (4.0, 1.5), "log_chars_per_word": (1.7, 0.3), "log_sentences": (1.5, 1.0),
    "words_per_sentence": (18.0, 10.0), "fk_grade": (10.0, 6.0), "long_word_ratio": (0.15, 0.15),
    "contraction_rate": (0.0, 0.03), "first_second_person_rate": (0.0, 0.05),
    "exclamation_rate": (0.0, 0.5), "question_rate": (0.0, 0.5), "casual_word_rate": (0.0, 0.02),
    "formal_connective_rate": (0.0, 0.02), "emoji_rate": (0.0, 0.5), "bullet_lines": (0.0, 4.0),
    "numbered_lines": (0.0, 4.0), "headings": (0.0, 2.0), "code_blocks": (0.0, 1.0),
    "inline_code": (0.0, 3.0), "paragraphs": (1.0, 3.0),
}


def style_vector(text: str) -> np.ndarray:
    """``style_features`` squashed to (-1, 1) in ``STYLE_NAMES`` order (float32)."""
    raw = style_features(text)
    out = np.empty(len(STYLE_NAMES), dtype=np.float32)
    for i, name in enumerate(STYLE_NAMES):
        c, s = _STYLE_SCALE[name]
        out[i] = math.tanh((raw[name] - c) / s)
    return out


def _h(token: str) -> int:
    return zlib.crc32(token.encode("utf-8"))


class NgramHasher:
    """Signed hashing of word n-grams and character n-grams into ``dim`` buckets.

    Counts are sublinear (1 + log tf), each family is L2-normalized separately and the two are
    averaged, so long and short texts are comparable. Deterministic across processes (crc32).
    """

    def __init__(self, dim: int = 4096, word_ngrams: tuple[int, int] = (1, 2),
                 char_ngrams: tuple[int, int] | None = (3, 5), lowercase: bool = True) -> None:
        if dim < 16:
            raise ValueError("NgramHasher.dim must be at least 16")
        self.dim = dim
        self.word_ngrams = word_ngrams
        self.char_ngrams = char_ngrams
        self.lowercase = lowercase

    def _bag(self, tokens: Sequence[str], out: np.ndarray) -> None:
        counts: dict[int, int] = {}
        for t in tokens:
            h = _h(t)
            counts[h] = counts.get(h, 0) + 1
        if not counts:
            return
        vec = np.zeros(self.dim, dtype=np.float32)
        for h, c in counts.items():
            vec[h % self.dim] += (1.0 + math.log(c)) * (1.0 if (h >> 31) & 1 else -1.0)
        norm = float(np.linalg.norm(vec))
        if norm > 0:
            out += vec / norm

    def transform_one(self, text: str) -> np.ndarray:
        t = text.lower() if self.lowercase else text
        out = np.zeros(self.dim, dtype=np.float32)
        ws = latin_words(t)
        lo, hi = self.word_ngrams
        toks: list[str] = []
        for n in range(lo, hi + 1):
            toks.extend("w" + " ".join(ws[i:i + n]) for i in range(len(ws) - n + 1))
        self._bag(toks, out)
        families = 1
        if self.char_ngrams:
            lo, hi = self.char_ngrams
            s = " ".join(t.split())
            ctoks = [s[i:i + n] for n in range(lo, hi + 1) for i in range(len(s) - n + 1)]
            self._bag(ctoks, out)
            families = 2
        return out / math.sqrt(families)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.transform_one(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


class FeatureSpec(BaseModel):
    """Which feature blocks a profile model uses, and how each is scaled."""

    model_config = ConfigDict(extra="forbid")

    style: bool = Field(default=True, description="interpretable style metrics (STYLE_NAMES)")
    style_scale: float = Field(default=0.5, ge=0.0, description="multiplier of the style block")
    ngram_dim: int = Field(default=4096, ge=0, le=1 << 18, description="hashed n-gram buckets (0 = off)")
    word_ngrams: tuple[int, int] = Field(default=(1, 2), description="word n-gram lengths hashed (min, max)")
    char_ngrams: tuple[int, int] | None = Field(
        default=(3, 5), description="character n-gram lengths hashed (min, max); null: none")
    ngram_scale: float = Field(default=1.0, ge=0.0, description="multiplier of the n-gram block")
    embedding: bool = Field(default=True, description="sentence embeddings from the embedder")
    embedding_scale: float = Field(default=1.0, ge=0.0, description="multiplier of the embedding block")
    lm: str | None = Field(
        default=None, description="a local model (a `persona-mw models` name or folder) whose hidden states at "
        "`lm_layer` are a feature block (persona_mw.hidden_features); null: no such block")
    lm_layer: int = Field(default=8, ge=1, description="which decoder layer's output (1 = the first)")
    lm_scale: float = Field(default=3.0, ge=0.0, description="multiplier of the hidden-state block")
    lm_max_tokens: int = Field(default=384, ge=8, le=8192, description="tokens of a response read (the rest cut)")

    def key(self) -> str:
        """A short fingerprint stored with fitted profiles (weights are only valid for one spec).

        Without an ``lm`` block the ``lm_*`` fields are left out, so the profiles fitted before
        they existed keep their key."""
        exclude = {"lm", "lm_layer", "lm_scale", "lm_max_tokens"} if self.lm is None else None
        return f"{zlib.crc32(self.model_dump_json(exclude=exclude).encode()):08x}"


class Featurizer:
    """Texts -> feature matrix ``[style | n-grams | embedding | lm]`` with an in-process LRU cache."""

    def __init__(self, spec: FeatureSpec | None = None, embedder: Any = None, cache_size: int = 20000) -> None:
        self.spec = spec or FeatureSpec()
        self._embedder = embedder
        self.hasher = (NgramHasher(self.spec.ngram_dim, self.spec.word_ngrams, self.spec.char_ngrams)
                       if self.spec.ngram_dim else None)
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    @property
    def embedder(self) -> Any:
        if self._embedder is None and self.spec.embedding:
            from persona_mw.embeddings import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    @property
    def dim(self) -> int:
        d = len(STYLE_NAMES) if self.spec.style else 0
        d += self.spec.ngram_dim
        if self.spec.embedding:
            d += int(self.embedder.dim)
        if self.spec.lm:
            d += self.hidden.dim
        return d

    @property
    def hidden(self) -> Any:
        """The ``lm`` block's encoder (``persona_mw.hidden_features``), loaded on first use."""
        from persona_mw.hidden_features import hidden_encoder

        assert self.spec.lm is not None
        return hidden_encoder(self.spec.lm, self.spec.lm_layer, self.spec.lm_max_tokens)

    def _lexical(self, text: str) -> np.ndarray:
        parts = []
        if self.spec.style:
            parts.append(style_vector(text) * self.spec.style_scale)
        if self.hasher is not None:
            parts.append(self.hasher.transform_one(text) * self.spec.ngram_scale)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text (float32). Repeated texts are served from the cache."""
        from persona_mw.embeddings import current_cache_scope

        scope = current_cache_scope()  # one party's cached rows are not another's (fast) hits
        texts = list(texts)
        missing = [t for t in dict.fromkeys(texts) if (scope, t) not in self._cache]
        if missing:
            lex = [self._lexical(t) for t in missing]
            blocks: list[Any] = [lex]
            if self.spec.embedding:
                blocks.append(np.asarray(self.embedder.embed(missing), dtype=np.float32) * self.spec.embedding_scale)
            if self.spec.lm:
                blocks.append(self.hidden.encode(missing) * self.spec.lm_scale)
            rows = [np.concatenate(parts) for parts in zip(*blocks)] if len(blocks) > 1 else lex
            for t, r in zip(missing, rows):
                self._cache[(scope, t)] = r.astype(np.float32, copy=False)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for t in texts:
            row = self._cache.get((scope, t))
            if row is None:  # evicted between fill and read (tiny cache): recompute
                row = self.transform([t])[0]
            else:
                self._cache.move_to_end((scope, t))
            out.append(row)
        return np.stack(out)


__all__ = ["FeatureSpec", "Featurizer", "NgramHasher", "style_vector"]
