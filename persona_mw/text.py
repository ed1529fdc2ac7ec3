"""Text features, the one home for them: words, sentences, reading grade, style metrics, style
targets of stated preferences, lexical similarity and language detection.

Pure Python and offline (no textstat, no NLTK downloads, no model): these run on every candidate
of every turn. Used by the profile features (``persona_mw.features``), the rewards, the ``persona``,
``bpo``, ``fermi`` and ``corrector`` plugins, memory (language of a chat) and the evals.

Two word splitters live here on purpose, and each is pinned by ``tests/test_text.py``:

- ``words`` (Unicode ``\\w`` runs with inner apostrophes) counts words of any script: reward
  style targets, content terms, language guesses, the ``persona`` and ``fermi`` plugins.
- ``latin_words`` (Latin letters and digits) is what the reading grade and the profile's style
  metrics and hashed n-grams are computed on; changing it would change every fitted profile's
  features, so it stays as it was.

Likewise ``style_features`` (19 metrics, the profile model's ``STYLE_NAMES``) and
``response_style`` (7 metrics, matched against the targets ``style_targets`` reads off a stated
preference) are two views with different jobs; both use the one ``flesch_kincaid_grade``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

# ------------------------------------------------------------------------- words, sentences, grade

_WORD = re.compile(r"\w+(?:['’]\w+)?", re.UNICODE)
_SENT_END = re.compile(r"(?<=[.!?。！？])\s+|[。！？]|\n+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00C0-\u024F']+|\d+")
_LATIN_SENT_END = re.compile(r"[.!?]+(?:\s|$)")
_VOWELS = "aeiouy"


def words(text: str) -> list[str]:
    """Words of any script (``\\w`` runs, an inner apostrophe kept: "don't", "l'eau")."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Sentences (split after . ! ? and the CJK stops, and at line breaks) that contain a word."""
    return [s for s in (p.strip() for p in _SENT_END.split(text.strip())) if _WORD.search(s)]


def latin_words(text: str) -> list[str]:
    """Runs of Latin letters (apostrophes included) and runs of digits: the words of the reading
    grade, the profile's style metrics and its hashed n-grams."""
    return _LATIN_WORD.findall(text)


def _sentence_count(text: str) -> int:
    """Sentence ends (runs of . ! ? before a space or the end), at least 1: the grade's sentences."""
    return max(1, len(_LATIN_SENT_END.findall(text)))


def count_syllables(word: str) -> int:
    """Syllables of an English word by a vowel-group heuristic (silent e, -le, -ed handled)."""
    w = word.lower().strip("'")
    if not w:
        return 0
    if len(w) <= 3:
        return 1
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")):
        w = w[:-1]
    elif w.endswith("ed") and not w.endswith(("ted", "ded")):
        w = w[:-2]
    groups = 0
    prev = False
    for ch in w:
        v = ch in _VOWELS
        if v and not prev:
            groups += 1
        prev = v
    return max(1, groups)


def flesch_kincaid_grade(text: str) -> float:
    """Flesch-Kincaid grade level: 0.39 * words/sentence + 11.8 * syllables/word - 15.59
    (the project's one reading grade: profile features, the ``style`` reward, ``eval style``)."""
    ws = [w for w in latin_words(text) if not w.isdigit()]
    if not ws:
        return 0.0
    syl = sum(count_syllables(w) for w in ws)
    return 0.39 * len(ws) / _sentence_count(text) + 11.8 * syl / len(ws) - 15.59


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return 0x1F300 <= cp <= 0x1FAFF or 0x2600 <= cp <= 0x27BF or 0x1F1E6 <= cp <= 0x1F1FF


# ------------------------------------------------------------------------- profile style metrics

_CONTRACTION_EN = re.compile(r"\b\w+'(?:s|re|ve|ll|d|m|t)\b", re.IGNORECASE)
_FIRST_SECOND = re.compile(r"\b(?:i|me|my|we|us|our|you|your|yours)\b", re.IGNORECASE)
_HEDGES = re.compile(r"\b(?:maybe|perhaps|kind of|sort of|pretty|really|super|awesome|cool|totally)\b", re.IGNORECASE)
_FORMAL_CONNECTIVE = re.compile(r"\b(?:therefore|furthermore|moreover|however|consequently|thus|hence|additionally|"
                                r"nevertheless|accordingly|whereas)\b", re.IGNORECASE)
_BULLET_LINE = re.compile(r"^\s*(?:[-*\u2022+])\s+", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+", re.MULTILINE)
_HEADING = re.compile(r"^\s*(?:#{1,6}\s+\S|\*\*[^*\n]{2,80}\*\*\s*:?\s*$|[A-Z][^\n.!?]{2,60}:\s*$)", re.MULTILINE)
_CODE_FENCE = re.compile(r"```")
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF]")

