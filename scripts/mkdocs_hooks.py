"""mkdocs hooks: every ``docs/notes/*.md`` under "Release notes", so a new notes file needs no nav edit.

Engineers add ``docs/notes/<branch>.md`` with the user-facing notes of their change; ``nav`` in
mkdocs.yml names only ``notes/index.md`` and this hook appends the others (sorted by file name),
so strict builds neither fail on an unlisted file nor miss one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SECTION = "Release notes"


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").replace("_", " ")


def on_config(config: Any, **kwargs: Any) -> Any:
    notes_dir = Path(config["docs_dir"]) / "notes"
    notes = sorted(p for p in notes_dir.glob("*.md") if p.name != "index.md") if notes_dir.is_dir() else []
    nav = config["nav"] or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and SECTION in item:
            index = item[SECTION]
            entries = index if isinstance(index, list) else [{"Overview": index}]
            entries = entries + [{_title(p): f"notes/{p.name}"} for p in notes]
            nav[i] = {SECTION: entries}
            break
    config["nav"] = nav
    return config
