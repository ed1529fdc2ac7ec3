"""Cheap, offline text heuristics shared by the reward and persona plugins.

Style metrics of a response (length, sentences, reading grade, formality, structure), style
targets parsed from stated preferences, polarity of negated statements, lexical similarity, and a
script + stopword language guess. Pure Python, no model: these run on every candidate of every turn.
(Private helpers until ``persona_mw.features`` offers the same metrics; see ``style_features``.)
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from persona_mw.features import flesch_kincaid_grade

_WORD = re.compile(r"\w+(?:['’]\w+)?", re.UNICODE)
_SENT_END = re.compile(r"(?<=[.!?。！？])\s+|[。！？]|\n+")
_BULLET = re.compile(r"^\s*(?:[-*•·]|\d+[.)])\s+")
_CONTRACTION = re.compile(r"\b\w+['’](?:s|t|re|ve|ll|d|m)\b", re.IGNORECASE)
_INFORMAL = {"lol", "gonna", "wanna", "hey", "yeah", "yep", "nope", "cool", "awesome", "btw", "kinda", "sorta",
             "ok", "okay", "stuff", "guys", "haha", "omg", "super", "totally", "pretty"}
_FORMAL = {"therefore", "however", "furthermore", "moreover", "regarding", "consequently", "thus", "hence",
           "accordingly", "nevertheless", "additionally", "respectively", "shall", "whereas", "pursuant"}


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENT_END.split(text.strip())) if _WORD.search(s)]


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return 0x1F300 <= cp <= 0x1FAFF or 0x2600 <= cp <= 0x27BF or 0x1F1E6 <= cp <= 0x1F1FF


def style_features(text: str) -> dict[str, float]:
    """Interpretable style metrics of one response.

    ``words``, ``sentences``, ``grade`` (Flesch-Kincaid grade level, English-calibrated),
    ``formality`` in [0, 1], ``bullets`` (share of lines that are list items), ``emoji`` (count),
    ``code`` (1 when a code block is present).
    """
    ws = words(text)
    sents = sentences(text)
    nw, ns = len(ws), max(1, len(sents)) if ws else 0
    # The one Flesch-Kincaid grade of the project (the profile features and `eval style` use it too).
    grade = flesch_kincaid_grade(text) if nw else 0.0
    lower = [w.lower() for w in ws]
    informal = (len(_CONTRACTION.findall(text)) + text.count("!") + sum(w in _INFORMAL for w in lower)
                + sum(_is_emoji(c) for c in text))
    formal = sum(w in _FORMAL for w in lower) + sum(len(w) >= 10 for w in ws) * 0.5
    formality = 1 / (1 + math.exp(-8 * (formal - informal) / max(nw, 1) * 5)) if nw else 0.5
    lines = [ln for ln in text.splitlines() if ln.strip()]
    bullets = sum(bool(_BULLET.match(ln)) for ln in lines) / len(lines) if lines else 0.0
    return {
        "words": float(nw),
        "sentences": float(ns),
        "grade": round(grade, 3),
        "formality": round(formality, 4),
        "bullets": round(bullets, 4),
        "emoji": float(sum(_is_emoji(c) for c in text)),
        "code": 1.0 if "```" in text or re.search(r"^( {4}|\t)\S", text, re.MULTILINE) else 0.0,
    }


# ------------------------------------------------------------------------- stated preferences

_NEGATION = re.compile(r"^\s*(?:please\s+)?(?:no|not|don'?t|do not|never|avoid|without|stop|skip|nothing)\b[\s:,-]*",
                       re.IGNORECASE)
_NUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "a single": 1, "single": 1}


def polarity_of(text: str, polarity: str) -> tuple[str, str]:
    """A statement's effective polarity and its core: 'no emojis' (like) is an avoid of 'emojis'."""
    m = _NEGATION.match(text)
    if m and text[m.end():].strip():
        return ("avoid" if polarity == "like" else "like"), text[m.end():].strip()
    return polarity, text.strip()


def _count(token: str) -> int | None:
    token = token.lower().strip()
    if token.isdigit():
        return int(token)
    return _NUM.get(token)


