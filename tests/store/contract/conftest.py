"""One fixture, every store: the contract tests run unchanged against each implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from persona_mw.store import Store, open_store

from ...conftest import fresh_pg_url

KINDS = ("sqlite", "postgres")


@pytest.fixture(params=KINDS)
def store_kind(request: Any) -> str:
    return str(request.param)


@pytest.fixture
def open_same(store_kind: str, tmp_path: Path, request: Any) -> Iterator[Callable[[], Store]]:
    """``open_same()`` opens another store object (another connection / pool) on the same data."""
    if store_kind == "sqlite":
        url = str(tmp_path / "contract.db")
    else:
        url = fresh_pg_url(request.getfixturevalue("pg_server"), "contract")
    opened: list[Store] = []

    def make() -> Store:
        s = open_store(url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
    if store_kind == "postgres":
        last = open_store(url)
        last.drop_schema()  # type: ignore[attr-defined]
        last.close()


@pytest.fixture
def store(open_same: Callable[[], Store]) -> Store:
    return open_same()
