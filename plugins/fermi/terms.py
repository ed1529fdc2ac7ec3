"""Bag-of-words features of recorded choices: the words that tell chosen answers from rejected
ones (keyword proposals) and the query vectors of FERMI's prompt retrieval."""

from __future__ import annotations

import math
from collections import Counter

from persona_mw import text as _text

from .scoring import Example

def _terms(text: str) -> list[str]:
    return [w for w in (t for t in _text.content_terms(text)) if w.isalpha() and len(w) > 2]


def _surface_forms(texts: list[str]) -> dict[str, str]:
    """Stem -> its most frequent lower-case word in ``texts`` (prompts show words, not stems like "manag")."""
    seen: dict[str, Counter[str]] = {}
    for text in texts:
        for w in _text.words(text):
            lw = w.lower()
            seen.setdefault(_text.content_stem(lw), Counter())[lw] += 1
    return {stem: c.most_common(1)[0][0] for stem, c in seen.items()}


def _vec(text: str) -> dict[str, float]:
    c = Counter(_terms(text))
    norm = math.sqrt(sum(v * v for v in c.values())) or 1.0
    return {k: v / norm for k, v in c.items()}


def _cos(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(k, 0.0) for k, v in a.items())


def distinctive_terms(examples: list[Example], k: int = 8, min_support: int = 2) -> tuple[list[str], list[str]]:
    """Words typical of chosen answers (vs rejected) and of rejected ones, by smoothed log-odds.

    ``min_support``: a word must occur in that many chosen (or rejected) answers; for a group the
    support is counted in distinct members, so no single member's words reach the group prompt.
    """
    chosen_df: Counter[str] = Counter()
    rejected_df: Counter[str] = Counter()
    support: dict[str, set[str]] = {}
    n_c = n_r = 0
    for ex in examples:
        n_c += 1
        for w in set(_terms(ex.chosen)):
            chosen_df[w] += 1
            support.setdefault(w, set()).add(ex.user or ex.id)
        for r in ex.rejected:
            n_r += 1
            for w in set(_terms(r)):
                rejected_df[w] += 1
    if not n_c or not n_r:
        return [], []
    by_member = any(ex.user for ex in examples) and len({ex.user for ex in examples}) > 1

    def odds(w: str) -> float:
        return math.log((chosen_df[w] + 0.5) / (n_c + 1)) - math.log((rejected_df[w] + 0.5) / (n_r + 1))

    def ok(w: str, df: Counter[str]) -> bool:
        return (len(support.get(w, ())) if by_member else df[w]) >= min_support

    likes = sorted((w for w in chosen_df if ok(w, chosen_df)), key=lambda w: (-odds(w), w))
    avoids = sorted((w for w in rejected_df if rejected_df[w] >= min_support), key=lambda w: (odds(w), w))
    likes = [w for w in likes if odds(w) > 0.3][:k]
    avoids = [w for w in avoids if odds(w) < -0.3][:k]
    shown = _surface_forms([t for ex in examples for t in (ex.chosen, *ex.rejected)])
    return [shown.get(w, w) for w in likes], [shown.get(w, w) for w in avoids]

