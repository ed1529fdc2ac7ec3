"""``persona-mw eval prefeval``: does a preference survive N unrelated turns? (Zhao et al., ICLR 2025)

Protocol, per item, form and N (fixed seed): a fresh user in a fresh store; the preference turn(s) are
fed as the ``memory`` plugin would feed them (``mw.memory.add_raw`` for the user's messages, as with
``store_turns``, then ``mw.memory.ingest`` for extraction): the explicit statement, or the implicit
choice-based conversation (query, options, the user's selection, acknowledgment), or the
persona-driven conversation; then the first N (user, assistant) pairs of ``filtered_inter_turns``;
then the question goes through ``mw.chat`` with the four ``mcq_options`` shuffled (seeded) as the
candidates, and the ``rerank`` plugin picks one with the ``preference_fit`` reward (local scorers),
or the ``judge`` reward on ``--backend`` (any litellm model).

- ``acc/<form>@N<n>``: the picked option is the one that follows the preference (the file's first).
- ``pref_recall/<form>@N<n>``: the final prompt held a memory whose provenance includes a
  preference-bearing message (read from the trace's ``items_used``).
- ``:no_memory``: the same pipeline without the memory plugin (nothing to read: every option ties; ties
  count as a random pick, 1/k; N changes nothing, so it runs once per form).
- ``:random``: the expected accuracy of a random pick, 0.25.
- ``:bm25_top5``: retrieval-only memory (no extraction, no pinning; the 5 best turns by BM25), as
  upstream's retriever baseline.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict

from persona_mw import hookimpl
from persona_mw.errors import PersonaError
from persona_mw.eval.common import read_json
from persona_mw.types import Candidate, Turn

FORMS = ("explicit", "choice", "persona")
TURNS = (0, 10, 100, 300)
_FOLDERS = {"explicit": "explicit_preference", "choice": "implicit_preference/choice-based",
            "persona": "implicit_preference/persona-driven"}


# ----------------------------------------------------------------------------------- data




def _root(data: str | Path) -> Path:
    root = Path(data)
    if (root / "benchmark_dataset").is_dir():
        root = root / "benchmark_dataset"
    if not (root / "mcq_options").is_dir():
        raise PersonaError(f"no PrefEval data under {str(data)!r}",
                           hint="expected benchmark_dataset/mcq_options/<topic>.json.gz and the preference folders")
    return root


def _topic_file(folder: Path, topic: str) -> Path | None:
    for name in (f"{topic}.json.gz", f"{topic}.json"):
        if (folder / name).exists():
            return folder / name
    return None


def load(data: str | Path, topics: Sequence[str] | None = None, forms: Sequence[str] = FORMS,
         limit: int | None = None) -> list[dict[str, Any]]:
    """Items ``{topic, index, preference, question, options, conversation: {form: ...}}`` (``limit`` per topic)."""
    root = _root(data)
    known = sorted(p.name.split(".")[0] for p in (root / "mcq_options").glob("*.json*"))
    if topics:
        missing = [t for t in topics if t not in known]
        if missing:
            raise PersonaError(f"--topics: unknown {', '.join(missing)} (known: {', '.join(known)})")
        known = [t for t in known if t in topics]
    bad = [f for f in forms if f not in FORMS]
    if bad:
        raise PersonaError(f"--forms: unknown {', '.join(bad)} (known: {', '.join(FORMS)})")
    items: list[dict[str, Any]] = []
    for topic in known:
        mcq_file = _topic_file(root / "mcq_options", topic)
        mcq = read_json(mcq_file) if mcq_file else []
        per_form: dict[str, list[Any]] = {}
        for form in forms:
            f = _topic_file(root / _FOLDERS[form], topic)
            if f is None:
                raise PersonaError(f"{root / _FOLDERS[form]}: no file for topic {topic!r}")
            per_form[form] = read_json(f)
        for i, m in enumerate(mcq[: limit or None]):
            opts = m.get("classification_task_options") if isinstance(m, dict) else None
            if not (isinstance(opts, list) and len(opts) >= 2 and all(isinstance(o, str) and o for o in opts)):
                raise PersonaError(f"{mcq_file}: item {i} has no usable classification_task_options")
            conv: dict[str, Any] = {}
            for form, rows in per_form.items():
                if i >= len(rows) or not isinstance(rows[i], dict):
                    raise PersonaError(f"{root / _FOLDERS[form]}/{topic}: item {i} is missing")
                conv[form] = rows[i].get("preference") if form == "explicit" else rows[i].get("conversation")
                if not conv[form]:
                    raise PersonaError(f"{root / _FOLDERS[form]}/{topic}: item {i} has no "
                                       f"{'preference' if form == 'explicit' else 'conversation'}")
            items.append({"topic": topic, "index": i, "preference": m.get("preference", ""),
                          "question": m.get("question", ""), "options": opts, "conversation": conv})
    if not items:
        raise PersonaError(f"no PrefEval items under {str(data)!r}")
    return items


def distractors(data: str | Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` (user, assistant) pairs of ``filtered_inter_turns``, as messages with ids ``d<j>u/a``."""
    if n <= 0:
        return []
    root = _root(data)
    f = _topic_file(root, "filtered_inter_turns")
    if f is None:
        raise PersonaError(f"{root}: no filtered_inter_turns.json(.gz) for the distractor turns")
    pairs: list[tuple[str, str]] = []
    for conv in read_json(f):
        msgs = conv.get("conversation", []) if isinstance(conv, dict) else []
        for a, b in zip(msgs[::2], msgs[1::2]):
            if a.get("role") == "user" and b.get("role") == "assistant":
                pairs.append((str(a.get("content") or ""), str(b.get("content") or "")))
    if len(pairs) < n:
        raise PersonaError(f"{f}: {len(pairs)} distractor turns, fewer than the {n} asked for")
    out: list[dict[str, Any]] = []
    for j, (u, a) in enumerate(pairs[:n]):
        out += [{"role": "user", "content": u, "id": f"d{j}u"}, {"role": "assistant", "content": a, "id": f"d{j}a"}]
    return out


