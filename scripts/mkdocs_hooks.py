"""mkdocs hooks: every ``docs/notes/*.md`` under "Release notes", so a new notes file needs no nav edit.

Engineers add ``docs/notes/<branch>.md`` with the user-facing notes of their change; ``nav`` in
mkdocs.yml names only ``notes/index.md`` and this hook appends the others (sorted by path, titled by
their first ``#`` heading), so a strict build neither fails on an unlisted file nor misses one.

Notes are written in each engineer's worktree, often with links to source files (``../../persona_mw/x.py``)
or pages that are not in the site. In notes pages only, such a link becomes its text followed by the
target as code, so a new notes file cannot break the strict build; the curated pages stay strict.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

SECTION = "Release notes"
NOTES = "notes"
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
log = logging.getLogger("mkdocs.hooks.notes")


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").replace("_", " ")


def on_config(config: Any, **kwargs: Any) -> Any:
    docs = Path(config["docs_dir"])
    notes_dir = docs / NOTES
    notes = (sorted(p for p in notes_dir.rglob("*.md") if p != notes_dir / "index.md")
             if notes_dir.is_dir() else [])
    nav = config["nav"] or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and SECTION in item:
            index = item[SECTION]
            entries = index if isinstance(index, list) else [{"Overview": index}]
            entries = entries + [{_title(p): p.relative_to(docs).as_posix()} for p in notes]
            nav[i] = {SECTION: entries}
            break
    config["nav"] = nav
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    src = page.file.src_uri
    if not src.startswith(NOTES + "/"):
        return markdown
    known = {f.src_uri for f in files}

    def fix(m: re.Match[str]) -> str:
        bang, text, target = m.groups()
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            return m.group(0)
        path = posixpath.normpath(posixpath.join(posixpath.dirname(src), target.split("#", 1)[0]))
        if path in known:
            return m.group(0)
        log.info("%s: %s is not a page of the site; shown as text", src, target)
        return f"{text} (`{target}`)" if text else f"`{target}`"

    return _LINK.sub(fix, markdown)
