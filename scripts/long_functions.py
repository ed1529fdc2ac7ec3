"""List functions longer than a limit (default 80 lines).

Usage: python scripts/long_functions.py [--max N] [--allow PATH ...] PATH...

Walks the given files/directories (``*.py``), parses each with ``ast`` and
prints ``path:line name length`` for every function or method whose span
(``def`` line to last line, decorators excluded) exceeds ``--max``.
Exits 1 when any is found outside the allowed files, 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def _py_files(paths: list[str]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if ".venv" not in p.parts)
        elif path.suffix == ".py":
            yield path


def long_functions(path: Path, limit: int) -> list[tuple[int, str, int]]:
    """Return ``(line, qualified name, length)`` for functions over ``limit`` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > limit:
                    found.append((child.lineno, name, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--max", type=int, default=80, dest="limit")
    parser.add_argument("--allow", action="append", default=[], help="file allowed to keep long functions")
    args = parser.parse_args(argv)
    allowed = {Path(p).resolve() for p in args.allow}
    bad = 0
    for path in _py_files(args.paths):
        for line, name, length in long_functions(path, args.limit):
            tag = " (allowed)" if path.resolve() in allowed else ""
            print(f"{path}:{line} {name} {length}{tag}")
            if not tag:
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
