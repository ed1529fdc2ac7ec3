"""FERMI-style per-node prompt optimization (Kim & Yang 2025), online from the user's choices.

Every user (and user-in-context, and group) node keeps a *memory* of candidate prompts: each with
its score on the node's recorded choices, per-example margins, and the mis-aligned examples it got
wrong. After ``choice``/``edit`` feedback a background job (``Middleware.schedule``, bounded by a
``job_budget``) proposes new candidates and scores them the same way; a candidate replaces the
current prompt only if its score beats the current one's on the same examples.

Proposals come from two sources:

- deterministic (no model call): the persona prompt (stated preferences + persona statements), the
  words that distinguish the user's chosen answers from the rejected ones, length/structure
  preferences, the opening of a typical chosen answer (user nodes only), and a fix of the best
  prompt from the words of its mis-aligned examples;
- an optimizer LLM (role ``optimizer``, default the main backend), shown the memory (prompts with
  scores, mis-aligned examples, stated preferences) through our own meta-prompt. Each call spends
  from the job's budget; a failing or slow optimizer is recorded and the job goes on.

Scoring (``Score``): on a white-box backend (local transformers), for every recorded choice
``(query, chosen, rejected[])`` the mean per-token log-likelihood of each answer given the prompt
placed as at request time; ``margin`` = mean over rejected of ``lp(chosen) - lp(rejected)`` and
``accuracy`` = share of rejected answers below the chosen one. Batched, with the shared prefix's
KV cache reused. On black-box backends a judge (role ``judge``) compares chosen and rejected under
the prompt in both orders (+1 / 0 / -1 per pair), each call from the job's budget.

At request time (``persona_rewrite``) the plugin retrieves the node's recorded queries most similar
to the new one (bag of words, cosine) and uses the memory prompt with the best margin on them
(FERMI's retrieval of prompts), else the node's best prompt; user and group prompts are combined
by the scope's weights. The trace says which prompt, of which node, and why.

State: ``Profile.extra[<name>]`` (memory, history, errors) and ``Profile.prompt`` (the current
best), so it is persisted, exported and forgotten with the node. Group memories keep no member
texts (only prompts, scores and per-event margins); their word lists need support from two members.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.budget import DEFAULT_CALLS_PER_JOB, AuxBudget, BudgetExceeded, job_budget
from persona_mw.nodes import is_group, kind_of, name_of, scope_node, user_node, user_of
from persona_mw.placement import Placement, place_block
from persona_mw import text as _text
from persona_mw.types import GenerationParams, Message, Profile, Turn

log = logging.getLogger("persona_mw.fermi")


_OPT_SYSTEM = ("You write short instructions that tell an assistant how to answer one particular user. "
               "Reply with the improved instruction only: one to three sentences in the first person "
               "(\"I ...\"), no preamble, no quotes, no lists.")
_LEFTOVER = re.compile(r"<<<|>>>|<\|[^>]*\|>|\[/?INST\]|```|https?://|ignore (?:all |the )?(?:previous|above)|"
                       r"\[score|\baccuracy \d|\bno instruction\b|"
                       r"^\s*(?:system|assistant|user)\s*:", re.IGNORECASE | re.MULTILINE)
# Generic style instructions scored as candidates (``styles`` in the config replaces them): the
# common axes along which people's preferences differ (length, reading level, tone, register,
# framing, format). The scorer keeps the ones the user's own choices support.
STYLE_LIBRARY: tuple[str, ...] = (
    "I like short, concise answers.",
    "I like detailed, thorough answers.",
    "I like plain, simple words, as if explained to a beginner.",
    "I like expert-level, technical answers.",
    "I like a warm, friendly tone.",
    "I like playful, humorous, fun answers.",
    "I like a formal, professional tone.",
    "I like scholarly, academic answers that explain the evidence.",
    "I like practical, business-minded answers focused on results.",
    "I like poetic, vivid, descriptive language.",
    "I like answers told as a story.",
    "I like step-by-step answers with lists.",
    "I like neutral, objective, balanced answers.",
    "I like enthusiastic, energetic answers.",
    "I like answers with concrete examples.",
)
_LABEL = re.compile(r"^\s*(?:improved |new |better )?(?:instruction|prompt|answer|output)s?\s*:\s*", re.IGNORECASE)


# --------------------------------------------------------------------------------------- data


@dataclass
class Example:
    """One recorded choice: the user preferred ``chosen`` over each of ``rejected`` for ``query``."""

    id: str
    query: str
    chosen: str
    rejected: list[str]
    user: str = ""


@dataclass
class Score:
    """A prompt's result on examples: per example (margin, accuracy)."""

    per_example: dict[str, tuple[float, float]] = field(default_factory=dict)

    def on(self, ids: list[str] | None = None) -> tuple[float, float, int]:
        keys = [i for i in (ids if ids is not None else list(self.per_example)) if i in self.per_example]
        if not keys:
            return 0.0, 0.0, 0
        m = sum(self.per_example[k][0] for k in keys) / len(keys)
        a = sum(self.per_example[k][1] for k in keys) / len(keys)
        return m, a, len(keys)


