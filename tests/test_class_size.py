"""Issue #14: no class in persona_mw, plugins or adapters defines more than 30 methods in its body."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("persona_mw", "plugins", "adapters")
MAX_METHODS = 30


def _methods(cls: ast.ClassDef) -> int:
    """Methods defined in the class body (nested classes and ``if TYPE_CHECKING`` stubs are not counted)."""
    return sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in cls.body)


def _oversized(source: str, name: str) -> list[str]:
    tree = ast.parse(source, filename=name)
    return [f"{name}:{node.lineno} class {node.name} has {_methods(node)} methods (max {MAX_METHODS})"
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and _methods(node) > MAX_METHODS]


def test_no_class_over_30_methods() -> None:
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py")) if ".venv" not in f.parts]
    assert len(files) > 50  # the walk really found the code
    bad = [msg for f in files for msg in _oversized(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not bad, "split these classes by concern:\n" + "\n".join(bad)


def test_counter_flags_a_big_class() -> None:
    body = "".join(f"    def m{i}(self) -> None: ...\n" for i in range(MAX_METHODS + 1))
    assert _oversized("class Big:\n" + body, "big.py") == ["big.py:1 class Big has 31 methods (max 30)"]
    small = "class Small:\n" + "".join(f"    async def m{i}(self) -> None: ...\n" for i in range(MAX_METHODS))
    assert _oversized(small, "small.py") == []
