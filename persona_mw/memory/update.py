"""Update logic: does a new candidate add a memory, merge into one, or supersede one?

- merge: the same memory said again (cosine >= ``dup_cosine``, or lexical overlap >= ``dup_lexical``
  without an embedder) with the same polarity: provenance and mention count grow, nothing is added.
- supersede: a preference about the same thing with the opposite sign ("I love sushi" -> "I don't eat
  sushi any more"), or a one-value fact about the same slot (where the user lives, their budget): the
  newer wins, the older stays in the store as history with ``superseded_by`` set.
- add: anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from persona_mw.memory.index import tokenize
from persona_mw.types import Memory

Action = Literal["add", "merge", "supersede"]

# Words that carry the polarity, not the object of a preference ("I really don't like X" -> {X}).
_PREF_WORDS = set(tokenize(
    "like likes liked love loves loved enjoy enjoys prefer prefers preferred hate hates dislike dislikes avoid "
    "avoids never really anymore any more longer strongly absolutely totally fan fond into want eat eats drink "
    "drinks stand can't cannot won't will strictly must usually generally always also favorite favourite "
    "sounds good great perfect actually now lately these days nope please"))


def terms(text: str) -> set[str]:
    return set(tokenize(text))


def target_terms(text: str) -> set[str]:
    """The object of a preference: its content words minus the polarity vocabulary."""
    return terms(text) - _PREF_WORDS


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def sign(polarity: str | None) -> int:
    return 1 if polarity == "like" else (-1 if polarity in ("avoid", "constraint") else 0)


@dataclass
class Decision:
    action: Action
    target: Memory | None = None
    similarity: float = 0.0


def decide(kind: str, polarity: str | None, text: str, slot: str | None, vector: np.ndarray | None,
           existing: Sequence[Memory], vectors: dict[str, np.ndarray], *, dup_cosine: float = 0.9,
           dup_lexical: float = 0.8, contra_cosine: float = 0.75, contra_target: float = 0.5) -> Decision:
    """Compare a candidate with the owner's active memories (``vectors``: id -> unit vector)."""
    cand_terms = terms(text)
    cand_target = target_terms(text)
    best: Decision = Decision("add")
    for mem in existing:
        v = vectors.get(mem.id)
        cos = float(v @ vector) if (v is not None and vector is not None) else None
        lex = jaccard(cand_terms, terms(mem.text))
        same_text = mem.text.strip().lower() == text.strip().lower()
        if kind == "fact" and slot and mem.kind == "fact" and mem.meta.get("slot") == slot:
            dup = same_text or (cos is not None and cos >= dup_cosine) or (cos is None and lex >= dup_lexical)
            return Decision("merge" if dup else "supersede", mem, cos if cos is not None else lex)
        if mem.kind != kind:
            continue
        if kind == "preference" and sign(mem.polarity) != sign(polarity) and sign(polarity) != 0:
            tj = jaccard(cand_target, target_terms(mem.text))
            if tj >= contra_target or (cos is not None and cos >= contra_cosine and tj > 0):
                return Decision("supersede", mem, tj)
            continue
        dup = same_text or (cos is not None and cos >= dup_cosine) or (cos is None and lex >= dup_lexical)
        if dup:
            sim = 1.0 if same_text else (cos if cos is not None else lex)
            if best.action != "merge" or sim > best.similarity:
                best = Decision("merge", mem, sim)
    return best


__all__ = ["Decision", "decide", "jaccard", "sign", "target_terms", "terms"]