def place(messages: list[Message], prompt: str, placement: Placement) -> list[Message]:
    """Put ``prompt`` into the conversation: before the last user message (bare), after it (in
    parentheses), or in the system message (``persona_mw.placement.place_block``)."""
    return place_block(messages, prompt, placement,
                       user_format="{block}\n\n{text}" if placement == "user_prefix" else None)


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


def cache_key(prompt: str) -> str:
    """The key of a prompt's per-choice scores in a node's ``cache``."""
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def paired_z(a: dict[str, Any], b: dict[str, Any], ids: list[str]) -> tuple[float, int]:
    """Mean per-choice margin difference of memory entries ``a`` minus ``b`` over the choices both were
    scored on (neither's excluded ones), in standard errors; +/-inf when the differences do not vary."""
    pa, pb = a.get("per_example", {}), b.get("per_example", {})
    held = set(a.get("exclude", ())) | set(b.get("exclude", ()))
    d = [pa[i][0] - pb[i][0] for i in ids if i in pa and i in pb and i not in held]
    n = len(d)
    if not n:
        return 0.0, 0
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    if var <= 1e-18:
        return (math.inf if mean > 0 else -math.inf if mean < 0 else 0.0), n
    return mean / math.sqrt(var / n), n


# --------------------------------------------------------------------------------------- scorers


class WhiteBoxScorer:
    """Log-likelihood margins of chosen over rejected answers under the prompt (local backend)."""

    kind = "whitebox"

    def __init__(self, backend: Any, placement: Placement, max_response_tokens: int = 32, batch_rows: int = 16):
        self.backend, self.placement = backend, placement
        self.max_response_tokens, self.batch_rows = max_response_tokens, batch_rows

    def contexts(self, prompt: str, examples: list[Example]) -> list[str]:
        return [self.backend.format_prompt(place([Message(role="user", content=ex.query)], prompt, self.placement))
                for ex in examples]

    async def score(self, prompt: str, examples: list[Example], budget: AuxBudget | None = None) -> Score:
        from persona_mw.plugins._fermi_score import response_logprobs

        if not examples:
            return Score()
        ctx = self.contexts(prompt, examples)
        resps = [[ex.chosen, *ex.rejected] for ex in examples]
        lps = await self.backend.call(lambda m, t: response_logprobs(
            m, t, ctx, resps, max_response_tokens=self.max_response_tokens, batch_rows=self.batch_rows))
        out = Score()
        for ex, lp in zip(examples, lps):
            diffs = [lp[0] - r for r in lp[1:]]
            out.per_example[ex.id] = (sum(diffs) / len(diffs), sum(d > 0 for d in diffs) / len(diffs))
        return out


class JudgeScorer:
    """A judge LLM compares chosen and rejected under the prompt, in both orders (black-box backends)."""

    kind = "judge"

    def __init__(self, backend: Any, plugin: str, max_pairs: int = 8, timeout: float | None = 30.0):
        self.backend, self.plugin, self.max_pairs, self.timeout = backend, plugin, max_pairs, timeout

    @staticmethod
    def messages(prompt: str, query: str, a: str, b: str) -> list[Message]:
        return [
            Message(role="system", content="You judge which of two answers suits a user better. Reply with one letter: A or B."),
            Message(role="user", content=(
                f"The user's instructions:\n<<<{prompt or '(none)'}>>>\n\nThe user asked:\n<<<{query[:600]}>>>\n\n"
                f"Answer A:\n<<<{a[:800]}>>>\n\nAnswer B:\n<<<{b[:800]}>>>\n\n"
                "Which answer follows the user's instructions better? Reply A or B.")),
        ]

    @staticmethod
    def verdict(text: str) -> str | None:
        m = re.search(r"\b([AB])\b", text.strip()[:40])
        return m.group(1) if m else None

    async def score(self, prompt: str, examples: list[Example], budget: AuxBudget | None = None) -> Score:
        budget = budget or job_budget()
        out = Score()
        for ex in examples[-self.max_pairs:]:
            rej = ex.rejected[0]
            votes = 0.0
            for a, b, chosen_letter in ((ex.chosen, rej, "A"), (rej, ex.chosen, "B")):
                msgs = self.messages(prompt, ex.query, a, b)
                cands = await budget.call("judge", self.plugin, lambda m=msgs: self.backend.generate(
                    m, n=1, params=GenerationParams(temperature=0.0, max_tokens=4)), timeout=self.timeout)
                v = self.verdict(cands[0].text if cands else "")
                votes += 0.0 if v is None else (0.5 if v == chosen_letter else -0.5)
            out.per_example[ex.id] = (votes, 1.0 if votes > 0 else (0.5 if votes == 0 else 0.0))
        return out


# --------------------------------------------------------------------------------------- plugin


