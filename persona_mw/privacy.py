"""PII redaction before storage, and quoting of stored text as data in prompts.

``privacy: {redact: [email, phone, card, address, iban]}`` replaces each match with ``[EMAIL]``,
``[PHONE]`` ... in feedback events, traces, background-job records and memories before they reach the store
(per server tenant with ``privacy.tenants``). Detectors are pluggable: a plugin module implements
``persona_register_detectors(register)`` and calls ``register("passport", fn)`` where
``fn(text) -> [(start, end), ...]``. ``quote_data`` is how stored text enters a prompt: one line,
in quotes, with chat-template control tokens broken, so it reads as data and never as a turn.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable

from persona_mw.errors import ConfigError

Span = tuple[int, int]
Detector = Callable[[str], Iterable[Span]]

__all__ = ["BUILTIN_DETECTORS", "CONTROL_MARKERS", "Redactor", "backend_special_tokens", "defuse_control", "iban_ok", "luhn_ok",
           "quote_data"]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{2,8}){1,5}(?![\w-]|\.\d)"
                    r"|(?<![\w+])\+\d{8,15}(?!\w)")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_IP = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_STREET = (r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|"
           r"square|sq|parkway|pkwy|highway|hwy|circle|cir)")
_ADDRESS = re.compile(
    r"\b\d{1,5}[A-Za-z]?\s+(?:[A-Z][A-Za-z'-]+\s+){1,4}(?i:" + _STREET + r")\b\.?"
    r"(?:,?\s+(?i:apt|suite|unit)\.?\s*#?\s*\w+)?")
_ADDRESS_EU = re.compile(r"\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee|ring)\s+\d{1,4}[a-z]?\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN (spaces ignored)."""
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _email(text: str) -> Iterable[Span]:
    return [m.span() for m in _EMAIL.finditer(text)]


def _card(text: str) -> Iterable[Span]:
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits):
            out.append(m.span())
    return out


def _phone(text: str) -> Iterable[Span]:
    out = []
    for m in _PHONE.finditer(text):
        s = m.group()
        digits = re.sub(r"\D", "", s)
        if not 8 <= len(digits) <= 15:
            continue
        if _DATE.match(s) or _IP.match(s):
            continue
        # "1.2.3.4"-like versions and "10 20 30" lists: real numbers have a leading + or (...) or a
        # group of 3+ digits next to one of 4+.
        groups = re.findall(r"\d+", s)
        if not (s.startswith("+") or "(" in s or max(map(len, groups)) >= 4 and len(groups) <= 6):
            continue
        if "." in s and not s.startswith("+") and " " not in s and "-" not in s and len(groups) > 3:
            continue
        out.append(m.span())
    return out


def _address(text: str) -> Iterable[Span]:
    return [m.span() for m in _ADDRESS.finditer(text)] + [m.span() for m in _ADDRESS_EU.finditer(text)]


def _iban(text: str) -> Iterable[Span]:
    return [m.span() for m in _IBAN.finditer(text) if iban_ok(m.group())]


# Order matters where matches overlap: a card number is not also reported as a phone number.
BUILTIN_DETECTORS: dict[str, Detector] = {
    "email": _email, "iban": _iban, "card": _card, "phone": _phone, "address": _address,
}


# Identifiers, never redacted: they are how rows are found (and forgotten).
KEEP_FIELDS = ("id", "user", "context", "kind", "polarity", "groups", "created_at", "source_event")