def preference_messages(item: dict[str, Any], form: str) -> list[dict[str, Any]]:
    """The preference-bearing turn(s) of one form, with ids ``p<j>``."""
    conv = item["conversation"][form]
    if form == "explicit":
        return [{"role": "user", "content": str(conv), "id": "p0"}]
    if form == "choice":
        parts = [("user", conv.get("query")), ("assistant", conv.get("assistant_options")),
                 ("user", conv.get("user_selection")), ("assistant", conv.get("assistant_acknowledgment"))]
        return [{"role": r, "content": str(t), "id": f"p{j}"} for j, (r, t) in enumerate(parts) if t]
    out: list[dict[str, Any]] = []
    for j, key in enumerate(sorted(conv, key=lambda k: int(k) if str(k).isdigit() else 0)):
        turn = conv[key]
        if isinstance(turn, dict):
            for r in ("user", "assistant"):
                if turn.get(r):
                    out.append({"role": r, "content": str(turn[r]), "id": f"p{j}{r[0]}"})
    return out


# ----------------------------------------------------------------------------------- pipeline


class OptionCandidates:
    """Serves ``request.metadata["candidates"]`` as the turn's candidates (for ranking given answers)."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Config | None = None, name: str = "options") -> None:
        self.config, self.name = config or self.Config(), name

    @hookimpl
    def persona_generate(self, turn: Turn, backend: Any, messages: Any, n: int,
                         decoding: Any) -> list[Candidate] | None:
        opts = turn.request.metadata.get("candidates")
        if not opts:
            return None
        return [Candidate(text=str(o), index=i) for i, o in enumerate(opts)]


def _pipeline(variant: str, backend: str | None) -> dict[str, Any]:
    rerank: dict[str, Any] = {"use": "rerank", "n": 4, "rewards": {"judge" if backend else "preference_fit": 1.0}}
    memory: dict[str, Any] = {"use": "memory", "store_turns": True}
    if variant == "bm25_top5":
        memory.update(extract=False, pinned_budget_tokens=0, top_k=5, mode="bm25", budget_tokens=8000)
    steps = ([] if variant == "no_memory" else [memory]) + [{"use": "options"}, rerank]
    cfg: dict[str, Any] = {"pipeline": steps}
    if backend:
        cfg["roles"] = {"judge": {"type": "litellm", "model": backend}}
    return cfg


def run_item(item: dict[str, Any], form: str, turns: list[dict[str, Any]], *, variant: str, seed: int,
             backend: str | None = None) -> tuple[float, bool]:
    """One item through a fresh middleware on a fresh store; returns ``(correct, preference in prompt)``,
    ``correct`` in [0, 1]: 1/k when the right option ties with k-1 others for the best score."""
    from persona_mw.config import parse_config
    from persona_mw.eval.common import _NoBackend
    from persona_mw.middleware import Middleware

    pref = preference_messages(item, form)
    order = list(range(len(item["options"])))
    random.Random(f"{seed}:{item['topic']}:{item['index']}").shuffle(order)
    options = [item["options"][j] for j in order]
    with tempfile.TemporaryDirectory(prefix="persona-mw-prefeval-") as tmp:
        cfg = parse_config(json.dumps(_pipeline(variant, backend)), "<eval prefeval>")
        cfg.store.path = str(Path(tmp) / "prefeval.db")
        cfg.trace.store = False
        mw = Middleware(cfg, backend=_NoBackend(), plugins={"options": OptionCandidates}, autoload=False)
        try:
            user = "u"
            if variant != "no_memory":
                history = pref + turns
                mw.memory.add_raw(user, [m for m in history if m["role"] == "user"])
                if variant != "bm25_top5":
                    mw.memory.ingest(user, history)
            reply = mw.chat(user=user, messages=[{"role": "user", "content": item["question"]}],
                            metadata={"candidates": options})
            right = order.index(0)
            total = next((v for k, v in reply.trace.scores.items() if k.endswith(":total")), None)
            if total and len(total) == len(options):
                # a tie is broken at random: credit the expected accuracy, not the first candidate's luck
                tied = [i for i, x in enumerate(total) if x == max(total)]
                correct = 1.0 / len(tied) if right in tied else 0.0
            else:
                correct = float(reply.trace.selected == right)
            ids = {m["id"] for m in pref}
            recalled = any(ids & set(u.get("provenance") or []) for u in reply.trace.items_used)
        finally:
            mw.close()
    return correct, recalled


def run(data: str | Path, *, topics: Sequence[str] | None = None, turns: Sequence[int] = TURNS,
        forms: Sequence[str] = FORMS, limit: int | None = None, seed: int = 0, backend: str | None = None,
        baselines: bool = True, log: Callable[[str], None] | None = None,
        misses: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """``misses``: when given, gets one ``{form, turns, topic, index}`` per item whose preference-bearing
    message did not reach the final prompt (the items behind ``pref_recall`` < 1)."""
    items = load(data, topics, forms, limit)
    if any(n < 0 for n in turns):
        raise PersonaError("--turns: numbers of distractor turns must be >= 0")
    hists = {n: distractors(data, n) for n in turns}  # checked before any item runs
    metrics: dict[str, float] = {}
    variants = ["memory"] + (["bm25_top5"] if baselines else [])
    for form in forms:
        if baselines:
            acc = [run_item(it, form, [], variant="no_memory", seed=seed, backend=backend)[0] for it in items]
            for n in turns:
                metrics[f"acc/{form}@N{n}:no_memory"] = sum(acc) / len(acc)
                metrics[f"pref_recall/{form}@N{n}:no_memory"] = 0.0
                metrics[f"acc/{form}@N{n}:random"] = 1.0 / len(items[0]["options"])
        for n in turns:
            hist = hists[n]
            for variant in variants:
                rows = [run_item(it, form, hist, variant=variant, seed=seed, backend=backend) for it in items]
                if misses is not None and variant == "memory":
                    misses += [{"form": form, "turns": n, "topic": it["topic"], "index": it["index"], "correct": r[0]}
                               for it, r in zip(items, rows) if not r[1]]
                suffix = "" if variant == "memory" else f":{variant}"
                metrics[f"acc/{form}@N{n}{suffix}"] = sum(r[0] for r in rows) / len(rows)
                metrics[f"pref_recall/{form}@N{n}{suffix}"] = sum(r[1] for r in rows) / len(rows)
            if log:
                log(f"prefeval: {form} N={n}: acc {metrics[f'acc/{form}@N{n}']:.3f} "
                    f"pref_recall {metrics[f'pref_recall/{form}@N{n}']:.3f} ({len(items)} items)")
    metrics["items"] = float(len(items))
    return metrics


def config(**options: Any) -> dict[str, Any]:
    return {"pipeline": _pipeline("memory", options.get("backend")),
            "baselines": {v: _pipeline(v, options.get("backend")) for v in ("no_memory", "bm25_top5")},
            "distractors": "the first N (user, assistant) pairs of filtered_inter_turns, in file order",
            **{k: v for k, v in options.items() if v is not None}}
