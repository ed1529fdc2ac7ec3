"""``persona-mw eval locomo``: retrieval over long conversations (Maharana et al. 2024), through provenance.

Recipe: each conversation gets a fresh user on a throwaway store; its sessions are fed in order, as
the ``memory`` plugin with ``store_turns`` would (``mw.memory.add_raw``: every turn verbatim, its
``dia_id`` as message id, the speaker's name and the session date; then ``mw.memory.ingest``: the
extracted facts/preferences, whose provenance is the same ids). Each question is then searched
(``mw.memory.search``) and ``R@k`` is the fraction of its evidence ``dia_id``s found in the provenance of
the top ``k`` memories, averaged over questions (overall and per category). The headline numbers are
``MemoryManager.search`` in its default mode (``fused``, what the ``memory`` plugin ships: each memory
indexed alone and each stored turn also with its session neighbours, BM25 and MiniLM, z-normalized score
fusion); baselines on the same store, through the other modes: ``:hybrid`` (RRF of BM25 and dense over
single memories), ``:bm25``, ``:dense``.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from persona_mw.errors import PersonaError
from persona_mw.eval.common import read_json

KS = (5, 10, 25)
MODES = ("fused", "hybrid", "bm25", "dense")  # the first is the headline (no suffix): the product's default
# LoCoMo's category ids (not the paper's order).
CATEGORIES = {4: "single-hop", 1: "multi-hop", 2: "temporal", 3: "open-domain", 5: "adversarial"}
# The second hop's settings tried by ``--folds`` (persona_mw.memory.hops.HopSettings); the first is "off".
_PRF = ((0, 0.0), (1, 0.5), (3, 0.25), (3, 0.5), (3, 1.0), (5, 0.5), (5, 1.0))  # (prf_k, prf_weight)
# (focus_weight, list_penalty), outermost: the settings without them come first and win ties.
_FOCUS = tuple((fw, lp) for fw in (0.0, 2.0, 4.0, 8.0) for lp in (0.0, 0.5))
GRID: tuple[dict[str, Any], ...] = tuple(
    {"prf_k": n, "prf_weight": w, "link_weight": lw, "speaker_weight": sw, "session_penalty": p,
     **({"focus_weight": fw} if fw else {}), **({"list_penalty": lp} if lp else {})}
    for fw, lp in _FOCUS for n, w in _PRF for lw in (0.0, 0.5) for sw in (0.0, 0.25, 0.5, 1.0) for p in (0.0, 0.1)
    if n or not lw)
SELECT = "R@10"  # what the inner selection maximises on the training folds

def load(data: str | Path, conversations: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The conversations of a LoCoMo file or folder (``locomo10.json[.gz]``), optionally by ``sample_id``."""
    root = Path(data)
    files = (sorted(root.glob("*.json.gz")) + sorted(root.glob("*.json"))) if root.is_dir() else [root]
    convs: list[dict[str, Any]] = []
    for f in files:
        raw = read_json(f)
        if isinstance(raw, dict):
            raw = [raw]
        if isinstance(raw, list):
            convs += [c for c in raw if isinstance(c, dict) and isinstance(c.get("conversation"), dict)
                      and isinstance(c.get("qa"), list)]
    if not convs:
        raise PersonaError(f"no LoCoMo conversations under {str(data)!r}",
                           hint="expected locomo10.json(.gz): a list of {sample_id, conversation, qa}")
    for i, c in enumerate(convs):
        c.setdefault("sample_id", f"conv-{i}")
    if conversations:
        want = [str(x) for x in conversations]
        known = [str(c["sample_id"]) for c in convs]
        missing = [w for w in want if w not in known]
        if missing:
            raise PersonaError(f"--conversations: unknown {', '.join(missing)} (known: {', '.join(known)})")
        convs = [c for c in convs if str(c["sample_id"]) in want]
    return convs


def sessions(conv: dict[str, Any]) -> list[tuple[int, str | None, list[dict[str, Any]]]]:
    """``(number, date text, turns)`` for each session, in order; a turn is a message dict with ``id``."""
    body = conv["conversation"]
    out = []
    for key, turns in body.items():
        m = re.fullmatch(r"session_(\d+)", key)
        if not m or not isinstance(turns, list):
            continue
        n = int(m.group(1))
        date = body.get(f"session_{n}_date_time")
        msgs = []
        for t in turns:
            if not isinstance(t, dict) or not t.get("dia_id"):
                continue
            text = str(t.get("text") or "")
            if t.get("blip_caption"):  # a shared photo: its caption is what the turn says
                text = f"{text} [shares a photo: {t['blip_caption']}]".strip()
            if text:
                msgs.append({"role": "user", "content": text, "id": str(t["dia_id"]), "speaker": t.get("speaker")})
        out.append((n, str(date) if date else None, msgs))
    return sorted(out, key=lambda s: s[0])


