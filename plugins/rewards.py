"""Built-in reward functions, registered by name for scoring plugins such as ``rerank``.

- ``style``: how well each candidate meets the style targets of every node in scope (stated
  preferences such as "one short sentence", "bullet points", "formal", plus learned targets a
  plugin keeps under ``Profile.extra["style_targets"]``); per node, in [0, 1].
- ``stated``: similarity to stated likes minus similarity to stated avoids ("no emojis" counts as
  an avoid); MiniLM cosine when ``persona_mw.embeddings`` is available, else lexical coverage of
  the statement's content words; per node, in [-1, 1].
- ``judge``: an LLM (role ``judge``, default the main backend) prompted with the user's persona
  and stated preferences, pointwise 1-10 (default) or pairwise in both orders; in [0, 1].
  Unparseable answers count as neutral and are named in the trace.

This module is registered at startup (``persona_mw.manager.DEFAULT_PLUGINS``) and imports nothing
heavy; the judge's backend and the embedding model load on first use.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
from typing import Any, Callable

from persona_mw import hookimpl
from persona_mw.nodes import most_specific_first
from persona_mw import text as _text
from persona_mw.types import Candidate, GenerationParams, Message, Turn

log = logging.getLogger("persona_mw.rewards")


def _scope_nodes(turn: Turn) -> list[str]:
    """The scope's node ids, most specific first (all profiles when there is no scope)."""
    if turn.scope is None:
        return list(turn.profiles)
    return [n.id for n in most_specific_first(turn.scope.nodes)]


# --------------------------------------------------------------------------------- style


def node_style_targets(turn: Turn) -> dict[str, dict[str, float]]:
    """Per node in scope: learned targets overlaid by stated ones (newest statement wins per key)."""
    out: dict[str, dict[str, float]] = {}
    for node in _scope_nodes(turn):
        prof = turn.profiles.get(node)
        if prof is None:
            continue
        targets: dict[str, float] = {}
        learned = prof.extra.get("style_targets")
        if isinstance(learned, dict):
            targets.update({k: float(v) for k, v in learned.items() if isinstance(v, (int, float))})
        for pref in sorted(prof.stated, key=lambda p: p.created_at):
            targets.update(_text.style_targets(pref.text, pref.polarity))
        if targets:
            out[node] = targets
    return out


def style_reward(turn: Turn, candidates: list[Candidate]) -> dict[str, list[float]] | list[float]:
    """Style fit per node in scope; zeros (no preference) when no node states a style."""
    feats = [_text.response_style(c.text) for c in candidates]
    per_node = {node: [round(_text.style_fit(f, t), 4) for f in feats] for node, t in node_style_targets(turn).items()}
    return per_node or [0.0] * len(candidates)


# --------------------------------------------------------------------------------- stated


def _embedder() -> Callable[[list[str]], Any] | None:
    """``texts -> unit vectors`` from ``persona_mw.embeddings`` if that module exists, else None."""
    if importlib.util.find_spec("persona_mw.embeddings") is None:
        return None
    from persona_mw import embeddings

    for attr in ("default_embedder", "get_embedder", "get_default"):
        factory = getattr(embeddings, attr, None)
        if callable(factory):
            emb = factory()
            fn = getattr(emb, "embed", None) or getattr(emb, "encode", None)
            if callable(fn):
                return fn  # type: ignore[no-any-return]
    return None


def _cosines(embed: Callable[[list[str]], Any], cands: list[str], stmts: list[str]) -> list[list[float]]:
    import numpy as np

    vecs = np.asarray(embed(cands + stmts), dtype=float)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    sims = vecs[: len(cands)] @ vecs[len(cands):].T
    return [[float(x) for x in row] for row in sims]


