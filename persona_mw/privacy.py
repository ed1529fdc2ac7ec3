"""PII redaction before storage, and quoting of stored text as data in prompts.

``privacy: {redact: [email, phone, card, address, iban]}`` replaces each match with ``[EMAIL]``,
``[PHONE]`` ... in feedback events, traces, background-job records and memories before they reach the store
(per server tenant with ``privacy.tenants``). Detectors are pluggable: a plugin module implements
``persona_register_detectors(register)`` and calls ``register("passport", fn)`` where
``fn(text) -> [(start, end), ...]``. ``quote_data`` is how stored text enters a prompt: one line,
in quotes, with chat-template control tokens broken, so it reads as data and never as a turn.

Phones are found and validated by Google's libphonenumber (the ``phonenumbers`` package, extra
``persona-mw[privacy]``): international numbers anywhere, national formats for the regions of
``privacy.regions``. Without it a stricter regex fallback is used (international and common national
forms only) and a warning says so once. Cards are Luhn- and IIN-checked, IBANs mod-97- and
length-checked per country; candidates labeled as order/invoice/ISBN/tracking numbers, dates, times,
versions and prices are not reported as phones or cards.
"""

from __future__ import annotations

import functools
import logging
import re
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

from persona_mw.errors import ConfigError

Span = tuple[int, int]
Detector = Callable[[str], Iterable[Span]]

__all__ = ["BUILTIN_DETECTORS", "CONTROL_MARKERS", "DEFAULT_REGIONS", "Redactor", "backend_special_tokens",
           "defuse_control", "iban_ok", "luhn_ok", "phone_backend", "quote_data"]

log = logging.getLogger("persona_mw.privacy")

# National phone formats are read as numbers of these regions (privacy.regions overrides it):
# the languages the detectors cover (de, fr, es, it, pt, en, ja, zh).
DEFAULT_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "ES", "IT", "PT", "JP", "CN")

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef"
_CJK_RX = re.compile(f"[{_CJK}]")

# --------------------------------------------------------------------------- email
# Local part and domain may be Unicode (EAI / IDN: josé@bücher.de, 用户@例子.广告); an ASCII TLD ends at
# the first non-ASCII-letter, so an address written right against CJK text (请发到ana@example.com谢谢) is found.
_EMAIL = re.compile(
    r"[\w.%+'\-]+@(?:[^\W_](?:[\w\-]{0,61}[^\W_])?\.)+"
    r"(?:[A-Za-z]{2,24}(?![A-Za-z0-9\-])|[^\W\d_]{2,24}(?![\w\-]))")
# "icon@2x.png", "logo@3x.webp": file names, not addresses.
_FILE_EXT = frozenset("png jpg jpeg gif svg webp bmp ico pdf txt md js ts css html htm json yaml yml py "
                      "zip gz tar mp3 mp4 mov wav exe dll so log csv xml".split())


def _email(text: str) -> Iterable[Span]:
    out = []
    for m in _EMAIL.finditer(text):
        start, end = m.span()
        local, domain = m.group().split("@", 1)
        # A CJK run glued in front of an ASCII/Latin local part is the sentence, not the address.
        cjk = [i for i, ch in enumerate(local) if _CJK_RX.match(ch)]
        if cjk and cjk[-1] < len(local) - 1:
            start += cjk[-1] + 1
            local = local[cjk[-1] + 1:]
        lead = len(local) - len(local.lstrip(".'-"))
        start += lead
        local = local[lead:]
        if not local or domain.rsplit(".", 1)[-1].lower() in _FILE_EXT:
            continue
        out.append((start, end))
    return out