def style_targets(text: str, polarity: str = "like") -> dict[str, float]:
    """Style targets a stated preference implies, e.g. 'Answer in one short sentence.' ->
    ``{"sentences": 1, "max_words": 30}``. Keys: max_words, min_words, sentences, bullets,
    formality, max_grade, min_grade, emoji, code. Unrecognised statements give ``{}``."""
    pol, core = polarity_of(text, polarity)
    t = core.lower()
    like = pol == "like"
    out: dict[str, float] = {}
    m = re.search(r"\b(one|a single|single|two|three|four|five|\d+)[\s-]+(?:short\s+|brief\s+)?sentences?\b", t)
    if m and like and _count(m.group(1)):
        out["sentences"] = float(_count(m.group(1)) or 1)
        out["max_words"] = 25.0 * out["sentences"]
    if re.search(r"\bone[- ]liners?\b|\bone line\b", t) and like:
        out.update(sentences=1.0, max_words=25.0)
    m = re.search(r"\b(?:under|fewer than|less than|at most|max(?:imum)?|no more than|within|in)\s+(\d+)\s+words?\b", t)
    if m and like:
        out["max_words"] = float(m.group(1))
    short = re.search(r"\b(short|brief|briefly|concise|succinct|terse|to the point|tl;?dr|few words|quick)\b", t)
    long = re.search(r"\b(long|detailed|thorough|in[- ]depth|comprehensive|elaborate|step[- ]by[- ]step|verbose|lengthy)\b", t)
    if (short and like) or (long and not like):
        out.setdefault("max_words", 40.0)
    elif (long and like) or (short and not like):
        out["min_words"] = 120.0
    if re.search(r"\b(bullets?|bulleted|bullet points?|lists?|numbered)\b", t):
        out["bullets"] = 1.0 if like else 0.0
    if re.search(r"\b(prose|paragraphs?)\b", t):
        out["bullets"] = 0.0 if like else 1.0
    formal = re.search(r"\b(formal|professional|polite|academic)\b", t)
    casual = re.search(r"\b(casual|informal|friendly|chatty|relaxed|conversational|playful)\b", t)
    if formal:
        out["formality"] = 1.0 if like else 0.0
    elif casual:
        out["formality"] = 0.0 if like else 1.0
    simple = re.search(r"\b(simple|simply|plain|easy|eli5|layman|beginners?|child|kids?|five[- ]year[- ]old)\b"
                       r"|\blike i(?:'m| am) (?:five|5)\b", t)
    technical = re.search(r"\b(technical|expert|advanced|rigorous|jargon)\b", t)
    if (simple and like) or (technical and not like):
        out["max_grade"] = 7.0
    elif technical and like:
        out["min_grade"] = 12.0
    if re.search(r"\bemojis?\b|\bemoticons?\b", t):
        out["emoji"] = 1.0 if like else 0.0
    if re.search(r"\bcode\b", t):
        out["code"] = 1.0 if like else 0.0
    return out


def style_fit(feats: dict[str, float], targets: dict[str, Any]) -> float:
    """How well a response's features meet the targets, in [0, 1] (mean over targeted features)."""
    parts: list[float] = []
    w = feats["words"]
    if "max_words" in targets:
        cap = max(1.0, float(targets["max_words"]))
        # Inside the cap, shorter still scores a little higher; past it the score decays as cap/w.
        parts.append(1.0 - 0.2 * w / cap if w <= cap else 0.8 * cap / w)
    if "min_words" in targets:
        floor = max(1.0, float(targets["min_words"]))
        parts.append(min(1.0, w / floor))
    if "sentences" in targets:
        parts.append(1.0 / (1.0 + abs(feats["sentences"] - float(targets["sentences"]))))
    if "bullets" in targets:
        parts.append(feats["bullets"] if targets["bullets"] >= 0.5 else 1.0 - feats["bullets"])
    if "formality" in targets:
        parts.append(1.0 - abs(feats["formality"] - float(targets["formality"])))
    if "max_grade" in targets:
        over = feats["grade"] - float(targets["max_grade"])
        parts.append(1.0 if over <= 0 else max(0.0, 1.0 - over / 10.0))
    if "min_grade" in targets:
        under = float(targets["min_grade"]) - feats["grade"]
        parts.append(1.0 if under <= 0 else max(0.0, 1.0 - under / 10.0))
    if "emoji" in targets:
        has = feats["emoji"] > 0
        parts.append((1.0 if has else 0.0) if targets["emoji"] >= 0.5 else 1.0 / (1.0 + feats["emoji"]))
    if "code" in targets:
        parts.append(1.0 if (feats["code"] >= 0.5) == (targets["code"] >= 0.5) else 0.0)
    return sum(parts) / len(parts) if parts else 0.0


# ------------------------------------------------------------------------- lexical similarity