def stated_reward(turn: Turn, candidates: list[Candidate], options: dict[str, Any]) -> dict[str, list[float]] | list[float]:
    """Per node: mean similarity to its likes minus mean similarity to its avoids."""
    per_node_prefs: dict[str, list[tuple[str, str]]] = {}
    for node in _scope_nodes(turn):
        prof = turn.profiles.get(node)
        if prof and prof.stated:
            per_node_prefs[node] = [_text.polarity_of(p.text, p.polarity) for p in prof.stated]
    if not per_node_prefs:
        return [0.0] * len(candidates)
    texts = [c.text for c in candidates]
    stmts = sorted({core for prefs in per_node_prefs.values() for _, core in prefs})
    embed = _embedder() if options.get("embeddings", "auto") != "off" else None
    if embed is not None:
        sims = _cosines(embed, texts, stmts)
        turn.note("stated: MiniLM similarity")
    else:
        sims = [[_text.coverage(t, s) for s in stmts] for t in texts]
    col = {s: j for j, s in enumerate(stmts)}
    out: dict[str, list[float]] = {}
    for node, prefs in per_node_prefs.items():
        likes = [col[core] for pol, core in prefs if pol == "like"]
        avoids = [col[core] for pol, core in prefs if pol == "avoid"]
        row = []
        for i in range(len(texts)):
            like = sum(sims[i][j] for j in likes) / len(likes) if likes else 0.0
            avoid = sum(sims[i][j] for j in avoids) / len(avoids) if avoids else 0.0
            row.append(round(like - avoid, 4))
        out[node] = row
    return out


# --------------------------------------------------------------------------------- judge


def describe_user(turn: Turn, limit: int = 8) -> list[str]:
    """Persona statements and stated preferences of the scope's nodes, most specific first."""
    lines: list[str] = []
    for node in _scope_nodes(turn):
        prof = turn.profiles.get(node)
        if prof is None:
            continue
        lines += [f"- {p}" for p in reversed(prof.persona)]
        for pref in sorted(prof.stated, key=lambda p: -p.created_at):
            pol, core = _text.polarity_of(pref.text, pref.polarity)
            lines.append(f"- {'Avoids: ' if pol == 'avoid' else 'Wants: '}{' '.join(core.split())[:300]}")
    seen: set[str] = set()
    unique = [ln for ln in lines if not (ln.lower() in seen or seen.add(ln.lower()))]  # type: ignore[func-returns-value]
    return unique[:limit]


_JUDGE_SYSTEM = ("You judge how well an answer suits one particular user, given what is known about them. "
                 "Reply with the verdict only.")


def _request_text(turn: Turn, limit: int = 1500) -> str:
    msgs = turn.request.messages
    last = next((m.text for m in reversed(msgs) if m.role == "user"), "")
    return last[:limit]


def _pointwise_prompt(about: str, request: str, answer: str) -> list[Message]:
    return [Message(role="system", content=_JUDGE_SYSTEM), Message(role="user", content=(
        f"What we know about the user:\n{about}\n\nThe user's request:\n<<<{request}>>>\n\n"
        f"The answer:\n<<<{answer}>>>\n\nOn a scale from 1 (poor fit) to 10 (perfect fit), how well does "
        "this answer suit this user? Reply with one integer from 1 to 10."))]


def _pairwise_prompt(about: str, request: str, a: str, b: str) -> list[Message]:
    return [Message(role="system", content=_JUDGE_SYSTEM), Message(role="user", content=(
        f"What we know about the user:\n{about}\n\nThe user's request:\n<<<{request}>>>\n\n"
        f"Answer 1:\n<<<{a}>>>\n\nAnswer 2:\n<<<{b}>>>\n\n"
        "Which answer would this user choose? Reply with 1 or 2."))]


def parse_rating(text: str) -> int | None:
    """An integer 1-10 from a judge's reply ('8', 'Rating: 7/10', '**9**'), or None."""
    t = text.strip()
    m = re.search(r"\b(10|[1-9])\s*(?:/|out of)\s*10\b", t)
    if m:
        return int(m.group(1))
    # Ignore an echoed scale ("1 to 10", "1-10") before looking for the verdict.
    t = re.sub(r"\b1\s*(?:-|–|to)\s*10\b", " ", t)
    m = re.search(r"(?<![\d.])(10|[1-9])(?![\d.]\d)", t)
    return int(m.group(1)) if m else None


