"""``persona-mw db copy``: move a whole deployment from one store to another (SQLite -> Postgres).

Every table of ``COPY_TABLES`` is copied row for row (feedback keeps its sequence numbers, the
forget salt travels so forget epochs keep their meaning), then every user's ``export_user`` is
compared between the two stores: the copy is reported good only when all of them are equal.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from persona_mw.errors import StoreError
from persona_mw.store import COPY_TABLES, Store, user_of_node

_USER_COLUMN = {"feedback": "user", "traces": "user", "jobs": "user"}


def _is_empty(store: Store) -> bool:
    return not (store.list_nodes(limit=1) or store.list_feedback(limit=1) or store.list_jobs())


def copy_store(source: Store, target: Store, *, check: bool = True,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Copy everything from ``source`` into the empty ``target``; with ``check``, compare each user's
    export in both. Returns rows per table, users checked, the users whose exports differ, timings."""
    if not _is_empty(target):
        raise StoreError(f"the target store {target!r} is not empty",
                         hint="copy into a fresh database or schema (db copy never merges)")
    users: set[str] = set()
    rows: dict[str, int] = {}
    t0 = time.perf_counter()

    def track(table: str, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in it:
            if table == "nodes":
                u = user_of_node(str(row["id"]))
                if u is not None:
                    users.add(u)
            elif table in _USER_COLUMN:
                users.add(str(row[_USER_COLUMN[table]]))
            yield row

    for table in COPY_TABLES:
        rows[table] = target.load_table(table, track(table, source.dump_table(table)))
        if log:
            log(f"db copy: {table}: {rows[table]} rows")
    copied_s = time.perf_counter() - t0
    mismatched: list[str] = []
    if check:
        for user in sorted(users):
            if source.export_user(user) != target.export_user(user):
                mismatched.append(user)
        if log:
            log(f"db copy: compared {len(users)} users' exports, {len(mismatched)} differ")
    total = sum(rows.values())
    return {"rows": rows, "rows_total": total, "users_checked": len(users) if check else 0,
            "mismatched_users": mismatched, "copy_s": round(copied_s, 3),
            "rows_per_s": round(total / copied_s, 1) if copied_s > 0 else None,
            "check_s": round(time.perf_counter() - t0 - copied_s, 3)}


__all__ = ["copy_store"]