class Redactor:
    """Replaces the spans its detectors find with ``[KIND]``; an empty kind list redacts nothing."""

    def __init__(self, kinds: Iterable[str] = (), detectors: dict[str, Detector] | None = None) -> None:
        known = dict(BUILTIN_DETECTORS)
        known.update(detectors or {})
        self.kinds = list(dict.fromkeys(kinds))
        unknown = [k for k in self.kinds if k not in known]
        if unknown:
            raise ConfigError(f"unknown PII kind {unknown[0]!r}",
                              hint=f"known kinds: {', '.join(sorted(known))}")
        # Built-in order first (cards before phones), then the plugins' detectors.
        order = [k for k in known if k in self.kinds]
        self._detectors = [(k, known[k]) for k in order]

    @classmethod
    def from_config(cls, privacy: Any, detectors: dict[str, Detector] | None = None,
                    where: str = "config") -> Redactor:
        """The redactor of a ``privacy:`` section: registered detectors plus its regex ``patterns``."""
        known = dict(detectors or {})
        for kind, pattern in privacy.patterns.items():
            rx = re.compile(pattern)
            known[kind] = lambda text, rx=rx: [m.span() for m in rx.finditer(text) if m.end() > m.start()]
        try:
            return cls(privacy.redact, known)
        except ConfigError as exc:
            raise ConfigError(f"{where}: privacy.redact: {exc.message}", hint=exc.hint) from None

    def __bool__(self) -> bool:
        return bool(self._detectors)

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping ``(start, end, kind)`` matches, earlier detectors winning overlaps."""
        taken: list[tuple[int, int, str]] = []
        for kind, fn in self._detectors:
            for start, end in fn(text):
                if all(end <= s or start >= e for s, e, _ in taken):
                    taken.append((start, end, kind))
        return sorted(taken)

    def redact(self, text: str) -> str:
        if not self._detectors or not text:
            return text
        out, pos = [], 0
        for start, end, kind in self.find(text):
            out.append(text[pos:start])
            out.append(f"[{kind.upper()}]")
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def redact_data(self, value: Any) -> Any:
        """Every string inside a JSON-like value, redacted (keys kept)."""
        if not self._detectors:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact_data(v) for v in value]
        if isinstance(value, dict):
            return {k: self.redact_data(v) for k, v in value.items()}
        return value

    def redact_model(self, model: Any, keep: Iterable[str] = KEEP_FIELDS) -> Any:
        """A pydantic model with its string fields redacted (the same object when nothing is on).

        Top-level ``keep`` fields (ids, the user, the context ...) stay as they are: they are keys,
        and a numeric user id that looks like a phone number must still find its rows on forget."""
        if not self._detectors:
            return model
        data = model.model_dump(mode="json")
        kept = set(keep)
        return type(model).model_validate({k: v if k in kept else self.redact_data(v) for k, v in data.items()})


# Turn markers and control tokens of the common chat-template families, for backends that cannot list
# their own (remote ones): ChatML / Llama 3 / Phi ``<|...|>``, DeepSeek ``<｜...｜>`` (full-width bars),
# Mistral ``[INST]`` and its tool tags, Llama 2 ``<<SYS>>``, Gemma, Qwen's tool tags, ``<s>``. Inside
# stored text they would let data open a new turn once the backend renders the template.
CONTROL_MARKERS = re.compile(
    r"<\|[^|<>\s]{0,40}\|>|<｜[^｜<>\s]{0,40}｜>|<</?SYS>>|"
    r"\[/?(?:INST|TOOL_CALLS|AVAILABLE_TOOLS|TOOL_RESULTS|SYSTEM_PROMPT|TOOL_CONTENT|IMG|CONTROL_\d+)\]|"
    r"</?(?:s|start_of_turn|end_of_turn|start_of_image|end_of_image|bos|eos|pad|unk|mask|tool_call|tool_response|"
    r"tools|think|function_calls?|im_start|im_end|endoftext|system|user|assistant)>",
    re.IGNORECASE)
_LOOKALIKE = str.maketrans({"<": "‹", ">": "›", "[": "(", "]": ")"})
_JOINER = "\u2060"  # WORD JOINER: invisible; not among the characters ``sanitize`` strips


def _defuse(token: str) -> str:
    """``token`` changed just enough that no tokenizer reads it as the control token it spells."""
    out = token.translate(_LOOKALIKE)
    return out if out != token else token[:1] + _JOINER + token[1:]


@functools.lru_cache(maxsize=32)
def _token_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    usable = sorted({t for t in tokens if isinstance(t, str) and len(t.strip()) >= 2}, key=len, reverse=True)
    if not usable:
        return None
    return re.compile("|".join(re.escape(t) for t in usable), re.IGNORECASE)


def defuse_control(text: str, special_tokens: Iterable[str] = ()) -> str:
    """``text`` with every built-in turn marker and every one of ``special_tokens`` (the backend
    tokenizer's own list, where it has one) defused; repeated until none is left, since defusing one
    occurrence could in principle complete an overlapping one."""
    extra = _token_pattern(tuple(special_tokens))
    for _ in range(8):
        before = text
        if extra is not None:
            text = extra.sub(lambda m: _defuse(m.group()), text)
        text = CONTROL_MARKERS.sub(lambda m: _defuse(m.group()), text)
        if text == before:
            break
    return text


def quote_data(text: str, limit: int = 400, special_tokens: Iterable[str] = ()) -> str:
    """Stored text as a quoted one-line datum for a prompt: bounded, control tokens defused.

    ``special_tokens`` are the backend's own (``backend.special_tokens()``, where it has the method);
    the built-in turn markers of the common template families are defused in any case."""
    text = " ".join(text.split()).replace('"', "'")
    text = defuse_control(text, special_tokens)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f'"{text}"'


def backend_special_tokens(backend: Any) -> tuple[str, ...]:
    """The special tokens a backend's tokenizer lists (``backend.special_tokens()``), or ``()`` for a
    backend without the method (a remote model: the built-in markers of ``quote_data`` still apply)."""
    fn = getattr(backend, "special_tokens", None)
    if fn is None:
        return ()
    return tuple(str(t) for t in fn())