# --------------------------------------------------------------------------- numbers: shared checks
# A number labeled as something else ("Order #", "ISBN", "Rechnungsnr.", "订单号：") is not a phone or a card.
_NOT_PII_LABEL = re.compile(
    r"(?i)(?:order|invoice|ref|reference|ticket|tracking|shipment|parcel|isbn|issn|ean|gtin|upc|sku|serial|"
    r"s/n|case|po|article|art\.|item|part|model|build|version|ver\.|v\.|jan|barcode|"
    r"bestellung|bestell|rechnung|rechnungs|auftrag|auftrags|sendung|sendungs|artikel|kunden|vorgang|aktenzeichen|"
    r"commande|facture|colis|suivi|dossier|référence|pedido|factura|albarán|envío|expediente|"
    r"ordine|fattura|spedizione|pratica|encomenda|fatura|rastreio|protocolo|"
    r"注文番号|注文|伝票番号|問い合わせ番号|バーコード|订单号|订单|发票号|发票|快递单号|运单号|条形码|条码)"
    r"(?:[ \t]*(?:#|no\.?|nr\.?|n[º°o]\.?|n\.º|number|nummer|num[ée]ro|número|numero|id|code|código|codice))?"
    r"[ \t]*[:#：.]?[ \t]*$")
_DATE_OR_TIME = re.compile(
    r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})(?:[ T]\d{1,2}(?::\d{2}){0,2})?$"
    r"|^\d{1,2}:\d{2}(?::\d{2})?$")
_IP = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
# "3.11.4", "10.0.22631.3296"; "06.12.34.56.78" (five groups) and "415.555.0132" are phones.
_VERSION = re.compile(r"^v?\d{1,2}(?:\.\d{1,5}){1,3}$")
_CURRENCY_BEFORE = re.compile(r"(?:[$€£¥₹]|\b(?:EUR|USD|GBP|CHF|JPY|CNY|RMB|R\$))\s?$")
_UNIT_AFTER = re.compile(r"^\s?(?:[$€£¥%‰元円]|(?:EUR|USD|GBP|CHF|JPY|CNY|RMB|km|kg|mg|ml|cm|mm|m²|mAh|kWh|Wh|"
                         r"MB|GB|TB|KB|px|Euro|euros?|dollars?|units|Stück)\b)")


def _labeled_not_pii(text: str, start: int) -> bool:
    return bool(_NOT_PII_LABEL.search(text[max(0, start - 40):start]))


def _ean13_ok(digits: str) -> bool:
    if len(digits) != 13:
        return False
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(digits[:12]))
    return (10 - total % 10) % 10 == int(digits[12])


def _number_context_ok(text: str, start: int, end: int) -> bool:
    """False when the number at text[start:end] is labeled, priced, measured or an ISBN/EAN."""
    if _labeled_not_pii(text, start) or _CURRENCY_BEFORE.search(text[max(0, start - 5):start]):
        return False
    if _UNIT_AFTER.match(text[end:end + 8]):
        return False
    digits = re.sub(r"\D", "", text[start:end])
    if len(digits) == 13 and digits[:3] in ("978", "979") and _ean13_ok(digits):
        return False
    return True


# --------------------------------------------------------------------------- cards
# Contiguous 13-19 digits, or groups (4-4-4-4, 4-6-5, 4-6-4, 4-4-4-4-3) with one separator used
# throughout: a space, two spaces, a dot, a dash or a no-break space.
# ASCII boundaries only: CJK text is written right against the number (カード番号は4111...です).
_CARD = re.compile(r"(?<![A-Za-z0-9_.,+\-/])(?:\d{13,19}|\d{4}(?P<s>[ .\-\u00a0]|  )\d{4,6}(?:(?P=s)\d{3,6}){1,3})"
                   r"(?![A-Za-z0-9_]|[.,\-/]\d)")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(text: str) -> Iterable[Span]:
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        # Issuer prefixes: 2 (Mastercard 2-series), 3 (Amex, Diners, JCB), 4 (Visa), 5 (Mastercard,
        # Maestro), 6 (Discover, UnionPay, Maestro).
        if not (13 <= len(digits) <= 19 and digits[0] in "23456" and len(set(digits)) > 1 and luhn_ok(digits)):
            continue
        if len(digits) == 13 and m.group().isdigit() and _ean13_ok(digits):  # a barcode (13-digit cards are gone)
            continue
        if _number_context_ok(text, *m.span()):
            out.append(m.span())
    return out