class Fermi:
    """Per-node prompts optimized online from choices; the best one for the query goes into the prompt."""

    # Feedback kinds this plugin uses (Middleware warns about events no configured plugin uses).
    feedback_kinds = ("choice", "edit", "stated")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        placement: Placement = Field(
            default="user_prefix",
            description="where the prompt goes (the 135M local model heeds the user turn, not the system message)")
        optimizer_role: str = Field(default="optimizer", description="roles: entry of the optimizer LLM")
        judge_role: str = Field(default="judge", description="roles: entry of the judge (black-box scoring)")
        scorer: Literal["auto", "whitebox", "judge"] = Field(
            default="auto", description="auto: white-box on a local transformers backend, else the judge")
        background: bool = Field(default=True, description="optimize off the feedback path")
        every: int = Field(default=1, ge=1, description="optimize after every k-th choice/edit of a node")
        optimizer_calls: int = Field(default=2, ge=0, le=64, description="optimizer proposals per job")
        max_aux_calls: int | None = Field(
            default=None, ge=0, le=1000,
            description="job budget: optimizer + judge calls (default: the config's budget.aux_calls_per_job)")
        job_seconds: float | None = Field(default=120.0, gt=0, description="job budget: wall-clock seconds")
        optimizer_timeout: float = Field(default=30.0, gt=0, description="seconds per optimizer call")
        optimizer_max_tokens: int = Field(default=80, ge=8, le=1024, description="new tokens per optimizer proposal")
        max_examples: int = Field(default=32, ge=1, le=1000, description="newest choices a node is scored on")
        max_rejected: int = Field(default=4, ge=1, le=16, description="rejected answers per choice scored")
        max_response_tokens: int = Field(default=32, ge=4, le=1024, description="answer tokens scored (white-box)")
        judge_pairs: int = Field(default=6, ge=1, le=100, description="choices a judge scores per prompt")
        memory_size: int = Field(default=8, ge=2, le=64, description="prompts kept per node")
        min_gain: float = Field(default=0.0, ge=0.0, description="a new prompt must beat the current by more")
        min_z: float = Field(
            default=1.64, ge=0.0, le=10.0,
            description="a new prompt must beat the current (first: the persona prompt) by this many paired "
                        "standard errors over the same choices (1.64: one-sided 5%; 0: any gain)")
        retrieve_k: int = Field(default=5, ge=0, le=100, description="similar recorded queries (0: node's best only)")
        min_similarity: float = Field(default=0.1, ge=0.0, le=1.0,
                                       description="least similarity of a recorded query to count as similar")
        retrieve_prior: float = Field(
            default=10.0, ge=0.0, le=1000.0,
            description="pseudo-count of the node-wide score when ranking prompts on the similar queries "
                        "(0: the similar queries alone; higher: closer to the node's best)")
        groups: bool = Field(default=True, description="also optimize the user's groups from their members' choices")
        min_share: float = Field(default=0.2, ge=0.0, le=1.0, description="a node's scope weight needed to contribute")
        max_prompt_chars: int = Field(default=600, ge=40, le=8000, description="prompts longer are cut")
        keywords: int = Field(default=8, ge=0, le=50, description="distinctive words in keyword proposals")
        styles: list[str] | None = Field(
            default=None, max_length=64,
            description="style instructions scored as candidates (default: the built-in STYLE_LIBRARY with the "
                        "white-box scorer, none with a judge; [] for none)")
        cache_size: int = Field(default=64, ge=0, le=1000,
                                description="prompts whose per-choice scores are kept to skip rescoring (0: none)")
        style_pairs: int = Field(default=2, ge=0, le=10,
                                 description="after scoring, combine the best styles pairwise (this many combinations)")

    def __init__(self, config: Config | None = None, name: str = "fermi") -> None:
        self.config = config or self.Config()
        self.name = name
        self._mw: Any = None
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self.scorer_override: Any = None  # for tests and the eval harness

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        self._mw = ctx

    # -- state --------------------------------------------------------------------------------

    def state_of(self, prof: Profile | None) -> dict[str, Any]:
        if prof is None:
            return {}
        return prof.extra.get(self.name) or {}

    def _state(self, prof: Profile) -> dict[str, Any]:
        st = prof.extra.setdefault(self.name, {})
        for k, v in (("seen", 0), ("prompts", []), ("best", None), ("history", []), ("examples", []),
                     ("errors", []), ("jobs", 0)):
            st.setdefault(k, v)
        return st

    # -- learning -----------------------------------------------------------------------------

    @hookimpl
    async def persona_feedback(self, event: Any) -> None:
        if event.kind not in ("choice", "edit"):
            return
        mw = self._mw
        if mw is None:
            return
        nodes = [scope_node(event.user, event.context)]
        if self.config.groups:
            nodes += [e.dst for e in mw.store.edges_from(user_node(event.user))
                      if e.kind == "member" and is_group(e.dst)]
        for node in nodes:
            seen: dict[str, int] = {}

            def count(prof: Profile) -> None:
                st = self._state(prof)
                st["seen"] = seen["n"] = int(st["seen"]) + 1

            mw.update_profile(node, count)
            if seen["n"] % self.config.every:
                continue
            if self.config.background:
                self.request_optimization(node)
            else:
                await self.optimize(node)

    def request_optimization(self, node: str) -> bool:
        """Schedule a background job for ``node``; one per node at a time (a request meanwhile reruns it once)."""
        with self._lock:
            if node in self._running:
                self._again.add(node)
                return False
            self._running.add(node)
        self._mw.schedule(self._job(node))
        return True

    async def _job(self, node: str) -> None:
        try:
            while True:
                try:
                    await self.optimize(node)
                except Exception as exc:  # off the request path: record, never raise
                    log.exception("fermi optimization of %s failed", node)
                    self._record_error(node, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    if node not in self._again:
                        self._running.discard(node)
                        return
                    self._again.discard(node)
        finally:
            with self._lock:
                self._running.discard(node)

    def _record_error(self, node: str, error: str) -> None:
        def put(prof: Profile) -> None:
            st = self._state(prof)
            st["errors"] = (st["errors"] + [{"at": time.time(), "error": error[:300]}])[-10:]

        self._mw.update_profile(node, put)

    def examples_for(self, node: str) -> list[Example]:
        """The node's recorded choices (edits count as after-over-before), newest ``max_examples``."""
        store = self._mw.store
        kind = kind_of(node)  # exact: user 'ana@x.org' is a user, not a context node
        if kind == "group":
            users = [user_of(e.src) or "" for e in store.edges_to(node) if e.kind == "member"
                     and kind_of(e.src) == "user"]
            context = None
        elif kind in ("user", "user_context"):
            users, context = [user_of(node) or ""], name_of(node)
        else:
            return []
        out: list[Example] = []
        for u in users:
            for ev in store.list_feedback(user=u, kinds=["choice", "edit"]):
                if context is not None and ev.context != context:
                    continue
                if kind == "user" and ev.context:
                    continue  # a user-in-context choice belongs to that node
                if ev.kind == "choice":
                    out.append(Example(ev.id, ev.prompt, ev.chosen, list(ev.rejected)[: self.config.max_rejected], u))
                else:
                    out.append(Example(ev.id, ev.prompt, ev.after, [ev.before], u))
        out.sort(key=lambda e: e.id)
        return out[-self.config.max_examples:] if len(out) > self.config.max_examples else out

    def scorer(self) -> Any:
        if self.scorer_override is not None:
            return self.scorer_override
        backend = self._mw.backend()
        white = bool(getattr(getattr(backend, "capabilities", None), "white_box", False)) and hasattr(backend, "call")
        if self.config.scorer == "whitebox" or (self.config.scorer == "auto" and white):
            return WhiteBoxScorer(backend, self.config.placement, self.config.max_response_tokens)
        return JudgeScorer(self._mw.backend(self.config.judge_role), self.name, self.config.judge_pairs)

    def seed_prompt(self, prof: Profile | None) -> str:
        """The unoptimized persona prompt: stated preferences and persona statements, in the user's voice."""
        if prof is None:
            return ""
        parts = []
        for p in prof.stated:
            parts.append(f"Avoid {p.text.rstrip('.')}." if p.polarity == "avoid" else p.text.rstrip(".") + ".")
        for s in prof.persona:
            first = (s.replace("The user's", "My", 1).replace("The user is", "I am", 1)
                     .replace("The user", "I", 1).replace("the user's", "my").replace("the user", "me"))
            parts.append(first.rstrip(".") + ".")
        return self._clip(" ".join(parts))

    def _clip(self, text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= self.config.max_prompt_chars else text[: self.config.max_prompt_chars - 1] + "…"

    def proposals(self, node: str, prof: Profile | None, examples: list[Example], best: str,
                  library: bool = False) -> list[tuple[str, str]]:
        """Deterministic candidates ``(source, text)`` from preferences, persona and choice features.

        ``library``: also the style library (each style after the persona prompt).
        """
        seed = self.seed_prompt(prof)
        out: list[tuple[str, str]] = [("persona", seed)]
        likes, avoids = distinctive_terms(examples, self.config.keywords, min_support=2)
        if likes:
            kw = f"I like answers that talk about {', '.join(likes)}."
            out.append(("keywords", self._clip(f"{seed} {kw}".strip())))
            if avoids:
                out.append(("keywords+avoid", self._clip(f"{seed} {kw} Not about {', '.join(avoids[:4])}.".strip())))
        # Length and structure of chosen vs rejected answers.
        if examples:
            lc = [len(_text.words(e.chosen)) for e in examples]
            lr = [len(_text.words(r)) for e in examples for r in e.rejected]
            ratio = (sum(lc) / len(lc)) / max(1.0, sum(lr) / len(lr))
            style = ""
            if ratio < 0.75:
                style = "I prefer short, concise answers."
            elif ratio > 1.33:
                style = "I prefer detailed, thorough answers."
            if style:
                out.append(("style", self._clip(f"{(out[-1][1] if likes else seed)} {style}".strip())))
        ex = self.exemplar(node, seed, examples)
        if ex is not None:
            out.append(("exemplar", ex[0]))
        for style in self.style_library() if library else []:
            out.append(("library", self._clip(f"{seed} {style}".strip())))
        return [(s, t) for s, t in out if t != best or s == "persona"]

    def exemplar(self, node: str, seed: str, examples: list[Example]) -> tuple[str, str] | None:
        """``(prompt, example id)``: the opening of the chosen answer closest to the others, a concrete
        picture of what I like (user nodes only). It quotes that example, so it is scored without it."""
        if is_group(node) or not examples:
            return None
        vecs = [_vec(e.chosen) for e in examples]
        cent: Counter[str] = Counter()
        for v in vecs:
            cent.update(v)
        i = max(range(len(examples)), key=lambda j: _cos(vecs[j], dict(cent)))
        opening = " ".join(_text.sentences(examples[i].chosen)[:1])[:200]
        if not opening:
            return None
        return self._clip(f"{seed} I like answers in this style: \"{opening}\"".strip()), examples[i].id

    def style_library(self) -> list[str]:
        """``styles`` from the config, else the built-in library."""
        styles = STYLE_LIBRARY if self.config.styles is None else self.config.styles
        return [" ".join(t.split()) for t in styles if t.strip()]

    def style_combinations(self, seed: str, scored: list[dict[str, Any]], persona_score: float | None) -> list[str]:
        """The best-scoring library styles joined pairwise (only styles that beat the persona prompt)."""
        if not self.config.style_pairs:
            return []
        lib = sorted((p for p in scored if p.get("source") == "library"
                      and (persona_score is None or p["score"] > persona_score)), key=lambda p: -p["score"])
        styles = [p["text"][len(seed):].strip() if seed and p["text"].startswith(seed) else p["text"] for p in lib]
        pairs = [(i, j) for j in range(len(styles)) for i in range(j)]
        return [self._clip(f"{seed} {styles[i]} {styles[j]}".strip()) for i, j in pairs[: self.config.style_pairs]]

    def misaligned_fix(self, best: str, bad: list[Example]) -> str | None:
        """Refine ``best`` with the words separating the chosen from the wrongly favoured answers."""
        likes, avoids = distinctive_terms(bad, max(3, self.config.keywords // 2), min_support=1)
        if not likes:
            return None
        text = f"{best} Focus on {', '.join(likes)}."
        if avoids:
            text += f" Less about {', '.join(avoids[:3])}."
        return self._clip(text.strip())

    def optimizer_messages(self, memory: list[dict[str, Any]], bad: list[Example], prof: Profile | None,
                           likes: list[str], group: bool) -> list[Message]:
        lines = [f"{i + 1}. [score {p['score']:+.3f}, accuracy {p['acc']:.2f}] {p['text'] or '(no instruction)'}"
                 for i, p in enumerate(memory[:4])]
        body = "Instructions tried so far, best first (a higher score predicts the user's choices better):\n" + "\n".join(lines)
        if bad and not group:
            body += "\n\nCases the best instruction got wrong (the user preferred the first answer):\n" + "\n".join(
                f"- Question: {e.query[:200]}\n  Preferred: {e.chosen[:200]}\n  Not preferred: {e.rejected[0][:200]}"
                for e in bad[:2])
        if likes:
            body += "\n\nWords typical of the answers the user preferred: " + ", ".join(likes) + "."
        if prof is not None and prof.stated:
            body += "\n\nWhat the user said: " + " ".join(p.text for p in prof.stated[:5])
        body += "\n\nWrite one better instruction for answering this user."
        return [Message(role="system", content=_OPT_SYSTEM), Message(role="user", content=body)]

    def clean_proposal(self, text: str) -> str | None:
        t = text.strip().strip("`").strip()
        para = next((p.strip() for p in t.split("\n\n") if p.strip()), "")
        para = _LABEL.sub("", " ".join(para.split())).strip().strip("\"'“”").strip()
        if len(_text.words(para)) < 4 or _LEFTOVER.search(para):
            return None
        return self._clip(para)

    async def optimize(self, node: str, *, budget: AuxBudget | None = None) -> dict[str, Any]:
        """One optimization job for ``node``: score memory and new proposals, keep the best.

        Returns a summary (also appended to the node's ``history``).
        """
        mw = self._mw
        cfg = self.config
        if budget is None:
            calls = cfg.max_aux_calls
            if calls is None:
                calls = getattr(getattr(getattr(mw, "config", None), "budget", None), "aux_calls_per_job",
                                DEFAULT_CALLS_PER_JOB)
            budget = job_budget(calls, cfg.job_seconds)
        examples = self.examples_for(node)
        ids = [e.id for e in examples]
        prof = mw.store.get_profile(node)
        st = dict(self.state_of(prof))
        memory: list[dict[str, Any]] = [dict(p) for p in st.get("prompts", [])]
        summary: dict[str, Any] = {"at": time.time(), "examples": len(examples), "proposed": 0, "accepted": False,
                                   "errors": []}
        if not examples:
            summary["note"] = "no choices to score on"
            return summary
        scorer = self.scorer()
        by_id = {e.id: e for e in examples}

        async def rescore(entry: dict[str, Any]) -> None:
            have = {k: tuple(v) for k, v in entry.get("per_example", {}).items() if k in by_id}
            missing = [by_id[i] for i in ids if i not in have]
            if missing:
                s = await scorer.score(entry["text"], missing, budget)
                have.update(s.per_example)
            entry["per_example"] = {k: list(v) for k, v in have.items()}
            held = set(entry.get("exclude", ()))
            m, a, n = Score(have).on([i for i in ids if i not in held])
            entry["score"], entry["acc"], entry["n"] = m, a, n
            bad = sorted((i for i in ids if i in have and have[i][0] < 0), key=lambda i: have[i][0])
            entry["misaligned"] = [self._misaligned_record(node, by_id[i]) for i in bad[:3]]

        errors: list[str] = []

        async def guarded(coro: Any) -> bool:
            try:
                await coro
                return True
            except BudgetExceeded as exc:
                errors.append(str(exc))
            except Exception as exc:
                errors.append(f"scoring: {type(exc).__name__}: {exc}")
            return False

        for entry in memory:
            await guarded(rescore(entry))
        current = next((p for p in memory if p["id"] == st.get("best")), None)

        known = {p["text"] for p in memory}
        new: list[dict[str, Any]] = []

        quoted = self.exemplar(node, self.seed_prompt(prof), examples)
        # Per-choice results of prompts tried before (and dropped from the memory): only new choices are scored.
        cache: dict[str, Any] = dict(st.get("cache", {}))

        def add(source: str, text: str) -> bool:
            if text in known:
                return False
            known.add(text)
            key = cache_key(text)
            entry = {"id": f"p{st.get('jobs', 0)}-{len(new)}-{key[:6]}", "text": text,
                     "source": source, "created_at": time.time()}
            if key in cache:
                entry["per_example"] = dict(cache[key])
            if source == "exemplar" and quoted is not None and quoted[0] == text:
                entry["exclude"] = [quoted[1]]  # scored without the choice it quotes
            new.append(entry)
            return True

        best_text = current["text"] if current else ""
        # The library costs one scoring per style: on by default with the (local) white-box scorer,
        # with a judge only when ``styles`` is configured (each judged prompt costs auxiliary calls).
        library = self.config.styles is not None or getattr(scorer, "kind", "") == "whitebox"
        for source, text in self.proposals(node, prof, examples, best_text, library=library):
            add(source, text)
        if current and current.get("misaligned"):
            bad = [by_id[m["id"]] for m in current["misaligned"] if m["id"] in by_id]
            fix = self.misaligned_fix(best_text, bad)
            if fix:
                add("misaligned", fix)
        for entry in new:
            left = budget.seconds_left()
            if left is not None and left <= 0:
                errors.append(f"{self.name}: job time budget spent ({cfg.job_seconds} s); "
                              f"{sum('score' not in e for e in new)} proposal(s) not scored")
                break
            await guarded(rescore(entry))
        persona = next((p for p in memory + new if p.get("source") == "persona" and "score" in p), None)
        for text in self.style_combinations(self.seed_prompt(prof), [p for p in new if "score" in p],
                                            persona["score"] if persona else None):
            left = budget.seconds_left()
            if left is not None and left <= 0:
                break
            if add("library+", text):
                await guarded(rescore(new[-1]))
        scored = [p for p in memory + new if "score" in p]

        # The optimizer LLM: proposals from the memory, each one budgeted.
        if cfg.optimizer_calls and scored:
            try:
                opt = mw.backend(cfg.optimizer_role)
            except Exception as exc:
                opt = None
                errors.append(f"optimizer: {type(exc).__name__}: {exc}")
            likes, _ = distinctive_terms(examples, cfg.keywords, 2)
            for call in range(cfg.optimizer_calls if opt is not None else 0):
                ranked = sorted(scored, key=lambda p: -p["score"])
                bad = [by_id[m["id"]] for m in ranked[0].get("misaligned", []) if m["id"] in by_id]
                msgs = self.optimizer_messages(ranked, bad, prof, likes, is_group(node))
                try:
                    cands = await budget.call("optimizer", self.name, lambda: opt.generate(
                        msgs, n=1, params=GenerationParams(temperature=0.7 if call else 0.0,
                                                           max_tokens=cfg.optimizer_max_tokens, seed=call)),
                        timeout=cfg.optimizer_timeout)
                except BudgetExceeded as exc:
                    errors.append(str(exc))
                    break
                except Exception as exc:
                    errors.append(f"optimizer: {type(exc).__name__}: {exc}")
                    continue
                text = self.clean_proposal(cands[0].text if cands else "")
                if text is None:
                    errors.append("optimizer: unusable proposal")
                    continue
                if add("optimizer", text) and await guarded(rescore(new[-1])):
                    scored.append(new[-1])

        summary["proposed"] = len(new)
        summary["aux_calls"] = budget.used
        pool = [p for p in memory + new if "score" in p]
        champion = max(pool, key=lambda p: (p["score"], p["acc"]), default=None)
        # The best of many candidates on a few choices is flattered by chance (winner's curse): it
        # replaces the current prompt -- on the first job, the unoptimized persona prompt -- only if
        # it is better on the same choices by ``min_z`` paired standard errors.
        base = current if current is not None and "score" in current else \
            next((p for p in pool if p.get("source") == "persona"), None)
        accepted = champion is not None
        if champion is not None and base is not None and champion["id"] != base["id"]:
            z, n_common = paired_z(champion, base, ids)
            summary["z"] = None if math.isinf(z) else round(z, 3)
            if z < cfg.min_z or champion["score"] <= base["score"] + cfg.min_gain:
                accepted = False
                summary["note"] = (f"best candidate {champion['id']} ({champion['source']}) not clearly better than "
                                   f"{base['id']} ({base['source']}): z = {z:.2f} on {n_common} choices, "
                                   f"min_z {cfg.min_z}")
                if current is None:  # first job: the persona prompt becomes the node's prompt
                    champion, accepted = base, True
        if champion is not None and current is not None and champion["id"] == current["id"]:
            accepted = False
        summary.update({"accepted": accepted, "errors": errors,
                        "best_score": (champion if accepted else current or {}).get("score"),
                        "best_acc": (champion if accepted else current or {}).get("acc"),
                        "prompt_id": (champion if accepted else current or {}).get("id"),
                        "candidates": [{"id": p["id"], "source": p["source"], "score": round(p["score"], 4),
                                        "acc": round(p["acc"], 3)} for p in new if "score" in p]})
        if current is None and not accepted:
            summary["note"] = "nothing could be scored"
        keep = sorted(pool, key=lambda p: -p["score"])[: cfg.memory_size]
        if accepted:
            winner = champion
        else:
            winner = current
        if winner is not None and all(p["id"] != winner["id"] for p in keep):
            keep = keep[:-1] + [winner]
        if is_group(node):
            for p in keep:
                p["misaligned"] = [{"id": m["id"]} for m in p.get("misaligned", [])]

        for p in new:
            if p.get("per_example"):
                key = cache_key(p["text"])
                cache.pop(key, None)  # newest last: the oldest are dropped first
                cache[key] = {k: v for k, v in p["per_example"].items() if k in by_id}
        cache = dict(list(cache.items())[-self.config.cache_size:]) if self.config.cache_size else {}

        def store(prof: Profile) -> None:
            s = self._state(prof)
            s["prompts"] = keep
            s["cache"] = cache
            s["jobs"] = int(s.get("jobs", 0)) + 1
            if accepted and winner is not None:
                s["best"] = winner["id"]
                prof.prompt = winner["text"] or None
            s["examples"] = [{"id": e.id, "query": e.query[:300]} for e in examples] if not is_group(node) else \
                [{"id": e.id} for e in examples]
            s["history"] = (s["history"] + [{k: v for k, v in summary.items() if k != "candidates"}
                                            | {"tried": summary["candidates"]}])[-20:]
            if errors:
                s["errors"] = (s["errors"] + [{"at": time.time(), "error": e[:300]} for e in errors])[-10:]

        mw.update_profile(node, store)
        return summary

    def _misaligned_record(self, node: str, ex: Example) -> dict[str, Any]:
        if is_group(node):
            return {"id": ex.id}
        return {"id": ex.id, "query": ex.query[:200], "chosen": ex.chosen[:200], "rejected": ex.rejected[0][:200]}

    # -- per turn -----------------------------------------------------------------------------

    def pick(self, prof: Profile, query: str) -> tuple[dict[str, Any] | None, str]:
        """The memory prompt for ``query``: best margin on the most similar recorded queries, else the node's best."""
        st = self.state_of(prof)
        prompts = [p for p in st.get("prompts", []) if "score" in p]
        best = next((p for p in prompts if p["id"] == st.get("best")), None)
        if best is None:
            return None, "no prompt yet"
        exs = [e for e in st.get("examples", []) if e.get("query")]
        if self.config.retrieve_k and exs and query:
            qv = _vec(query)
            sims = sorted(((_cos(qv, _vec(e["query"])), e["id"]) for e in exs), reverse=True)
            near = [i for s, i in sims[: self.config.retrieve_k] if s >= self.config.min_similarity]
            if near:
                # A few similar queries are a noisy estimate: shrink it toward the prompt's node-wide
                # score (``retrieve_prior`` pseudo-examples), so only a clear local lead switches prompts.
                prior = self.config.retrieve_prior

                def on_near(p: dict[str, Any]) -> float:
                    pe, held = p.get("per_example", {}), set(p.get("exclude", ()))
                    want = [i for i in near if i not in held]
                    vals = [pe[i][0] for i in want if i in pe]
                    if len(vals) != len(want):
                        return -math.inf
                    return (sum(vals) + prior * float(p.get("score", 0.0))) / (len(vals) + prior)

                top = max(prompts, key=lambda p: (on_near(p), p["id"] == best["id"]))
                # The same standard as replacing the node's prompt: clearly better on those queries.
                z, _ = paired_z(top, best, near)
                if on_near(top) > -math.inf and on_near(top) > on_near(best) and z >= self.config.min_z:
                    return top, (f"best on {len(near)} similar recorded queries (margin {on_near(top):+.3f} vs "
                                 f"{on_near(best):+.3f}, shrunk toward the node-wide scores; z {z:.2f})")
        return best, f"node's best (score {best['score']:+.3f}, accuracy {best['acc']:.2f} on {best.get('n', 0)} choices)"

    @hookimpl
    def persona_rewrite(self, turn: Turn, messages: list[Message]) -> list[Message] | None:
        if turn.scope is None:
            return None
        query = next((m.text for m in reversed(messages) if m.role == "user"), "")
        kinds = ("user_context", "user", "group") if self.config.groups else ("user_context", "user")
        chosen: list[tuple[float, str, dict[str, Any], str]] = []
        for node in sorted(turn.scope.nodes, key=lambda n: -n.weight):
            if node.kind not in kinds:
                continue
            prof = turn.profiles.get(node.id)
            if prof is None or not self.state_of(prof).get("best"):
                continue
            entry, why = self.pick(prof, query)
            if entry is None or not entry.get("text"):
                continue
            chosen.append((node.weight, node.id, entry, why))
        if not chosen:
            turn.note("no optimized prompt in scope")
            return None
        total = sum(w for w, *_ in chosen) or 1.0
        used = [c for c in chosen if c[0] / total >= self.config.min_share][:2] or chosen[:1]
        texts: list[str] = []
        for w, node_id, entry, why in used:
            if entry["text"] not in texts:
                texts.append(entry["text"])
            turn.trace.items_used.append({"source": self.name, "kind": "prompt", "node": node_id, "prompt_id": entry["id"],
                                          "prompt_source": entry.get("source"), "score": entry.get("score"),
                                          "accuracy": entry.get("acc"), "weight": round(w, 4), "why": why,
                                          "text": entry["text"]})
        turn.note("; ".join(f"{nid} prompt {e['id']} ({e.get('source')}, {why})" for _, nid, e, why in used)
                  + f" in {self.config.placement}")
        return place(messages, self._clip(" ".join(texts)), self.config.placement)


def prompt_report(profile: Profile, name: str = "fermi") -> dict[str, Any] | None:
    """The current prompt and its score history, for ``persona-mw profile show``."""
    st = profile.extra.get(name)
    if not st:
        return None
    best = next((p for p in st.get("prompts", []) if p["id"] == st.get("best")), None)
    return {
        "prompt": profile.prompt,
        "prompt_id": st.get("best"),
        "score": None if best is None else round(best.get("score", 0.0), 4),
        "accuracy": None if best is None else round(best.get("acc", 0.0), 3),
        "source": None if best is None else best.get("source"),
        "history": [{"at": h.get("at"), "accepted": h.get("accepted"), "score": h.get("best_score"),
                     "accuracy": h.get("best_acc"), "prompt_id": h.get("prompt_id"), "examples": h.get("examples"),
                     "proposed": h.get("proposed"), "aux_calls": h.get("aux_calls"), "errors": h.get("errors")}
                    for h in st.get("history", [])],
        "memory": [{"id": p["id"], "source": p.get("source"), "score": p.get("score"), "accuracy": p.get("acc"),
                    "text": p.get("text")} for p in st.get("prompts", [])],
    }


__all__ = ["Example", "Fermi", "JudgeScorer", "Score", "WhiteBoxScorer", "cache_key", "distinctive_terms", "paired_z",
           "place", "prompt_report", "prompt_reports"]


def prompt_reports(middleware: Any, profiles: dict[str, Any]) -> dict[str, Any]:
    """``{node: prompt_report}`` for the nodes in ``profiles`` (dumped or models) that have an optimized prompt."""
    names = [p.name for p in middleware.host.pipeline if isinstance(p.instance, Fermi)] or ["fermi"]
    out: dict[str, Any] = {}
    for node, prof in profiles.items():
        prof = prof if isinstance(prof, Profile) else Profile.model_validate(prof)
        for name in names:
            rep = prompt_report(prof, name)
            if rep is not None:
                out[node if len(names) == 1 else f"{node} ({name})"] = rep
    return out
