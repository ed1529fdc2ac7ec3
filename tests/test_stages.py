"""The stage table is the one home of how hooks run: specs, docs and the runner must agree with it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from persona_mw import hookspecs, stages

ROOT = Path(__file__).resolve().parents[1]


def _specs() -> dict[str, Any]:
    return {n: f for n, f in vars(hookspecs).items()
            if n.startswith("persona_") and inspect.isfunction(f) and hasattr(f, "persona_mw_spec")}


def test_every_hookspec_has_a_docstring_and_a_row() -> None:
    specs = _specs()
    assert len(specs) == 18
    for name, fn in specs.items():
        assert (fn.__doc__ or "").strip(), f"{name} has no docstring"
        row = stages.stage(name)
        assert fn.persona_mw_spec["firstresult"] is row.firstresult, name
    assert set(specs) == set(stages.BY_HOOK), "a row without a spec, or a spec without a row"
    # the table's order is the hookspecs module's order
    assert list(specs) == [s.hook for s in stages.STAGES]


def test_spec_marker_refuses_a_hook_without_docstring_or_row() -> None:
    def persona_undocumented(turn: Any) -> None:
        pass

    with pytest.raises(TypeError, match="persona_undocumented has no docstring"):
        hookspecs.spec(persona_undocumented)

    def persona_new_stage(turn: Any) -> None:
        """A stage nobody put in the table."""

    with pytest.raises(KeyError, match="persona_new_stage.*no row"):
        hookspecs.spec(persona_new_stage)


def test_docs_hook_table_matches_the_specs() -> None:
    rows = []
    for line in (ROOT / "docs" / "hooks.md").read_text().splitlines():
        m = re.match(r"^\| (\w+) \| `(persona_\w+)\(([^)]*)\)` \| (\w+) \|", line)
        if m:
            rows.append(m.groups())
    assert [r[1] for r in rows] == [s.hook for s in stages.STAGES], "docs/hooks.md: names or order differ"
    specs = _specs()
    for phase, hook, args, combine in rows:
        row = stages.stage(hook)
        assert (phase, combine) == (row.phase, row.combine), hook
        declared = [a.strip() for a in args.split(",") if a.strip()]
        spec_args = [a for a in inspect.signature(specs[hook]).parameters
                     if a not in hookspecs.DEPRECATED_ARGS.get(hook, {})]
        assert declared == spec_args, f"docs/hooks.md: {hook} arguments {declared} != spec {spec_args}"


def test_entry_paths_in_the_hookspecs_docstring() -> None:
    doc = inspect.getdoc(hookspecs) or ""
    assert "prepare" in stages.ENTRY_PATHS
    for path in stages.ENTRY_PATHS:
        line = next(x for x in doc.splitlines() if x.strip().startswith(path + " "))
        assert line.split(": ")[-1] == ", ".join(h.removeprefix("persona_") for h in stages.on_path(path))
    # the split turn of the integrations cannot generate, score or select
    assert not {"persona_generate", "persona_score", "persona_select", "persona_decoding"} & set(
        stages.on_path("prepare"))