# --------------------------------------------------------------------------- IBAN
# ISO 13616 registry: the IBAN length of each country.
_IBAN_LENGTHS = {cc: int(n) for cc, n in (x.split(":") for x in (
    "AD:24 AE:23 AL:28 AT:20 AZ:28 BA:20 BE:16 BG:22 BH:22 BR:29 BY:28 CH:21 CR:22 CY:28 CZ:24 DE:22 DK:18 "
    "DO:28 EE:20 EG:29 ES:24 FI:18 FO:18 FR:27 GB:22 GE:22 GI:23 GL:18 GR:27 GT:28 HR:21 HU:28 IE:22 IL:23 "
    "IQ:23 IS:26 IT:27 JO:30 KW:30 KZ:20 LB:28 LC:32 LI:21 LT:20 LU:20 LV:21 LY:25 MC:27 MD:24 ME:22 MK:19 "
    "MR:27 MT:31 MU:30 NL:18 NO:15 PK:24 PL:28 PS:29 PT:25 QA:29 RO:24 RS:22 SA:24 SC:31 SD:18 SE:24 SI:19 "
    "SK:24 SM:27 ST:25 SV:28 TL:23 TN:24 TR:26 UA:29 VA:22 VG:24 XK:20").split())}
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}")


def iban_ok(iban: str) -> bool:
    """ISO 13616 check of an IBAN: the country's length and mod 97 (case, spaces and dashes ignored)."""
    s = re.sub(r"[\s\-]", "", iban).upper()
    if not s.isascii() or not s.isalnum() or _IBAN_LENGTHS.get(s[:2], len(s)) != len(s) or not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _iban(text: str) -> Iterable[Span]:
    out = []
    for m in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(m.group()[:2].upper())
        if length is None:
            continue
        i, n, end = m.end(), 4, m.end()
        while n < length and i < len(text):  # the country's length, single spaces or dashes between groups
            if _alnum(text[i]):
                n, i, end = n + 1, i + 1, i + 1
            elif text[i] in " -\u00a0" and i + 1 < len(text) and _alnum(text[i + 1]) and _alnum(text[i - 1]):
                i += 1
            else:
                break
        if n == length and (end == len(text) or not _alnum(text[end])) and iban_ok(text[m.start():end]):
            out.append((m.start(), end))
    return out


# --------------------------------------------------------------------------- phones
_PHONE_RUN = re.compile(r"(?:\+|(?<!\d)\()?\d[\d \u00a0().\-/–]*\d\)?")
_PHONE_FALLBACK = re.compile(
    r"(?<![\w+.-])(?:(?:\+|00)\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .\-/]\d{2,8}){1,5}(?![\w-]|\.\d)"
    r"|(?<![\w+])\+\d{8,15}(?!\w)")


@lru_cache(maxsize=1)
def _phonenumbers() -> Any:
    try:
        import phonenumbers
    except ImportError:
        log.warning("privacy: the 'phonenumbers' package is not installed; phone numbers are found by a regex "
                    "fallback (international and common national forms, more misses and false alarms). "
                    "Install persona-mw[privacy] for libphonenumber validation.")
        return None
    return phonenumbers


def phone_backend() -> str:
    """'phonenumbers' (libphonenumber validation) or 'regex' (the fallback, when it is not installed)."""
    return "regex" if _phonenumbers() is None else "phonenumbers"


