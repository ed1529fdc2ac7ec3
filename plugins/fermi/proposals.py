"""The deterministic candidates of a node's prompt, the optimizer's meta-prompt and the cleaning of
its replies (``Proposals``, a part of ``Fermi``)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from persona_mw import text as _text
from persona_mw.nodes import is_group
from persona_mw.types import Message, Profile

from .scoring import Example
from .settings import STYLE_LIBRARY, Config
from .terms import _cos, _vec, distinctive_terms

_OPT_SYSTEM = ("You write short instructions that tell an assistant how to answer one particular user. "
               "Reply with the improved instruction only: one to three sentences in the first person "
               "(\"I ...\"), no preamble, no quotes, no lists.")
_LEFTOVER = re.compile(r"<<<|>>>|<\|[^>]*\|>|\[/?INST\]|```|https?://|ignore (?:all |the )?(?:previous|above)|"
                       r"\[score|\baccuracy \d|\bno instruction\b|"
                       r"^\s*(?:system|assistant|user)\s*:", re.IGNORECASE | re.MULTILINE)
_LABEL = re.compile(r"^\s*(?:improved |new |better )?(?:instruction|prompt|answer|output)s?\s*:\s*", re.IGNORECASE)


class Proposals:
    """Where candidate prompts come from; ``Fermi`` inherits these methods."""

    config: Config

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
