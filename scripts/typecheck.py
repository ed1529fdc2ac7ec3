"""mypy (strict, configured in pyproject.toml) over persona_mw, plugins and adapters under their import names.

setuptools installs ``plugins/`` and ``adapters/`` as ``persona_mw.plugins`` / ``persona_mw.adapters``
(``[tool.setuptools.package-dir]``). mypy has no such mapping: given the folders it would name their
modules ``plugins.*`` and every ``from persona_mw.plugins... import`` would be unresolved. So this runs
mypy's own build with the sources renamed after package-dir; arguments are passed on to mypy
(``python scripts/typecheck.py plugins/rerank.py``). Exit status as mypy's.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, str]:
    """Folder -> package name, from ``[tool.setuptools.package-dir]``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {folder: package for package, folder in mapping.items()}


def renamed(source: BuildSource, dirs: dict[str, str]) -> BuildSource:
    """The source under the name it is imported by (``plugins.fermi`` -> ``persona_mw.plugins.fermi``)."""
    head, _, rest = source.module.partition(".")
    if head in dirs and source.path and Path(source.path).resolve().is_relative_to(ROOT / head):
        source.module = dirs[head] + ("." + rest if rest else "")
    return source


def main(argv: list[str]) -> int:
    sources, options = process_options(argv)
    dirs = package_dirs()
    sources = [renamed(s, dirs) for s in sources]
    messages: list[str] = []

    def flush(filename: str | None, new: list[str], serious: bool) -> None:
        messages.extend(new)
        for line in new:
            print(line, flush=True)

    try:
        build.build(sources, options, flush_errors=flush)
    except CompileError as e:  # a blocking error (syntax, duplicate module): mypy prints these itself
        for line in e.messages:
            print(line)
        return 2
    errors = [m for m in messages if ": error:" in m]
    if errors:
        files = {m.split(":", 1)[0] for m in errors}
        print(f"Found {len(errors)} error{'s' * (len(errors) != 1)} in {len(files)} file{'s' * (len(files) != 1)} "
              f"(checked {len(sources)} source files)")
        return 1
    print(f"Success: no issues found in {len(sources)} source files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
