"""One optimization job of one node (``Fermi.optimize``), in steps.

1. rescore the node's memory on its current choices;
2. propose deterministic candidates (persona, keywords, style, exemplar, library, a fix of the best
   prompt's mis-aligned choices) and score them while the job's time lasts;
3. join the best library styles pairwise and score those;
4. ask the optimizer LLM for proposals from the memory, each call from the job's budget;
5. choose: the best candidate replaces the current prompt only if it is better on the same choices
   by ``min_z`` paired standard errors (the first job falls back to the persona prompt);
6. keep the best ``memory_size`` prompts and the per-choice score cache, and store them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from persona_mw.budget import AuxBudget, BudgetExceeded
from persona_mw.nodes import is_group
from persona_mw.types import Candidate, GenerationParams, Message, Profile

from .scoring import Example, Score, cache_key, paired_z
from .terms import distinctive_terms

if TYPE_CHECKING:
    from .plugin import Fermi

Entry = dict[str, Any]  # a memory entry: id, text, source, per_example, score, acc, n, misaligned


class OptimizationJob:
    """The state one job's steps share: the node's choices, its memory, the new candidates, the errors."""

    def __init__(self, plugin: Fermi, node: str, examples: list[Example], prof: Profile | None,
                 budget: AuxBudget, summary: dict[str, Any]) -> None:
        self.plugin, self.cfg, self.node, self.prof = plugin, plugin.config, node, prof
        self.examples, self.budget, self.summary = examples, budget, summary
        self.ids = [e.id for e in examples]
        self.by_id = {e.id: e for e in examples}
        self.st = dict(plugin.state_of(prof))
        self.memory: list[Entry] = [dict(p) for p in self.st.get("prompts", [])]
        self.scorer = plugin.scorer()
        self.errors: list[str] = []
        self.current: Entry | None = None
        self.known = {p["text"] for p in self.memory}
        self.new: list[Entry] = []
        self.quoted: tuple[str, str] | None = None
        # Per-choice results of prompts tried before (and dropped from the memory): only new choices are scored.
        self.cache: dict[str, Any] = dict(self.st.get("cache", {}))

    async def run(self) -> dict[str, Any]:
        await self.score_memory()
        self.propose()
        await self.score_new()
        await self.combine_styles()
        await self.ask_optimizer()
        self.summary["proposed"] = len(self.new)
        self.summary["aux_calls"] = self.budget.used
        pool = [p for p in self.memory + self.new if "score" in p]
        champion, accepted = self.choose(pool)
        winner = champion if accepted else self.current
        keep = self.keep(pool, winner)
        self.update_cache()
        self.plugin._mw.update_profile(self.node, self.storer(keep, winner, accepted))
        return self.summary

    # -- scoring ------------------------------------------------------------------------------

    async def rescore(self, entry: Entry) -> None:
        """Score ``entry`` on the choices it has no cached result for; its score over all of them."""
        ids, by_id = self.ids, self.by_id
        have = {k: tuple(v) for k, v in entry.get("per_example", {}).items() if k in by_id}
        missing = [by_id[i] for i in ids if i not in have]
        if missing:
            s = await self.scorer.score(entry["text"], missing, self.budget)
            have.update(s.per_example)
        entry["per_example"] = {k: list(v) for k, v in have.items()}
        held = set(entry.get("exclude", ()))
        m, a, n = Score(have).on([i for i in ids if i not in held])
        entry["score"], entry["acc"], entry["n"] = m, a, n
        bad = sorted((i for i in ids if i in have and have[i][0] < 0), key=lambda i: have[i][0])
        entry["misaligned"] = [self.plugin._misaligned_record(self.node, by_id[i]) for i in bad[:3]]

    async def guarded(self, coro: Awaitable[None]) -> bool:
        """Await a scoring; a failure (or a spent budget) is recorded and the job goes on."""
        try:
            await coro
            return True
        except BudgetExceeded as exc:
            self.errors.append(str(exc))
        except Exception as exc:
            self.errors.append(f"scoring: {type(exc).__name__}: {exc}")
        return False

    def time_spent(self) -> bool:
        left = self.budget.seconds_left()
        return left is not None and left <= 0

    async def score_memory(self) -> None:
        for entry in self.memory:
            await self.guarded(self.rescore(entry))
        self.current = next((p for p in self.memory if p["id"] == self.st.get("best")), None)

    # -- candidates ---------------------------------------------------------------------------

    def add(self, source: str, text: str) -> bool:
        """A new candidate, unless its text was tried in this job or is in the memory."""
        if text in self.known:
            return False
        self.known.add(text)
        key = cache_key(text)
        entry: Entry = {"id": f"p{self.st.get('jobs', 0)}-{len(self.new)}-{key[:6]}", "text": text,
                        "source": source, "created_at": time.time()}
        if key in self.cache:
            entry["per_example"] = dict(self.cache[key])
        if source == "exemplar" and self.quoted is not None and self.quoted[0] == text:
            entry["exclude"] = [self.quoted[1]]  # scored without the choice it quotes
        self.new.append(entry)
        return True

    def propose(self) -> None:
        """The deterministic candidates, and a fix of the current prompt from its mis-aligned choices."""
        plugin, current = self.plugin, self.current
        self.quoted = plugin.exemplar(self.node, plugin.seed_prompt(self.prof), self.examples)
        best_text = current["text"] if current else ""
        # The library costs one scoring per style: on by default with the (local) white-box scorer,
        # with a judge only when ``styles`` is configured (each judged prompt costs auxiliary calls).
        library = self.cfg.styles is not None or getattr(self.scorer, "kind", "") == "whitebox"
        for source, text in plugin.proposals(self.node, self.prof, self.examples, best_text, library=library):
            self.add(source, text)
        if current and current.get("misaligned"):
            bad = [self.by_id[m["id"]] for m in current["misaligned"] if m["id"] in self.by_id]
            fix = plugin.misaligned_fix(best_text, bad)
            if fix:
                self.add("misaligned", fix)

    async def score_new(self) -> None:
        for entry in self.new:
            if self.time_spent():
                self.errors.append(f"{self.plugin.name}: job time budget spent ({self.cfg.job_seconds} s); "
                                   f"{sum('score' not in e for e in self.new)} proposal(s) not scored")
                break
            await self.guarded(self.rescore(entry))

    async def combine_styles(self) -> None:
        persona = next((p for p in self.memory + self.new if p.get("source") == "persona" and "score" in p), None)
        for text in self.plugin.style_combinations(self.plugin.seed_prompt(self.prof),
                                                   [p for p in self.new if "score" in p],
                                                   persona["score"] if persona else None):
            if self.time_spent():
                break
            if self.add("library+", text):
                await self.guarded(self.rescore(self.new[-1]))

    async def ask_optimizer(self) -> None:
        """The optimizer LLM: proposals from the memory, each one budgeted."""
        cfg = self.cfg
        scored = [p for p in self.memory + self.new if "score" in p]
        if not cfg.optimizer_calls or not scored:
            return
        try:
            opt = self.plugin._mw.backend(cfg.optimizer_role)
        except Exception as exc:
            self.errors.append(f"optimizer: {type(exc).__name__}: {exc}")
            return
        likes, _ = distinctive_terms(self.examples, cfg.keywords, 2)
        for call in range(cfg.optimizer_calls):
            ranked = sorted(scored, key=lambda p: -p["score"])
            bad = [self.by_id[m["id"]] for m in ranked[0].get("misaligned", []) if m["id"] in self.by_id]
            msgs = self.plugin.optimizer_messages(ranked, bad, self.prof, likes, is_group(self.node))
            try:
                cands = await self.budget.call("optimizer", self.plugin.name, self._proposal(opt, msgs, call),
                                               timeout=cfg.optimizer_timeout)
            except BudgetExceeded as exc:
                self.errors.append(str(exc))
                break
            except Exception as exc:
                self.errors.append(f"optimizer: {type(exc).__name__}: {exc}")
                continue
            text = self.plugin.clean_proposal(cands[0].text if cands else "")
            if text is None:
                self.errors.append("optimizer: unusable proposal")
                continue
            if self.add("optimizer", text) and await self.guarded(self.rescore(self.new[-1])):
                scored.append(self.new[-1])

    def _proposal(self, opt: Any, msgs: list[Message], call: int) -> Callable[[], Awaitable[list[Candidate]]]:
        """One optimizer call (a thunk for the budget): greedy first, then sampled with seed ``call``."""
        async def generate() -> list[Candidate]:
            cands: list[Candidate] = await opt.generate(
                msgs, n=1, params=GenerationParams(temperature=0.7 if call else 0.0,
                                                   max_tokens=self.cfg.optimizer_max_tokens, seed=call))
            return cands

        return generate

    # -- choosing and keeping -----------------------------------------------------------------

    def choose(self, pool: list[Entry]) -> tuple[Entry | None, bool]:
        """``(champion, accepted)``; the summary says why."""
        cfg, current, summary = self.cfg, self.current, self.summary
        champion = max(pool, key=lambda p: (p["score"], p["acc"]), default=None)
        # The best of many candidates on a few choices is flattered by chance (winner's curse): it
        # replaces the current prompt -- on the first job, the unoptimized persona prompt -- only if
        # it is better on the same choices by ``min_z`` paired standard errors.
        base = current if current is not None and "score" in current else \
            next((p for p in pool if p.get("source") == "persona"), None)
        accepted = champion is not None
        if champion is not None and base is not None and champion["id"] != base["id"]:
            z, n_common = paired_z(champion, base, self.ids)
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
        shown: Entry = (champion if accepted and champion is not None else current) or {}
        summary.update({"accepted": accepted, "errors": self.errors,
                        "best_score": shown.get("score"), "best_acc": shown.get("acc"),
                        "prompt_id": shown.get("id"),
                        "candidates": [{"id": p["id"], "source": p["source"], "score": round(p["score"], 4),
                                        "acc": round(p["acc"], 3)} for p in self.new if "score" in p]})
        if current is None and not accepted:
            summary["note"] = "nothing could be scored"
        return champion, accepted

    def keep(self, pool: list[Entry], winner: Entry | None) -> list[Entry]:
        """The memory to store: the best ``memory_size`` prompts, the node's prompt always among them."""
        keep = sorted(pool, key=lambda p: -p["score"])[: self.cfg.memory_size]
        if winner is not None and all(p["id"] != winner["id"] for p in keep):
            keep = keep[:-1] + [winner]
        if is_group(self.node):
            for p in keep:
                p["misaligned"] = [{"id": m["id"]} for m in p.get("misaligned", [])]
        return keep

    def update_cache(self) -> None:
        cache = self.cache
        for p in self.new:
            if p.get("per_example"):
                key = cache_key(p["text"])
                cache.pop(key, None)  # newest last: the oldest are dropped first
                cache[key] = {k: v for k, v in p["per_example"].items() if k in self.by_id}
        size = self.cfg.cache_size
        self.cache = dict(list(cache.items())[-size:]) if size else {}

    def storer(self, keep: list[Entry], winner: Entry | None, accepted: bool) -> Callable[[Profile], None]:
        """What ``update_profile`` applies to the node's profile (under its lock)."""
        plugin, summary, errors, examples, cache = self.plugin, self.summary, self.errors, self.examples, self.cache
        group = is_group(self.node)

        def store(prof: Profile) -> None:
            s = plugin._state(prof)
            s["prompts"] = keep
            s["cache"] = cache
            s["jobs"] = int(s.get("jobs", 0)) + 1
            if accepted and winner is not None:
                s["best"] = winner["id"]
                prof.prompt = winner["text"] or None
            s["examples"] = [{"id": e.id, "query": e.query[:300]} for e in examples] if not group else \
                [{"id": e.id} for e in examples]
            s["history"] = (s["history"] + [{k: v for k, v in summary.items() if k != "candidates"}
                                            | {"tried": summary["candidates"]}])[-20:]
            if errors:
                s["errors"] = (s["errors"] + [{"at": time.time(), "error": e[:300]} for e in errors])[-10:]

        return store