STYLE_NAMES: tuple[str, ...] = (
    "log_words",            # length
    "log_chars_per_word",
    "log_sentences",
    "words_per_sentence",
    "fk_grade",             # reading level (Flesch-Kincaid grade, own syllable heuristic)
    "long_word_ratio",      # words of 3+ syllables
    "contraction_rate",     # formality cues (informal +)
    "first_second_person_rate",
    "exclamation_rate",
    "question_rate",
    "casual_word_rate",
    "formal_connective_rate",
    "emoji_rate",
    "bullet_lines",         # structure
    "numbered_lines",
    "headings",
    "code_blocks",
    "inline_code",
    "paragraphs",
)


def style_features(text: str) -> dict[str, float]:
    """The profile model's interpretable style metrics of ``text``, raw (``STYLE_NAMES``; the
    scaled vector is ``persona_mw.features.style_vector``)."""
    ws = latin_words(text)
    n = len(ws)
    nz = max(n, 1)
    sents = _sentence_count(text) if n else 0
    syl = [count_syllables(w) for w in ws if not w.isdigit()]
    return {
        "log_words": math.log1p(n),
        "log_chars_per_word": math.log1p(sum(len(w) for w in ws) / nz),
        "log_sentences": math.log1p(sents),
        "words_per_sentence": n / max(sents, 1),
        "fk_grade": flesch_kincaid_grade(text),
        "long_word_ratio": sum(1 for s in syl if s >= 3) / max(len(syl), 1),
        "contraction_rate": len(_CONTRACTION_EN.findall(text)) / nz,
        "first_second_person_rate": len(_FIRST_SECOND.findall(text)) / nz,
        "exclamation_rate": text.count("!") / max(sents, 1),
        "question_rate": text.count("?") / max(sents, 1),
        "casual_word_rate": len(_HEDGES.findall(text)) / nz,
        "formal_connective_rate": len(_FORMAL_CONNECTIVE.findall(text)) / nz,
        "emoji_rate": len(_EMOJI.findall(text)) / max(sents, 1),
        "bullet_lines": float(len(_BULLET_LINE.findall(text))),
        "numbered_lines": float(len(_NUMBERED.findall(text))),
        "headings": float(len(_HEADING.findall(text))),
        "code_blocks": len(_CODE_FENCE.findall(text)) / 2.0,
        "inline_code": float(len(_INLINE_CODE.findall(text))),
        "paragraphs": float(len([p for p in re.split(r"\n\s*\n", text) if p.strip()])),
    }


# ------------------------------------------------------------------------- response style vs stated targets

_BULLET = re.compile(r"^\s*(?:[-*•·]|\d+[.)])\s+")
_CONTRACTION = re.compile(r"\b\w+['’](?:s|t|re|ve|ll|d|m)\b", re.IGNORECASE)
_INFORMAL = {"lol", "gonna", "wanna", "hey", "yeah", "yep", "nope", "cool", "awesome", "btw", "kinda", "sorta",
             "ok", "okay", "stuff", "guys", "haha", "omg", "super", "totally", "pretty"}
_FORMAL = {"therefore", "however", "furthermore", "moreover", "regarding", "consequently", "thus", "hence",
           "accordingly", "nevertheless", "additionally", "respectively", "shall", "whereas", "pursuant"}


def response_style(text: str) -> dict[str, float]:
    """The style metrics ``style_fit`` matches against stated targets, for one response.

    ``words``, ``sentences``, ``grade`` (Flesch-Kincaid grade level, English-calibrated),
    ``formality`` in [0, 1], ``bullets`` (share of lines that are list items), ``emoji`` (count),
    ``code`` (1 when a code block is present).
    """
    ws = words(text)
    sents = sentences(text)
    nw, ns = len(ws), max(1, len(sents)) if ws else 0
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
    """How well a response's ``response_style`` meets the targets, in [0, 1] (mean over targeted features)."""
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


def content_tokens(text: str, min_len: int = 2) -> list[str]:
    """The stemmed content words of ``text`` in order, repeats kept: no stopwords, no numbers,
    none shorter than ``min_len`` characters."""
    return [_stem(w.lower()) for w in words(text) if w.lower() not in _STOP and not w.isdigit() and len(w) >= min_len]


def content_terms(text: str) -> set[str]:
    """The set of ``content_tokens`` (words of two characters or more)."""
    return set(content_tokens(text))


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
    scores: dict[str, float] = {lang: sum(t in set(sw) for t in toks) for lang, sw in _STOPWORDS.items()}
    low = text.lower()
    bonus = {"es": "ñ¿¡", "de": "ßäöü", "fr": "çêèàù", "pt": "ãõç", "pl": "łąęśźż", "tr": "ğışç", "sv": "åä"}
    for lang, chars in bonus.items():
        scores[lang] += sum(low.count(c) for c in chars) * 0.5
    best = max(scores.items(), key=lambda kv: kv[1])
    return best[0] if best[1] > 0 else "und"


__all__ = [
    "LANGUAGE_NAMES", "STYLE_NAMES", "content_stem", "content_terms", "content_tokens", "count_syllables",
    "coverage", "detect_language", "flesch_kincaid_grade", "latin_words", "polarity_of", "response_style",
    "sentences", "style_features", "style_fit", "style_targets", "words",
]