def evidence_ids(qa: dict[str, Any]) -> list[str]:
    """The evidence dia_ids of a question ("D1:3"; some upstream entries pack several in one string)."""
    out: list[str] = []
    for e in qa.get("evidence") or []:
        out += re.findall(r"D\d+:\d+", str(e))
    return list(dict.fromkeys(out))


def recall(evidence: Iterable[str], ranked_provenance: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of ``evidence`` ids among the provenance of the first ``k`` ranked memories."""
    ev = set(evidence)
    if not ev:
        return 0.0
    found: set[str] = set()
    for prov in ranked_provenance[:k]:
        found.update(prov)
    return len(ev & found) / len(ev)


def _middleware(tmp: str, store: str | None = None) -> Any:
    from persona_mw.config import parse_config
    from persona_mw.eval.common import _NoBackend
    from persona_mw.middleware import Middleware

    cfg = parse_config(json.dumps({"pipeline": [{"use": "memory", "store_turns": True, "store_answers": True}]}),
                       "<eval locomo>")
    cfg.store.path = store or str(Path(tmp) / "locomo.db")
    cfg.trace.store = False
    return Middleware(cfg, backend=_NoBackend(), autoload=False)


def run(data: str | Path, *, conversations: Sequence[str] | None = None, ks: Sequence[int] = KS,
        modes: Sequence[str] = MODES, log: Any = None, store: str | None = None, folds: int | None = None,
        grid: Sequence[dict[str, Any]] = GRID, cv: dict[str, Any] | None = None) -> dict[str, float]:
    """``store``: a store URL to run through (a ``postgresql://`` DSN gets a fresh schema, dropped after);
    default: a SQLite file in a temporary folder. With a store, the baselines are also run as
    ``<mode>@store``: candidates from ``Store.vector_search``/``text_search`` (pgvector HNSW and
    full-text GIN on Postgres; exact scan and BM25 on SQLite), fused as in process."""
    if store is not None and tuple(modes) == MODES:
        # through a store: also each baseline with candidates from the store's own indexes (":hybrid@store")
        modes = (*MODES, *(f"{m}@store" for m in MODES[1:]))
    convs = load(data, conversations)
    kmax = max(ks)
    per_mode: dict[str, list[tuple[int, dict[int, float]]]] = {m: [] for m in modes}
    if folds is not None and (folds < 2 or folds > 50):
        raise PersonaError(f"--folds: expected 2 to 50 folds, got {folds}")
    # --folds: (conversation, question, category, {k: recall}) per question, for every grid setting
    per_setting: list[list[tuple[int, int, int, dict[int, float]]]] = [[] for _ in grid] if folds else []
    with tempfile.TemporaryDirectory(prefix="persona-mw-locomo-") as tmp:
        url = store
        if store is not None:
            from persona_mw.store import is_postgres_url

            if is_postgres_url(store):
                import secrets

                sep = "&" if "#" in store else "#"
                url = f"{store}{sep}schema=locomo_{secrets.token_hex(4)}"
        mw = _middleware(tmp, url)
        try:
            mem = mw.memory
            for ci, conv in enumerate(convs):
                user = f"locomo-{ci}"
                for _, date, msgs in sessions(conv):
                    if msgs:
                        mem.add_raw(user, msgs, session_date=date)
                        mem.ingest(user, msgs, session_date=date)
                qas = [q for q in conv["qa"] if isinstance(q, dict) and q.get("question") and evidence_ids(q)]
                for mode in modes:
                    # "<mode>@store": the same mode with candidates from the store's own indexes
                    base_mode, _, served = mode.partition("@")
                    mem.store_search = served == "store"
                    for q in qas:
                        hits = mem.search(user, str(q["question"]), k=kmax, mode=base_mode)
                        prov = [h.memory.provenance for h in hits]
                        ev = evidence_ids(q)
                        per_mode[mode].append((int(q.get("category", 0)), {k: recall(ev, prov, k) for k in ks}))
                mem.store_search = False
                if folds:
                    _grid_rows(mem, user, ci, qas, grid, ks, per_setting)
                if log:
                    log(f"locomo: {conv['sample_id']}: {len(qas)} questions")
        finally:
            if url != store:  # the fresh Postgres schema made for this run
                from persona_mw.store.postgres import PostgresStore

                if isinstance(mw.store, PostgresStore):
                    mw.store.drop_schema()
            mw.close()
    metrics: dict[str, float] = {}
    for mode, rows in per_mode.items():
        suffix = "" if mode == MODES[0] else f":{mode}"
        if not rows:
            continue
        for k in ks:
            metrics[f"R@{k}{suffix}"] = sum(r[k] for _, r in rows) / len(rows)
        for cat, name in CATEGORIES.items():
            sub = [r for c, r in rows if c == cat]
            if sub:
                for k in ks:
                    metrics[f"R@{k}/{name}{suffix}"] = sum(r[k] for r in sub) / len(sub)
    metrics["questions"] = float(len(per_mode[modes[0]]))
    if folds:
        res = cross_validate(per_setting, grid, folds, ks, len(convs))
        metrics.update(res.pop("metrics"))
        if cv is not None:
            cv.update(res)
    return metrics


def _grid_rows(mem: Any, user: str, ci: int, qas: Sequence[dict[str, Any]], grid: Sequence[dict[str, Any]],
               ks: Sequence[int], out: list[list[tuple[int, int, int, dict[int, float]]]]) -> None:
    """Every question of one conversation searched (mode fused) with every hop setting of the grid. The
    first hop does not depend on the setting: each question's is kept (``first_hop_memo``) and only the
    second hop runs again per setting (the same hits as searching afresh)."""
    mem.first_hop_memo = {}
    try:
        for si, setting in enumerate(grid):
            for qi, q in enumerate(qas):
                hits = mem.search(user, str(q["question"]), k=max(ks), mode="fused", hops=setting)
                prov = [h.memory.provenance for h in hits]
                out[si].append((ci, qi, int(q.get("category", 0)), {k: recall(evidence_ids(q), prov, k) for k in ks}))
    finally:
        mem.first_hop_memo = None


def _summary(rows: Sequence[tuple[int, dict[int, float]]], ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not rows:
        return out
    for k in ks:
        out[f"R@{k}"] = sum(r[k] for _, r in rows) / len(rows)
    for cat, name in CATEGORIES.items():
        sub = [r for c, r in rows if c == cat]
        if sub:
            for k in ks:
                out[f"R@{k}/{name}"] = sum(r[k] for r in sub) / len(sub)
    return out


def fold_of(conv: int, question: int, folds: int, n_convs: int) -> int:
    """Folds over conversations when there are at least ``folds`` of them; else over questions (each
    conversation's questions dealt round-robin, so every fold holds every conversation)."""
    return conv % folds if n_convs >= folds else (question + conv) % folds


def cross_validate(per_setting: Sequence[Sequence[tuple[int, int, int, dict[int, float]]]],
                   grid: Sequence[dict[str, Any]], folds: int, ks: Sequence[int], n_convs: int) -> dict[str, Any]:
    """K-fold CV of the grid: per fold, the setting with the best ``SELECT`` on the other folds' questions
    (ties: the earlier, simpler setting) is scored on the fold's own. Metrics ``cv/<metric>`` (mean over
    folds), ``cv/<metric>:sd`` (their spread) and the same for the first setting (off) as ``:no_hops``."""
    per_fold: list[dict[str, Any]] = []
    for f in range(folds):
        def part(rows: Sequence[tuple[int, int, int, dict[int, float]]], test: bool) -> list[tuple[int, dict[int, float]]]:
            return [(c, r) for ci, qi, c, r in rows if (fold_of(ci, qi, folds, n_convs) == f) == test]

        train = [_summary(part(rows, False), ks).get(SELECT, 0.0) for rows in per_setting]
        best = max(range(len(grid)), key=lambda i: (round(train[i], 9), -i))
        test_rows = part(per_setting[best], True)
        per_fold.append({"fold": f, "questions": len(test_rows), "chosen": dict(grid[best]),
                         f"train_{SELECT}": round(train[best], 4), f"train_{SELECT}_no_hops": round(train[0], 4),
                         "test": {m: round(v, 4) for m, v in _summary(test_rows, ks).items()},
                         "test_no_hops": {m: round(v, 4) for m, v in _summary(part(per_setting[0], True), ks).items()}})
    metrics: dict[str, float] = {}
    for key, suffix in (("test", ""), ("test_no_hops", ":no_hops")):
        names = list(dict.fromkeys(m for pf in per_fold for m in pf[key]))
        for m in names:
            vals = np.asarray([pf[key][m] for pf in per_fold if m in pf[key]])
            metrics[f"cv/{m}{suffix}"] = float(vals.mean())
            metrics[f"cv/{m}:sd{suffix}"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    whole = [_summary([(c, r) for _, _, c, r in rows], ks).get(SELECT, 0.0) for rows in per_setting]
    final = max(range(len(grid)), key=lambda i: (round(whole[i], 9), -i))
    return {"metrics": metrics, "folds": per_fold, "unit": "conversation" if n_convs >= folds else "question",
            "grid": [dict(g) for g in grid], "selected_on_all_dev": dict(grid[final]),
            "grid_all_dev": [{"setting": dict(g), SELECT: round(w, 4)} for g, w in zip(grid, whole)]}


def config() -> dict[str, Any]:
    return {"ingest": "add_raw (every turn, dia_id as id, speaker, session date) + ingest (rule extraction)",
            "search": "MemoryManager.search default mode 'fused' (neighbours=1, z-fusion of BM25/MiniLM over "
                      "memories and turn windows, then the default second hop hops.DEFAULT_HOPS); baselines: "
                      "modes hybrid, bm25, dense", "ks": list(KS), "modes": list(MODES)}
