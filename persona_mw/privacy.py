"""PII redaction before storage, and quoting of stored text as data in prompts.

``privacy: {redact: [email, phone, card, address, iban]}`` replaces each match with ``[EMAIL]``,
``[PHONE]`` ... in feedback events, traces, background-job records and memories before they reach the store
(per server tenant with ``privacy.tenants``). Detectors are pluggable: a plugin module implements
``persona_register_detectors(register)`` and calls ``register("passport", fn)`` where
``fn(text) -> [(start, end), ...]``. ``quote_data`` is how stored text enters a prompt: one line,
in quotes, with chat-template control tokens broken, so it reads as data and never as a turn.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from persona_mw.errors import ConfigError

Span = tuple[int, int]
Detector = Callable[[str], Iterable[Span]]

__all__ = ["BUILTIN_DETECTORS", "Redactor", "luhn_ok", "iban_ok", "quote_data"]

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


# Control sequences of common chat templates (ChatML, Llama 2/3, Mistral, Gemma): inside stored
# text they would let data open a new system turn once the backend renders the template.
_CONTROL = re.compile(r"<\|[^|<>]{0,40}\|>|\[/?INST\]|<</?SYS>>|</?s>|<start_of_turn>|<end_of_turn>", re.IGNORECASE)


def quote_data(text: str, limit: int = 400) -> str:
    """Stored text as a quoted one-line datum for a prompt: bounded, control tokens defused."""
    text = _CONTROL.sub(lambda m: m.group().replace("<", "‹").replace(">", "›").replace("[", "(").replace("]", ")"),
                        text)
    text = " ".join(text.split()).replace('"', "'")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f'"{text}"'