def _phone_plausible(text: str, start: int, end: int) -> bool:
    """Shared vetoes: dates, times, timestamps, IPs, versions, labeled/priced numbers."""
    s = text[start:end]
    digits = re.sub(r"\D", "", s)
    if not 7 <= len(digits) <= 15 or _DATE_OR_TIME.match(s) or _IP.match(s) or _VERSION.match(s):
        return False
    after, before = text[end:end + 2], text[max(0, start - 2):start]
    if re.match(r"[:.,]\d", after) or re.search(r"\d[:.,/]$", before):  # part of a timestamp, decimal, IP
        return False
    if re.search(r"[A-Za-z0-9][\-/_#]$", before):  # the tail of a code such as INV-2024-000123
        return False
    rng = re.fullmatch(r"(\d{4,5})\s?[-–—]\s?(\d{4,5})", s)
    if rng and len(rng[1]) == len(rng[2]) and int(rng[1]) < int(rng[2]):  # a zip or year range: 50667-51149
        return False
    return _number_context_ok(text, start, end)


@lru_cache(maxsize=4096)
def _valid_regions(candidate: str, regions: tuple[str, ...]) -> tuple[str, ...]:
    """The regions in which libphonenumber parses ``candidate`` as a valid number (a quick filter:
    a run valid nowhere never reaches the slower matcher). International numbers: the first region."""
    pn = _phonenumbers()
    if candidate.startswith("+"):
        tries: Sequence[str | None] = (None,)
    elif candidate.startswith("00"):
        tries = ("DE",)  # 00 is the international prefix of most of Europe
    else:
        tries = regions
    out = []
    for region in tries:
        try:
            if pn.is_valid_number(pn.parse(candidate, region)):
                out.append(region or regions[0])
        except pn.NumberParseException:
            continue
    return tuple(out)


@lru_cache(maxsize=4096)
def _matches(window: str, region: str) -> tuple[Span, ...]:
    """libphonenumber's matcher on a window (cached: a conversation's numbers recur in every turn's trace)."""
    pn = _phonenumbers()
    return tuple((m.start, m.end) for m in pn.PhoneNumberMatcher(window, region, leniency=pn.Leniency.VALID))


def _phone_with(regions: Sequence[str]) -> Detector:
    regions = tuple(regions)

    def detect(text: str) -> Iterable[Span]:
        if _phonenumbers() is None:
            return _phone_fallback(text)
        found: list[Span] = []
        for run in _PHONE_RUN.finditer(text):
            if sum(ch.isdigit() for ch in run.group()) < 7:
                continue
            cand = run.group().rstrip(")") if run.group().count("(") < run.group().count(")") else run.group()
            valid_in = _valid_regions(cand, regions)
            if not valid_in:
                continue
            # libphonenumber's matcher has the final say (national prefix required where the plan wants
            # it, no timestamps or page ranges ...), run only for the regions where the number is valid.
            ws = max(0, run.start() - 3)
            window = text[ws:run.end() + 3]
            for region in valid_in:
                hits = [(ws + s, ws + e) for s, e in _matches(window, region)]
                hits = [h for h in hits if _phone_plausible(text, *h)]
                if hits:
                    found.extend(hits)
                    break
        return found
    return detect


def _phone_fallback(text: str) -> Iterable[Span]:
    out = []
    for m in _PHONE_FALLBACK.finditer(text):
        s = m.group()
        groups = re.findall(r"\d+", s)
        # "10 20 30" lists: real numbers have a leading +/00 or (...) or a group of 4+ digits.
        if not (s.startswith(("+", "00")) or "(" in s or max(map(len, groups)) >= 4 and len(groups) <= 6):
            continue
        if "." in s and not s.startswith("+") and " " not in s and "-" not in s and len(groups) > 3:
            continue
        if _phone_plausible(text, *m.span()):
            out.append(m.span())
    return out


_phone = _phone_with(DEFAULT_REGIONS)


