"""Verbal persona (PIPT-style persona inference): one sentence explaining why a user chose an answer.

On a choice (or edit) event an LLM (role ``persona``, default the main backend) reads the prompt,
the chosen and the rejected answer and writes one sentence about the user's preferences, in the
language the user wrote in. The sentence is validated (one sentence, bounded, no instructions or
template echoes, right language) and stored on the user's ``Profile.persona`` (bounded, newest
last); ``persona_gather`` offers the newest ones to prompt plugins as ``ContextItem(kind="persona")``.

The LLM call runs off the feedback path by default (``background: true``): ``feedback()`` returns
once the event is stored, and ``Middleware.drain()`` waits for pending inferences. Budget: at most one
call per event, on every ``every``-th eligible event of a user, with at most ``max_pending`` calls in
flight (extra events are counted as skipped on the profile, never queued without bound).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.errors import PluginError
from persona_mw.nodes import USER_KINDS, most_specific_first, scope_node
from persona_mw import text as _text
from persona_mw.types import ContextItem, GenerationParams, Message, Profile, Turn

log = logging.getLogger("persona_mw.persona")

OPENERS = {
    "en": "The user", "es": "El usuario", "fr": "L'utilisateur", "de": "Der Nutzer", "it": "L'utente",
    "pt": "O usuário", "nl": "De gebruiker", "pl": "Użytkownik", "tr": "Kullanıcı", "sv": "Användaren",
    "ru": "Пользователь", "uk": "Користувач", "el": "Ο χρήστης", "zh": "这位用户", "ja": "このユーザーは",
    "ko": "이 사용자는", "ar": "المستخدم", "he": "המשתמש", "hi": "उपयोगकर्ता", "th": "ผู้ใช้",
}

_SYSTEM = ("You describe users from the answers they prefer. You reply with exactly one short sentence "
           "about the user and nothing else: no preamble, no quotes, no lists.")

# Echoes of our template or of instructions smuggled in through the answers being compared.
_LEFTOVERS = re.compile(
    r"ignore (?:all |any |the )?(?:previous|above|prior)|disregard|system prompt|<\|[^>]*\|>|\[/?INST\]|"
    r"```|https?://|\b(?:chosen|rejected|preferred) (?:answer|response)\b|<<<|>>>|"
    r"^\s*(?:system|assistant|user)\s*:|\bas an ai\b|\blanguage model\b|\bi cannot\b|\bi'm sorry\b",
    re.IGNORECASE | re.MULTILINE,
)
_PREAMBLE = re.compile(r"^\s*(?:persona|answer|sentence|output|description|sure[,!]?[^:\n]*|here(?:'s| is)[^:\n]*)\s*:\s*",
                       re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？])")


def build_prompt(prompt: str, chosen: str, rejected: str, language: str, limit: int = 800) -> list[Message]:
    """Our persona-inference prompt (the texts are delimited data; the model is told to answer in ``language``)."""
    lang = language if language in _text.LANGUAGE_NAMES else "en"
    name = _text.LANGUAGE_NAMES[lang]
    opener = OPENERS.get(lang, OPENERS["en"])
    return [
        Message(role="system", content=_SYSTEM),
        Message(role="user", content=(
            f"A user asked:\n<<<{prompt[:limit]}>>>\n\n"
            f"They preferred this answer:\n<<<{chosen[:limit]}>>>\n\n"
            f"over this one:\n<<<{rejected[:limit]}>>>\n\n"
            "In one short sentence, say what kind of person this user is and what they value in an answer "
            "(style, length, depth, tone), so that an assistant can serve them better. Speak of general traits, "
            "not of this question's details, and do not quote the answers. "
            f"Write the sentence in {name}, starting with \"{opener}\"."
        )),
    ]


def validate_persona(text: str, language: str, *, max_chars: int = 300, min_words: int = 4,
                     require_language: bool = True) -> tuple[str | None, str]:
    """Clean an LLM's persona sentence; returns ``(sentence, "ok")`` or ``(None, reason)``.

    Keeps the first line and its first sentence, strips a "Persona:"-style label and quotes, and
    rejects what is empty, too short or long, carries instruction or template leftovers, or is in
    another language than the user's.
    """
    t = text.strip().strip("`").strip()
    line = next((ln.strip() for ln in t.splitlines() if ln.strip()), "")
    line = _PREAMBLE.sub("", line, count=1).strip().strip("\"'“”«»").strip()
    if not line:
        return None, "empty"
    if _LEFTOVERS.search(t.split("\n\n")[0]):
        return None, "instruction or template leftovers"
    first = _SENTENCE_END.split(line, maxsplit=1)[0].strip().strip("\"'“”«»").strip()
    if len(_text.words(first)) < min_words and not re.search(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", first):
        return None, "too short"
    if len(first) > max_chars:
        return None, f"longer than {max_chars} characters"
    if require_language and language not in ("und", ""):
        got = _text.detect_language(first)
        if got not in ("und", language):
            return None, f"language {got}, expected {language}"
    if first[-1] not in ".!?。！？":
        first += "。" if language in ("zh", "ja") else "."
    return first[0].upper() + first[1:], "ok"


class PersonaInference:
    """Infer a one-sentence persona from choices; offer it to prompt plugins."""

    # Feedback kinds this plugin uses (Middleware warns about events no configured plugin uses).
    feedback_kinds = ("choice", "edit")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: str = Field(default="persona", description="roles: entry of the persona LLM (default: main backend)")
        kinds: list[Literal["choice", "edit"]] = Field(default=["choice", "edit"],
                                                        description="feedback kinds that trigger an inference")
        background: bool = Field(default=True, description="run the LLM call off the feedback path")
        every: int = Field(default=1, ge=1, description="infer on every k-th eligible event of a user")
        max_pending: int = Field(default=4, ge=1, le=1000, description="LLM calls in flight, beyond: skipped")
        max_personas: int = Field(default=5, ge=1, le=100, description="statements kept per node, newest win")
        max_chars: int = Field(default=300, ge=40, le=2000, description="longest persona sentence accepted")
        max_input_chars: int = Field(default=800, ge=100, le=20000, description="per text shown to the LLM")
        max_tokens: int = Field(default=60, ge=8, le=512, description="new tokens of the persona LLM's answer")
        require_language_match: bool = Field(default=True,
                                             description="refuse a sentence not in the language the user wrote in")
        max_in_prompt: int = Field(default=2, ge=0, le=20, description="persona items gathered per turn")
        include_inherited: bool = Field(default=False, description="also gather group/context personas")

    def __init__(self, config: Config | None = None, name: str = "persona") -> None:
        self.config = config or self.Config()
        self.name = name
        self._ctx: Any = None
        self._backend: Any = None
        self._pending = 0
        self._lock = threading.Lock()

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        self._ctx = ctx

    # -- learning -----------------------------------------------------------------------------

    def _state(self, prof: Profile) -> dict[str, Any]:
        state: dict[str, Any] = prof.extra.setdefault(self.name, {"seen": 0, "inferred": 0, "rejected": 0, "skipped": 0})
        return state

    @hookimpl
    async def persona_feedback(self, event: Any) -> None:
        if event.kind not in self.config.kinds:
            return
        mw = self._ctx
        if mw is None:
            raise PluginError(f"plugin {self.name!r} was not started", plugin=self.name, hook="persona_feedback")
        if event.kind == "choice":
            prompt, chosen, rejected = event.prompt, event.chosen, event.rejected[0]
        else:
            prompt, chosen, rejected = event.prompt, event.after, event.before
        node = scope_node(event.user, event.context)
        counted: dict[str, int] = {}

        def count(prof: Profile) -> None:
            st = self._state(prof)
            st["seen"] = counted["seen"] = int(st.get("seen", 0)) + 1

        mw.update_profile(node, count)
        if counted["seen"] % self.config.every:
            return
        with self._lock:
            busy = self._pending >= self.config.max_pending
            if not busy:
                self._pending += 1
        if busy:
            mw.update_profile(node, lambda p: self._state(p).__setitem__("skipped", self._state(p).get("skipped", 0) + 1))
            log.info("persona inference skipped for %s: %d call(s) already pending", node, self.config.max_pending)
            return
        job = self._infer(node, event.id, prompt, chosen, rejected)
        if self.config.background:
            mw.schedule(job)
        else:
            await job

    async def _infer(self, node: str, event_id: str, prompt: str, chosen: str, rejected: str) -> None:
        mw = self._ctx
        language = _text.detect_language(prompt) if _text.words(prompt) else _text.detect_language(chosen)
        try:
            if self._backend is None:
                self._backend = mw.backend(self.config.role)
            cands = await self._backend.generate(
                build_prompt(prompt, chosen, rejected, language, self.config.max_input_chars), n=1,
                params=GenerationParams(temperature=0.0, max_tokens=self.config.max_tokens))
            raw = cands[0].text if cands else ""
            persona, reason = validate_persona(raw, language, max_chars=self.config.max_chars,
                                               require_language=self.config.require_language_match)
        except Exception as exc:  # off the feedback path: record on the profile and log, never raise
            persona, reason, raw = None, f"{type(exc).__name__}: {exc}", ""
        finally:
            with self._lock:
                self._pending -= 1

        def store(prof: Profile) -> None:
            st = self._state(prof)
            st["language"] = language
            if persona is None:
                st["rejected"] = int(st.get("rejected", 0)) + 1
                st["last_error"] = f"{reason} (event {event_id}): {raw[:120]!r}"
                return
            st["inferred"] = int(st.get("inferred", 0)) + 1
            kept = [p for p in prof.persona if p.strip().lower() != persona.lower()]
            prof.persona = (kept + [persona])[-self.config.max_personas:]

        mw.update_profile(node, store)
        if persona is None:
            log.warning("persona for %s rejected: %s", node, reason)

    # -- per turn -----------------------------------------------------------------------------

    @hookimpl
    def persona_gather(self, turn: Turn) -> list[ContextItem] | None:
        if turn.scope is None or self.config.max_in_prompt == 0:
            return None
        items: list[ContextItem] = []
        for node in most_specific_first(turn.scope.nodes):
            if node.kind not in USER_KINDS and not self.config.include_inherited:
                continue
            prof = turn.profiles.get(node.id)
            for text in reversed(prof.persona if prof else []):
                if len(items) >= self.config.max_in_prompt:
                    break
                items.append(ContextItem(kind="persona", text=text, source=self.name, node=node.id, weight=node.weight))
        return items or None


__all__ = ["OPENERS", "PersonaInference", "build_prompt", "validate_persona"]