def parse_choice(text: str) -> int | None:
    """1 or 2 from a pairwise judge's reply ('2', 'Answer 1', 'the first one'), or None if unclear."""
    t = text.strip().lower()
    found = set(re.findall(r"(?<!\d)([12])(?!\d)", t))
    if "first" in t:
        found.add("1")
    if "second" in t:
        found.add("2")
    return int(found.pop()) if len(found) == 1 else None


async def _ask(backend: Any, prompts: list[list[Message]], max_tokens: int) -> list[str]:
    """Greedy answers to several prompts: one batch where the backend can, else concurrently."""
    params = GenerationParams(temperature=0.0, max_tokens=max_tokens)
    batch = getattr(backend, "generate_batch", None)
    if callable(batch) and len(prompts) > 1:
        got = await batch(prompts, params=params)
        return [c.text for c in sorted(got, key=lambda c: c.index)]
    outs = await asyncio.gather(*(backend.generate(p, n=1, params=params) for p in prompts))
    return [o[0].text if o else "" for o in outs]


async def judge_reward(turn: Turn, candidates: list[Candidate], backend_for: Callable[[str], Any],
                       options: dict[str, Any]) -> list[float]:
    """LLM-as-judge with the user's persona: pointwise (n calls, batched) or pairwise (both orders)."""
    mode = options.get("mode", "pointwise")
    if mode not in ("pointwise", "pairwise"):
        raise ValueError(f"judge: mode must be 'pointwise' or 'pairwise', not {mode!r}")
    backend = backend_for(str(options.get("role", "judge")))
    about = "\n".join(describe_user(turn)) or "- (nothing stated yet: judge general helpfulness)"
    request = _request_text(turn)
    limit = int(options.get("max_answer_chars", 1500))
    answers = [c.text[:limit] for c in candidates]
    n = len(answers)
    if mode == "pointwise":
        replies = await _ask(backend, [_pointwise_prompt(about, request, a) for a in answers],
                             int(options.get("max_tokens", 8)))
        scores, bad = [], []
        for i, reply in enumerate(replies):
            r = parse_rating(reply)
            if r is None:
                bad.append(f"{i}:{reply.strip()[:40]!r}")
            scores.append(0.5 if r is None else (r - 1) / 9)
        if bad:
            turn.note(f"judge: unparseable rating(s), scored neutral 0.5: {', '.join(bad)}")
        return [round(s, 4) for s in scores]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]  # both orders cancel position bias
    replies = await _ask(backend, [_pairwise_prompt(about, request, answers[i], answers[j]) for i, j in pairs],
                         int(options.get("max_tokens", 4)))
    wins = [0.0] * n
    bad = []
    for (i, j), reply in zip(pairs, replies):
        c = parse_choice(reply)
        if c is None:
            bad.append(f"{i}v{j}:{reply.strip()[:30]!r}")
            wins[i] += 0.5
            wins[j] += 0.5
        else:
            wins[i if c == 1 else j] += 1.0
    if bad:
        turn.note(f"judge: unparseable choice(s), counted as ties: {', '.join(bad)}")
    return [round(w / (2 * (n - 1)), 4) if n > 1 else 0.5 for w in wins]


BUILTIN_REWARDS: dict[str, Callable[..., Any]] = {
    "style": style_reward,
    "stated": stated_reward,
    "judge": judge_reward,
}


@hookimpl
def persona_register_rewards(register: Callable[[str, Callable[..., Any]], None]) -> None:
    for name, fn in BUILTIN_REWARDS.items():
        register(name, fn)


__all__ = ["BUILTIN_REWARDS", "describe_user", "judge_reward", "node_style_targets", "parse_choice",
           "parse_rating", "stated_reward", "style_reward"]