# --------------------------------------------------------------------------- street addresses
_UP = "A-ZÀ-ÖØ-ÞĀ-Ž"
_LOW = "a-zß-öø-ÿā-ž"
_CAP = rf"(?:[{_UP}][{_LOW}{_UP}'’\-]*\.?|\d{{1,3}}(?:st|nd|rd|th|º|ª|\.)|[IVX]{{1,4}}\b)"
_PART = r"(?:de|del|della|delle|dei|degli|dello|di|da|do|dos|das|du|des|la|las|los|le|les|y|e|von|van|der|den|dem)"
_NAME = rf"(?:(?:{_PART}\s+|[ld][’']\s?)*{_CAP})(?:\s+(?:{_PART}\s+|[ld][’']\s?)*{_CAP}){{0,4}}"
_NUM = r"\d{1,4}(?:\s?[A-Za-z](?![\w]))?(?:\s?[-/]\s?(?:\d{1,4}[A-Za-z]?|[A-Za-z](?!\w)))?"
# Floor and door after the number (es/pt: "3º B", "2º izda.", "1.º Dto."), part of the address.
_FLOOR = r"(?:,?\s*\d{1,2}\s?\.?[º°ª]\s*(?:[A-Z](?![\w])|(?i:izda|izq|dcha|drcha|esq|dto|dta|dir|fte|andar)\.?)?)?"
_NUM_END = r"(?![\w]|[.,]\d)"

_ADDRESS_PATTERNS = [
    # en: "221B Baker Street", "1600 Pennsylvania Avenue NW", "350 5th Avenue", "Flat 2, 14 Elm Road"
    re.compile(r"(?:\b(?:Flat|Apt\.?|Apartment|Unit|Suite)\s+\w{1,4},?\s+)?"
               r"\b\d{1,5}[A-Za-z]?\s+(?:(?:[A-Z][A-Za-z'-]+|\d{1,3}(?:st|nd|rd|th))\s+){1,4}(?i:street|st|avenue|ave"
               r"|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|square|sq|parkway|pkwy|"
               r"highway|hwy|circle|cir|crescent|close|gardens|grove|mews|row|hill)\b\.?"
               r"(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b)?(?:,?\s+(?i:apt|suite|unit|flat)\.?\s*#?\s*\w+)?"),
    # de: "Hauptstraße 12", "Bahnhofstr. 3a", "Berliner Straße 12-14", "Am Markt 5", "Unter den Linden 77"
    re.compile(rf"\b(?:[{_UP}][{_LOW}]+(?:-[{_UP}][{_LOW}]+)*-?(?:straße|strasse|str\.|weg|gasse|platz|allee|ring"
               rf"|damm|ufer|chaussee|steig|pfad|markt|graben|kai|promenade|stieg|twiete)"
               rf"|[{_UP}][{_LOW}]+(?:er|sche[rn]?)\s+(?:Straße|Strasse|Str\.|Weg|Platz|Allee|Ring|Gasse|Damm|Ufer"
               rf"|Chaussee|Markt)"
               rf"|(?:Am|An der|An den|Auf der|Auf dem|Unter den|Zum|Zur|Hinter der|Im)\s+(?!(?:Montag|Dienstag"
               rf"|Mittwoch|Donnerstag|Freitag|Samstag|Sonntag|Wochenende|Jahr|Januar|Februar|März|April|Mai|Juni"
               rf"|Juli|August|September|Oktober|November|Dezember|Schnitt|Moment|Ende|Anfang)\b)[{_UP}][{_LOW}]+)"
               rf"\s*\d{{1,4}}(?:\s?[a-z](?!\w))?(?:\s?[-/]\s?\d{{1,4}}[a-z]?)?{_NUM_END}"),
    # fr: "12 rue de la Paix", "5 bis, avenue Victor Hugo", "8 bd Saint-Michel"
    re.compile(rf"\b\d{{1,4}}(?:\s?(?:bis|ter|quater)\b)?,?\s+(?i:rue|avenue|av\.|boulevard|bd|place|allée|impasse"
               rf"|chemin|quai|route|cours|passage|square|faubourg|rue du faubourg|villa|cité|sentier)\s+{_NAME}"),
    # es / it / pt: "Calle Mayor 5", "C/ de Alcalá, 45", "Via Roma 10", "Piazza San Marco, 1",
    # "Rua Augusta 100", "Av. Paulista, 1578", "Rua da Prata, nº 45"
    re.compile(rf"(?<![\w.])Gran V[ií]a,?\s+(?:n[º°o]\.?\s?)?{_NUM}{_NUM_END}{_FLOOR}"),
    re.compile(rf"(?<![\w.])(?:Calle|C/|Avenida|Avda\.|Av\.|Paseo|Plaza|Pza\.|Camino|Ronda|Travesía|Carrera|Carretera"
               rf"|Glorieta|Rambla|Carrer|Avinguda|Vía|Via|Viale|Piazza|Piazzale|P\.zza|Corso|Largo|Vicolo|Lungomare"
               rf"|Contrada|Strada|Rua|R\.|Praça|Travessa|Alameda|Estrada|Calçada|Beco|Rodovia|Ladeira"
               rf"|calle|avenida|paseo|plaza|piazza|viale|corso|largo|vicolo|rua|praça|travessa|alameda"
               rf"|(?:(?<=\bin\s)|(?<=\ba\s)|(?<=\bdi\s)|(?<=\bpresso\s)|(?<=\bsede\s)|(?<=\babito\s)|(?<=\bvivo\s)|(?<=\bsta\s)|(?<=\bsito\s)|(?<=\bsita\s))via)"
               rf"\s+{_NAME},?\s+(?:n[º°o]\.?\s?|n\.\s?º\s?|núm\.?\s?|num\.?\s?|nr\.?\s?)?{_NUM}{_NUM_END}"
               rf"{_FLOOR}"),
]


