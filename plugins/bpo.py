"""BPO-style prompt rewriting, personalized: the user's query rewritten into a better prompt
that also carries their persona and stated constraints (ALGORITHMS.md §4.2).

The rewriter is the ``rewriter`` role (default: the main backend), prompted with our own
instructions; its output is served only if it keeps every piece of the original — content
words, numbers and names of the query must all survive (``dropped_content``) — and is not
empty, runaway or an answer instead of a prompt. Otherwise, and when the rewriter fails, is
slow or the request's auxiliary-call budget is spent, the deterministic template (the query
verbatim, then the user's constraints as requirements) is used (``fallback: template``) or the
query is left alone (``fallback: none``). ``mode: template`` never calls a model.

Skipped when there is nothing to add (no constraints, no persona) and when the query is
already specific: it is long (``specific_words``) or states its own format, length or tone,
which the user's standing preferences must not override. Every outcome is in the trace: the
step summary says what was rewritten or why it was skipped, and the rewriter call is in
``aux_calls``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.budget import BudgetExceeded, turn_budget
from persona_mw.errors import PersonaError
from persona_mw.nodes import most_specific_first
from persona_mw import text as _text
from persona_mw.types import GenerationParams, Message, StashKey, Turn

BPO_INFO: StashKey[dict[str, Any]] = StashKey("bpo")

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9\-']*|[.!?:]")

REWRITER_SYSTEM = (
    "You improve prompts for an AI assistant. You never answer the prompt yourself."
)
REWRITER_PROMPT = (
    "Rewrite the request below into one clear, specific prompt for an AI assistant, written as the "
    "user speaking. Keep every question, fact, name and number of the request. Add the user's "
    "preferences as instructions about how to answer.\n\n"
    "User's preferences:\n{constraints}\n\n"
    "Request:\n<<<{query}>>>\n\n"
    "Reply with the rewritten prompt only."
)
TEMPLATE_HEADER = "Please answer in a way that fits me:"


def _content(text: str) -> tuple[set[str], set[str], set[str]]:
    """(content terms, numbers, names) of a text, for the preservation check."""
    names: set[str] = set()
    start = True  # a capital after a sentence end is not evidence of a name
    for tok in _TOKEN.findall(text):
        if tok in ".!?:":
            start = True
            continue
        if not start and tok[0].isupper() and tok.lower() not in ("i", "i'm", "i've", "i'd", "i'll"):
            names.add(tok.lower())
        start = False
    return _text.content_terms(text), set(_NUMBER.findall(text)), names


def dropped_content(original: str, rewrite: str) -> list[str]:
    """What of ``original`` (content terms, numbers, names) ``rewrite`` lost; [] when all survive."""
    terms, nums, names = _content(original)
    r_terms, r_nums, _ = _content(rewrite)
    r_low = rewrite.lower()
    lost = sorted(t for t in terms if t not in r_terms)
    lost += sorted(n for n in nums if n not in r_nums)
    lost += sorted(n for n in names if n not in r_low)
    return list(dict.fromkeys(lost))


def user_constraints(turn: Turn, limit: int = 8) -> list[str]:
    """The user's stated preferences and persona, most specific first: gathered items if any
    plugin gathered them, else the stated preferences of the scope's profiles."""
    lines: list[str] = []
    items = [i for i in turn.items if i.kind in ("stated", "persona", "profile", "instruction")]
    if items:
        for i in sorted(items, key=lambda i: i.kind != "stated"):
            lines.append(("Avoid: " if i.polarity == "avoid" else "") + " ".join(i.text.split()))
    elif turn.scope is not None:
        for node in most_specific_first(turn.scope.nodes):
            prof = turn.profiles.get(node.id)
            if prof is None:
                continue
            for pref in sorted(prof.stated, key=lambda p: -p.created_at):
                pol, core = _text.polarity_of(pref.text, pref.polarity)
                lines.append(("Avoid: " if pol == "avoid" else "") + " ".join(core.split()))
            lines += [" ".join(p.split()) for p in prof.persona]
    seen: set[str] = set()
    out = [ln[:300] for ln in lines if ln and not (ln.lower() in seen or seen.add(ln.lower()))]  # type: ignore[func-returns-value]
    return out[:limit]


def template_rewrite(query: str, constraints: list[str]) -> str:
    """The deterministic rewrite: the query verbatim, then the constraints as requirements."""
    return query.rstrip() + "\n\n" + TEMPLATE_HEADER + "\n" + "\n".join(f"- {c}" for c in constraints)


