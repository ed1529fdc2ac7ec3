"""``persona-mw eval locomo|prefeval``: argument parsing and output for the memory evaluations."""

from __future__ import annotations

import sys
from typing import Any

from persona_mw.errors import PersonaError
from persona_mw.eval.common import print_table, write_result


def _csv(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    return items or None


def run_memory_eval(benchmark: str, data: str, out: str | None = None, **options: Any) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    extra: dict[str, Any] = {}
    if benchmark == "locomo":
        from persona_mw.eval import locomo

        convs = _csv(options.get("conversations"))
        store = options.get("store")
        folds = options.get("folds")
        cv: dict[str, Any] = {}
        metrics = locomo.run(data, conversations=convs, log=log, store=store, folds=folds, cv=cv)
        cfg = {**locomo.config(), "conversations": convs or "all", "folds": folds}
        if cv:
            cfg["select"] = f"per fold, the grid setting with the best {locomo.SELECT} on the other folds' questions"
            extra.update(cv)
        if store:
            from persona_mw.store import is_postgres_url
            from persona_mw.store.postgres import redact_dsn

            cfg["store"] = redact_dsn(store.split("#", 1)[0]) if is_postgres_url(store) else store
    else:
        from persona_mw.eval import prefeval

        try:
            turns = [int(t) for t in (_csv(options.get("turns")) or [str(n) for n in prefeval.TURNS])]
        except ValueError as exc:
            raise PersonaError(f"--turns: expected comma-separated integers, got {options.get('turns')!r}") from exc
        forms = _csv(options.get("forms")) or list(prefeval.FORMS)
        limit = options.get("limit")
        if limit is not None and limit < 1:
            raise PersonaError("--limit: expected a positive number of items per topic")
        topics = _csv(options.get("topics"))
        seed = int(options.get("seed") or 0)
        baselines = options.get("baselines", True) is not False
        misses: list[dict[str, Any]] = []
        metrics = prefeval.run(data, topics=topics, turns=turns, forms=forms, limit=limit, seed=seed,
                               backend=options.get("backend"), log=log, baselines=baselines, misses=misses)
        cfg = prefeval.config(topics=topics or "all", turns=turns, forms=forms, limit=limit, seed=seed,
                              backend=options.get("backend"), baselines=baselines)
        extra["recall_misses"] = misses
    print_table(benchmark, metrics)
    write_result(out, benchmark, data, cfg, metrics, extra)
    if out:
        log(f"wrote {out}")
    return 0