_STOP = {
    "a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "for", "with", "at", "by", "from", "as", "is",
    "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "i", "me", "my", "you",
    "your", "we", "our", "they", "them", "he", "she", "his", "her", "do", "does", "did", "not", "no", "so",
    "if", "then", "than", "too", "very", "can", "could", "would", "should", "will", "just", "about", "please",
    "like", "want", "answer", "answers", "response", "responses", "always", "never", "avoid", "use", "using",
    "mention", "mentions", "when", "what", "how", "which", "who", "also", "more", "less", "all", "any",
}


def _stem(w: str) -> str:
    for suf in ("ing", "ies", "es", "ed", "s"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            return w[: -len(suf)] + ("y" if suf == "ies" else "")
    return w


def content_stem(word: str) -> str:
    """The stem ``content_terms`` uses for one lower-case word."""
    return _stem(word)


def content_terms(text: str) -> set[str]:
    return {_stem(w.lower()) for w in words(text) if w.lower() not in _STOP and not w.isdigit() and len(w) > 1}


def coverage(response: str, statement: str) -> float:
    """Share of a statement's content words that the response uses (stemmed), in [0, 1]."""
    want = content_terms(statement)
    if not want:
        return 0.0
    return len(want & content_terms(response)) / len(want)


# ------------------------------------------------------------------------- language

LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "sv": "Swedish", "ru": "Russian", "uk": "Ukrainian",
    "el": "Greek", "ar": "Arabic", "he": "Hebrew", "hi": "Hindi", "th": "Thai", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean",
}
_STOPWORDS = {
    "en": "the and is are of to in that it you for with this what how was on be have not do can i my".split(),
    "es": "el la los las de que y en un una es por para con no se lo como más pero mi qué cómo está".split(),
    "fr": "le la les de des et est un une que qui en pour pas dans ce il je vous sur avec mon comment".split(),
    "de": "der die das und ist nicht ein eine ich du sie zu mit auf für den dem wie was es bitte mein".split(),
    "it": "il lo la gli le di che e è un una per non con mi come sono del della questo cosa perché".split(),
    "pt": "o a os as de que e é um uma para não com se do da em por como mais meu você está isso".split(),
    "nl": "de het een en is van dat niet ik je met op te voor zijn wat hoe mijn maar ook".split(),
    "pl": "i w nie na jest to się z że do jak co ale czy jestem mój tak".split(),
    "tr": "ve bir bu da de için ne ile mi çok ben sen nasıl değil var".split(),
    "sv": "och att det är en som på inte jag för med hur vad min har".split(),
}
_SCRIPTS = (  # (first, last code point, language) checked in order
    (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"), (0x3040, 0x30FF, "ja"), (0x4E00, 0x9FFF, "zh"),
    (0x0400, 0x04FF, "ru"), (0x0370, 0x03FF, "el"), (0x0600, 0x06FF, "ar"), (0x0590, 0x05FF, "he"),
    (0x0900, 0x097F, "hi"), (0x0E00, 0x0E7F, "th"),
)


def detect_language(text: str) -> str:
    """An ISO 639-1 guess from the script, then stopword counts for Latin-script text.

    Good enough to keep a user's language on sentences of a few words; ``"und"`` when there is
    nothing to go on. Japanese wins over Chinese as soon as kana appear.
    """
    counts: dict[str, int] = {}
    letters = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        cp = ord(ch)
        for lo, hi, lang in _SCRIPTS:
            if lo <= cp <= hi:
                counts[lang] = counts.get(lang, 0) + 1
                break
    if letters and counts:
        if counts.get("ja") and counts.get("zh"):
            counts["ja"] += counts.pop("zh")
        lang, c = max(counts.items(), key=lambda kv: kv[1])
        if c / letters >= 0.3:
            if lang == "ru" and re.search(r"[іїєґ]", text.lower()):
                return "uk"
            return lang
    toks = [unicodedata.normalize("NFC", w.lower()) for w in words(text)]
    if not toks:
        return "und"
    scores = {lang: sum(t in set(sw) for t in toks) for lang, sw in _STOPWORDS.items()}
    low = text.lower()
    bonus = {"es": "ñ¿¡", "de": "ßäöü", "fr": "çêèàù", "pt": "ãõç", "pl": "łąęśźż", "tr": "ğışç", "sv": "åä"}
    for lang, chars in bonus.items():
        scores[lang] += sum(low.count(c) for c in chars) * 0.5
    best = max(scores.items(), key=lambda kv: kv[1])
    return best[0] if best[1] > 0 else "und"


__all__ = [
    "LANGUAGE_NAMES", "content_terms", "coverage", "detect_language", "polarity_of", "sentences",
    "style_features", "style_fit", "style_targets", "words",
]