class BPO:
    """Rewrite the last user message into a better, personalized prompt (or say why not)."""

    # Feedback kinds this plugin uses (Middleware warns about events no configured plugin uses).
    feedback_kinds = ("stated",)

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["llm", "template"] = Field(
            default="llm", description="llm: the rewriter role rewrites; template: deterministic, no model call")
        role: str = Field(default="rewriter", description="the roles: entry whose backend rewrites")
        fallback: Literal["template", "none"] = Field(
            default="template", description="when the rewrite fails or drops content: the template, or no change")
        timeout_s: float = Field(default=10.0, gt=0, description="bound on the rewriter call")
        max_tokens: int = Field(default=160, ge=16, le=2048, description="length cap of the rewrite")
        specific_words: int = Field(
            default=60, ge=5, description="a query of at least this many words counts as already specific")
        max_growth: float = Field(
            default=6.0, gt=1.0, description="a rewrite longer than this many times query + constraints is refused")

    def __init__(self, config: Config | None = None, name: str = "bpo") -> None:
        self.config = config or self.Config()
        self.name = name
        self._ctx: PluginContext | None = None

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        self._ctx = ctx

    def _backend(self) -> Any:
        if self._ctx is None:
            raise PersonaError(f"plugin {self.name!r} was not started (persona_startup did not run)")
        return self._ctx.backend(self.config.role)

    def _skip_reason(self, query: str, constraints: list[str]) -> str | None:
        if not query.strip():
            return "empty query"
        if not constraints:
            return "nothing to add (no stated preferences or persona)"
        if _text.style_targets(query):
            return "the query states its own style"
        if len(_text.words(query)) >= self.config.specific_words:
            return f"the query is already specific ({len(_text.words(query))} words)"
        return None

    async def _llm_rewrite(self, turn: Turn, query: str, constraints: list[str]) -> tuple[str | None, str]:
        """(rewrite or None, why) from the rewriter role, checked for lost content."""
        backend = self._backend()
        msgs = [Message(role="system", content=REWRITER_SYSTEM),
                Message(role="user", content=REWRITER_PROMPT.format(
                    constraints="\n".join(f"- {c}" for c in constraints), query=query))]
        params = GenerationParams(temperature=0.0, max_tokens=self.config.max_tokens)
        try:
            cands = await turn_budget(turn).call(
                "rewriter", self.name, lambda: backend.generate(msgs, n=1, params=params),
                timeout=self.config.timeout_s)
        except BudgetExceeded as exc:
            return None, f"rewriter not called: {exc.message}"
        except Exception as exc:  # the turn goes on without the rewrite; the failure is recorded
            return None, f"rewriter failed: {type(exc).__name__}: {exc}"
        text = (cands[0].text if cands else "").strip().strip("<>").strip()
        text = re.sub(r"^(?:rewritten prompt|prompt|improved prompt)\s*:\s*", "", text, flags=re.I).strip()
        if not text:
            return None, "rewrite empty"
        if len(text) > self.config.max_growth * (len(query) + sum(len(c) for c in constraints) + 40):
            return None, "rewrite runaway (too long)"
        lost = dropped_content(query, text)
        if lost:
            return None, "rewrite dropped content: " + ", ".join(lost[:6])
        # The small models often drop the preferences; carry them verbatim then.
        missing = [c for c in constraints if _text.coverage(text, c) < 0.5]
        if missing:
            text = template_rewrite(text, missing)
            return text, f"rewritten by {self.config.role}, {len(missing)} constraint(s) appended"
        return text, f"rewritten by {self.config.role}"

    @hookimpl
    async def persona_rewrite(self, turn: Turn, messages: list[Message]) -> list[Message] | None:
        idx = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
        if idx is None:
            return None
        query = messages[idx].text
        constraints = user_constraints(turn)
        info: dict[str, Any] = {"original": query, "constraints": constraints}
        turn.stash[BPO_INFO] = info
        why = self._skip_reason(query, constraints)
        if why:
            info["skipped"] = why
            turn.note(f"skipped: {why}")
            return None
        rewrite: str | None = None
        if self.config.mode == "llm":
            rewrite, why = await self._llm_rewrite(turn, query, constraints)
            if rewrite is None:
                info["llm_refused"] = why
                if self.config.fallback == "none":
                    info["skipped"] = why
                    turn.note(f"skipped: {why}")
                    return None
                rewrite, why = template_rewrite(query, constraints), f"{why}; template used"
        else:
            rewrite, why = template_rewrite(query, constraints), "template"
        info["rewrite"] = rewrite
        info["how"] = why
        turn.note(f"{why}: {query[:60]!r} -> {rewrite[:120]!r}")
        for c in constraints:
            turn.trace.items_used.append({"source": self.name, "kind": "constraint", "text": c})
        out = list(messages)
        out[idx] = out[idx].with_text(rewrite)
        return out


__all__ = ["BPO", "BPO_INFO", "dropped_content", "template_rewrite", "user_constraints"]
