"""Scoring a prompt on a node's recorded choices: the examples, the score, and the two scorers.

``WhiteBoxScorer`` (local backend): per-token log-likelihood margins of chosen over rejected
answers under the prompt. ``JudgeScorer`` (black-box backends): a judge LLM compares the two
answers in both orders. ``paired_z`` compares two prompts on the same choices.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

from persona_mw.budget import AuxBudget, job_budget
from persona_mw.placement import Placement, place_block
from persona_mw.types import Candidate, GenerationParams, Message


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

    def _judge(self, msgs: list[Message]) -> Callable[[], Awaitable[list[Candidate]]]:
        """One judge call on ``msgs`` (a thunk: the budget makes the call, or refuses it)."""
        async def call() -> list[Candidate]:
            cands: list[Candidate] = await self.backend.generate(
                msgs, n=1, params=GenerationParams(temperature=0.0, max_tokens=4))
            return cands

        return call

    async def score(self, prompt: str, examples: list[Example], budget: AuxBudget | None = None) -> Score:
        budget = budget or job_budget()
        out = Score()
        for ex in examples[-self.max_pairs:]:
            rej = ex.rejected[0]
            votes = 0.0
            for a, b, chosen_letter in ((ex.chosen, rej, "A"), (rej, ex.chosen, "B")):
                cands = await budget.call("judge", self.plugin, self._judge(self.messages(prompt, ex.query, a, b)),
                                          timeout=self.timeout)
                v = self.verdict(cands[0].text if cands else "")
                votes += 0.0 if v is None else (0.5 if v == chosen_letter else -0.5)
            out.per_example[ex.id] = (votes, 1.0 if votes > 0 else (0.5 if votes == 0 else 0.0))
        return out