def _address(text: str) -> Iterable[Span]:
    return [m.span() for rx in _ADDRESS_PATTERNS for m in rx.finditer(text)]


# Order matters where matches overlap: a card number is not also reported as a phone number.
BUILTIN_DETECTORS: dict[str, Detector] = {
    "email": _email, "iban": _iban, "card": _card, "phone": _phone, "address": _address,
}


# Identifiers, never redacted: they are how rows are found (and forgotten).
KEEP_FIELDS = ("id", "user", "context", "kind", "polarity", "groups", "created_at", "source_event")


class Redactor:
    """Replaces the spans its detectors find with ``[KIND]``; an empty kind list redacts nothing."""

    def __init__(self, kinds: Iterable[str] = (), detectors: dict[str, Detector] | None = None,
                 regions: Sequence[str] | None = None) -> None:
        known = dict(BUILTIN_DETECTORS)
        if regions:  # national phone formats of these regions (privacy.regions)
            known["phone"] = _phone_with([r.upper() for r in regions])
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

            def spans(text: str, rx: re.Pattern[str] = rx) -> list[Span]:
                return [m.span() for m in rx.finditer(text) if m.end() > m.start()]

            known[kind] = spans
        try:
            return cls(privacy.redact, known, regions=getattr(privacy, "regions", None))
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

    def kinds_in(self, text: str) -> list[str]:
        """The PII kinds found in ``text`` (in detector order), for values that must not be rewritten."""
        found = {k for *_, k in self.find(text)} if self._detectors and text else set()
        return [k for k, _ in self._detectors if k in found]

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

    def redact_data(self, value: Any, keys: bool = False) -> Any:
        """Every string inside a JSON-like value, redacted (dict keys too with ``keys``: free-form
        maps such as request ``metadata`` may be keyed by an email)."""
        if not self._detectors:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact_data(v, keys) for v in value]
        if isinstance(value, dict):
            return {(self.redact(k) if keys and isinstance(k, str) else k): self.redact_data(v, keys)
                    for k, v in value.items()}
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
