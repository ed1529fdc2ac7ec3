"""The ``Fermi`` plugin: its hooks (startup, feedback, rewrite, profile report), per-node state,
background jobs, the choice of scorer, and the retrieval of the prompt for a query.

The optimization job is ``optimize.OptimizationJob``; the candidate prompts ``proposals.Proposals``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from persona_mw import hookimpl
from persona_mw.context import PluginContext
from persona_mw.budget import DEFAULT_CALLS_PER_JOB, AuxBudget, job_budget
from persona_mw.nodes import is_group, kind_of, name_of, scope_node, user_node, user_of
from persona_mw.types import Message, Profile, Turn

from .optimize import OptimizationJob
from .proposals import Proposals
from .report import prompt_reports
from .scoring import Example, JudgeScorer, WhiteBoxScorer, paired_z, place
from .settings import Config as FermiConfig
from .terms import _cos, _vec

log = logging.getLogger("persona_mw.fermi")


class Fermi(Proposals):
    """Per-node prompts optimized online from choices; the best one for the query goes into the prompt."""

    # Feedback kinds this plugin uses (Middleware warns about events no configured plugin uses).
    feedback_kinds = ("choice", "edit", "stated")

    Config = FermiConfig

    def __init__(self, config: FermiConfig | None = None, name: str = "fermi") -> None:
        self.config = config or self.Config()
        self.name = name
        self._mw: Any = None
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self.scorer_override: Any = None  # for tests and the eval harness

    @hookimpl
    def persona_startup(self, ctx: PluginContext) -> None:
        self._mw = ctx

    # -- state --------------------------------------------------------------------------------

    def state_of(self, prof: Profile | None) -> dict[str, Any]:
        if prof is None:
            return {}
        st: dict[str, Any] = prof.extra.get(self.name) or {}
        return st

    def _state(self, prof: Profile) -> dict[str, Any]:
        st: dict[str, Any] = prof.extra.setdefault(self.name, {})
        for k, v in (("seen", 0), ("prompts", []), ("best", None), ("history", []), ("examples", []),
                     ("errors", []), ("jobs", 0)):
            st.setdefault(k, v)
        return st

    # -- learning -----------------------------------------------------------------------------

    @hookimpl
    async def persona_feedback(self, event: Any) -> None:
        if event.kind not in ("choice", "edit"):
            return
        mw = self._mw
        if mw is None:
            return
        nodes = [scope_node(event.user, event.context)]
        if self.config.groups:
            nodes += [e.dst for e in mw.store.edges_from(user_node(event.user))
                      if e.kind == "member" and is_group(e.dst)]
        for node in nodes:
            seen: dict[str, int] = {}

            def count(prof: Profile) -> None:
                st = self._state(prof)
                st["seen"] = seen["n"] = int(st["seen"]) + 1

            mw.update_profile(node, count)
            if seen["n"] % self.config.every:
                continue
            if self.config.background:
                self.request_optimization(node)
            else:
                await self.optimize(node)

    def request_optimization(self, node: str) -> bool:
        """Schedule a background job for ``node``; one per node at a time (a request meanwhile reruns it once)."""
        with self._lock:
            if node in self._running:
                self._again.add(node)
                return False
            self._running.add(node)
        self._mw.schedule(self._job(node))
        return True

    async def _job(self, node: str) -> None:
        try:
            while True:
                try:
                    await self.optimize(node)
                except Exception as exc:  # off the request path: record, never raise
                    log.exception("fermi optimization of %s failed", node)
                    self._record_error(node, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    if node not in self._again:
                        self._running.discard(node)
                        return
                    self._again.discard(node)
        finally:
            with self._lock:
                self._running.discard(node)

    def _record_error(self, node: str, error: str) -> None:
        def put(prof: Profile) -> None:
            st = self._state(prof)
            st["errors"] = (st["errors"] + [{"at": time.time(), "error": error[:300]}])[-10:]

        self._mw.update_profile(node, put)

    def examples_for(self, node: str) -> list[Example]:
        """The node's recorded choices (edits count as after-over-before), newest ``max_examples``."""
        store = self._mw.store
        kind = kind_of(node)  # exact: user 'ana@x.org' is a user, not a context node
        if kind == "group":
            users = [user_of(e.src) or "" for e in store.edges_to(node) if e.kind == "member"
                     and kind_of(e.src) == "user"]
            context = None
        elif kind in ("user", "user_context"):
            users, context = [user_of(node) or ""], name_of(node)
        else:
            return []
        out: list[Example] = []
        for u in users:
            for ev in store.list_feedback(user=u, kinds=["choice", "edit"]):
                if context is not None and ev.context != context:
                    continue
                if kind == "user" and ev.context:
                    continue  # a user-in-context choice belongs to that node
                if ev.kind == "choice":
                    out.append(Example(ev.id, ev.prompt, ev.chosen, list(ev.rejected)[: self.config.max_rejected], u))
                else:
                    out.append(Example(ev.id, ev.prompt, ev.after, [ev.before], u))
        out.sort(key=lambda e: e.id)
        return out[-self.config.max_examples:] if len(out) > self.config.max_examples else out

    def scorer(self) -> Any:
        if self.scorer_override is not None:
            return self.scorer_override
        backend = self._mw.backend()
        white = bool(getattr(getattr(backend, "capabilities", None), "white_box", False)) and hasattr(backend, "call")
        if self.config.scorer == "whitebox" or (self.config.scorer == "auto" and white):
            return WhiteBoxScorer(backend, self.config.placement, self.config.max_response_tokens)
        return JudgeScorer(self._mw.backend(self.config.judge_role), self.name, self.config.judge_pairs)

    # -- optimizing (the job's steps: optimize.OptimizationJob) ---------------------------------

    async def optimize(self, node: str, *, budget: AuxBudget | None = None) -> dict[str, Any]:
        """One optimization job for ``node``: score memory and new proposals, keep the best.

        Returns a summary (also appended to the node's ``history``).
        """
        mw = self._mw
        if budget is None:
            budget = job_budget(self._calls_per_job(), self.config.job_seconds)
        examples = self.examples_for(node)
        prof = mw.store.get_profile(node)
        summary: dict[str, Any] = {"at": time.time(), "examples": len(examples), "proposed": 0, "accepted": False,
                                   "errors": []}
        if not examples:
            summary["note"] = "no choices to score on"
            return summary
        return await OptimizationJob(self, node, examples, prof, budget, summary).run()

    def _calls_per_job(self) -> int:
        """``max_aux_calls``, else the config's ``budget.aux_calls_per_job``."""
        calls = self.config.max_aux_calls
        if calls is None:
            calls = getattr(getattr(getattr(self._mw, "config", None), "budget", None), "aux_calls_per_job",
                            DEFAULT_CALLS_PER_JOB)
        return int(calls)

    def _misaligned_record(self, node: str, ex: Example) -> dict[str, Any]:
        if is_group(node):
            return {"id": ex.id}
        return {"id": ex.id, "query": ex.query[:200], "chosen": ex.chosen[:200], "rejected": ex.rejected[0][:200]}

    # -- per turn -----------------------------------------------------------------------------

    def pick(self, prof: Profile, query: str) -> tuple[dict[str, Any] | None, str]:
        """The memory prompt for ``query``: best margin on the most similar recorded queries, else the node's best."""
        st = self.state_of(prof)
        prompts = [p for p in st.get("prompts", []) if "score" in p]
        best = next((p for p in prompts if p["id"] == st.get("best")), None)
        if best is None:
            return None, "no prompt yet"
        exs = [e for e in st.get("examples", []) if e.get("query")]
        if self.config.retrieve_k and exs and query:
            qv = _vec(query)
            sims = sorted(((_cos(qv, _vec(e["query"])), e["id"]) for e in exs), reverse=True)
            near = [i for s, i in sims[: self.config.retrieve_k] if s >= self.config.min_similarity]
            if near:
                # A few similar queries are a noisy estimate: shrink it toward the prompt's node-wide
                # score (``retrieve_prior`` pseudo-examples), so only a clear local lead switches prompts.
                prior = self.config.retrieve_prior

                def on_near(p: dict[str, Any]) -> float:
                    pe, held = p.get("per_example", {}), set(p.get("exclude", ()))
                    want = [i for i in near if i not in held]
                    vals = [pe[i][0] for i in want if i in pe]
                    if len(vals) != len(want):
                        return -math.inf
                    return float((sum(vals) + prior * float(p.get("score", 0.0))) / (len(vals) + prior))

                top = max(prompts, key=lambda p: (on_near(p), p["id"] == best["id"]))
                # The same standard as replacing the node's prompt: clearly better on those queries.
                z, _ = paired_z(top, best, near)
                if on_near(top) > -math.inf and on_near(top) > on_near(best) and z >= self.config.min_z:
                    return top, (f"best on {len(near)} similar recorded queries (margin {on_near(top):+.3f} vs "
                                 f"{on_near(best):+.3f}, shrunk toward the node-wide scores; z {z:.2f})")
        return best, f"node's best (score {best['score']:+.3f}, accuracy {best['acc']:.2f} on {best.get('n', 0)} choices)"

    @hookimpl
    def persona_rewrite(self, turn: Turn, messages: list[Message]) -> list[Message] | None:
        if turn.scope is None:
            return None
        query = next((m.text for m in reversed(messages) if m.role == "user"), "")
        kinds = ("user_context", "user", "group") if self.config.groups else ("user_context", "user")
        chosen: list[tuple[float, str, dict[str, Any], str]] = []
        for node in sorted(turn.scope.nodes, key=lambda n: -n.weight):
            if node.kind not in kinds:
                continue
            prof = turn.profiles.get(node.id)
            if prof is None or not self.state_of(prof).get("best"):
                continue
            entry, why = self.pick(prof, query)
            if entry is None or not entry.get("text"):
                continue
            chosen.append((node.weight, node.id, entry, why))
        if not chosen:
            turn.note("no optimized prompt in scope")
            return None
        total = sum(w for w, *_ in chosen) or 1.0
        used = [c for c in chosen if c[0] / total >= self.config.min_share][:2] or chosen[:1]
        texts: list[str] = []
        for w, node_id, entry, why in used:
            if entry["text"] not in texts:
                texts.append(entry["text"])
            turn.trace.items_used.append({"source": self.name, "kind": "prompt", "node": node_id, "prompt_id": entry["id"],
                                          "prompt_source": entry.get("source"), "score": entry.get("score"),
                                          "accuracy": entry.get("acc"), "weight": round(w, 4), "why": why,
                                          "text": entry["text"]})
        turn.note("; ".join(f"{nid} prompt {e['id']} ({e.get('source')}, {why})" for _, nid, e, why in used)
                  + f" in {self.config.placement}")
        return place(messages, self._clip(" ".join(texts)), self.config.placement)

    @hookimpl
    def persona_profile_report(self, user: str, profiles: dict[str, Any]) -> dict[str, Any] | None:
        """``profile show``'s "prompts": the optimized prompts of every fermi entry, reported by the first one."""
        plugins = self._mw.plugins() if self._mw is not None else [(self.name, self)]
        first = next((inst for _, inst in plugins if isinstance(inst, Fermi)), None)
        if first is not self:
            return None
        prompts = prompt_reports(plugins, profiles)
        return {"prompts": prompts} if prompts else None
