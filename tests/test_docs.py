"""The documentation: every plugin setting described and in the reference, pages current with the
code, the site builds strictly (also when a new release-notes file appears), no link leaves the repo."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


gen_docs = _load("gen_docs", ROOT / "scripts" / "gen_docs.py")


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def readme_tour() -> str:
    """The README's Python quickstart: the first ``python`` block that builds ``Middleware()``."""
    blocks = [b for b in readme_blocks("python") if "Middleware()" in b]
    assert blocks, "README.md has no ```python block with Middleware()"
    return blocks[0]


# -- every plugin setting has a doc line --------------------------------------------------------------


def test_every_builtin_plugin_setting_has_a_description():
    assert gen_docs.undocumented() == []


def test_every_builtin_plugin_setting_has_a_row_in_the_reference():
    page = (DOCS / "reference" / "plugins.md").read_text(encoding="utf-8")
    plugins = gen_docs.builtin_plugins()
    assert len(plugins) >= 12
    n = 0
    for name, cls in plugins.items():
        assert f"\n## {name}\n" in page, name
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for key, field, _ in gen_docs.iter_settings(cls.Config):
            row = next((line for line in section.splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, f"{name}.{key} has no row in docs/reference/plugins.md"
            assert " ".join(field.description.split()).replace("|", "\\|") in row
            n += 1
    assert n >= 120  # 121 settings when this was written; fewer means the walk lost some


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int = 1  # no description
    shown: bool = Field(default=True, description="described")


class _Undocumented:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        ok: int = Field(default=1, description="a described setting")
        bare: int = 2
        blank: str = Field(default="", description="  ")
        nested: _Inner = Field(default_factory=_Inner, description="a nested model")
        many: list[_Inner] = Field(default_factory=list, description="a list of them")


def test_a_setting_without_description_is_reported():
    Undocumented = _Undocumented
    assert gen_docs.undocumented({"x": Undocumented}) == ["x.bare", "x.blank", "x.nested.depth", "x.many.depth"]


def test_the_check_fails_on_an_undocumented_builtin_setting(monkeypatch, capsys):
    """``gen_docs.py --check`` (what ``make docs`` runs) exits 1 naming the setting."""
    from persona_mw.plugins.stated import StatedPreferences

    field = StatedPreferences.Config.model_fields["header"]
    monkeypatch.setattr(field, "description", None)
    assert gen_docs.main(["--check"]) == 1
    assert "stated.header" in capsys.readouterr().err


# -- generated pages are current ------------------------------------------------------------------------


def test_reference_pages_are_current():
    stale = [str(p.relative_to(ROOT)) for p, text in gen_docs.render().items()
             if not p.exists() or p.read_text(encoding="utf-8") != text]
    assert not stale, f"out of date with the code (run `make docs-gen`): {stale}"


def test_http_reference_lists_every_route():
    from persona_mw import openapi

    page = (DOCS / "reference" / "http-api.md").read_text(encoding="utf-8")
    routes, _ = openapi.route_docs()
    for key in routes:
        assert f"## `{key}`" in page


# -- the site builds strictly, with whatever notes files exist -------------------------------------------


def _site_copy(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    shutil.copytree(DOCS, work / "docs")
    (work / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "mkdocs_hooks.py", work / "scripts")
    shutil.copy(ROOT / "mkdocs.yml", work)
    return work


def _build(work: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(work / "site")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_site_builds_strictly_and_lists_a_new_notes_file(tmp_path):
    work = _site_copy(tmp_path)
    # as engineers write them: links into the site, and to files that are not pages of it
    (work / "docs" / "notes" / "zz-newcomer.md").write_text(
        "# Newcomer notes\n\nSee the [guide](../guide/index.md), [the pipeline](../../persona_mw/pipeline.py) "
        "and [the README](../../README.md#a-tour).\n", encoding="utf-8")
    (work / "docs" / "notes" / "deeper").mkdir()
    (work / "docs" / "notes" / "deeper" / "more.md").write_text("# More notes\n\nText.\n", encoding="utf-8")
    out = _build(work)
    assert out.returncode == 0, out.stderr[-3000:]
    page = work / "site" / "notes" / "zz-newcomer" / "index.html"
    assert page.exists()
    html = page.read_text(encoding="utf-8")
    assert 'href="../../guide/"' in html  # a link into the site stays a link
    assert "<code>../../persona_mw/pipeline.py</code>" in html  # one out of it is shown as text
    assert (work / "site" / "notes" / "deeper" / "more" / "index.html").exists()
    # listed in the navigation of every page, under "Release notes"
    home = (work / "site" / "index.html").read_text(encoding="utf-8")
    assert "notes/zz-newcomer/" in home and "Newcomer notes" in home and "More notes" in home
    assert "fonts.googleapis" not in home  # theme.font: false: nothing fetched from the network


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The control: the strict build does catch a broken link (so a green build means something)."""
    work = _site_copy(tmp_path)
    with (work / "docs" / "guide" / "index.md").open("a", encoding="utf-8") as page:
        page.write("\n[gone](../no-such-page.md)\n")
    out = _build(work)
    assert out.returncode != 0
    assert "no-such-page.md" in out.stderr


# -- nothing points outside the repository ----------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = ("ALGORITHMS.md", "DESIGN.md", "CONVENTIONS.md", "../shared", "/work/")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_no_link_or_reference_leaves_the_repository():
    problems = []
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        for word in OUTSIDE:
            if word in text:
                problems.append(f"{page.relative_to(ROOT)} mentions {word}")
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT):
                problems.append(f"{page.relative_to(ROOT)}: {target} is outside the repository")
            elif not path.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target} does not exist")
    assert not problems, problems


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) < 8000  # was 80 KB of tables; those live in docs/benchmarks.md now
    assert "make demo" in text and "make test" in text
    tour = readme_tour()
    assert "from persona_mw import Middleware" in tour
    assert 5 <= len(tour.strip().splitlines()) <= 20


def test_readme_yaml_is_a_valid_pipeline():
    from persona_mw.config import parse_config

    blocks = readme_blocks("yaml")
    assert blocks
    for block in blocks:
        cfg = parse_config(block, "README.md")
        assert [e.use for e in cfg.pipeline]


@pytest.mark.parametrize("figure", ["0.809", "2,326 msg/s", "0.560 vs 0.329", "10,001 probes", "0.551\n-> 0.615",
                                    "p95 0.98 ms", "0.454"])
def test_benchmark_figures_moved_not_lost(figure):
    assert figure in (DOCS / "benchmarks.md").read_text(encoding="utf-8")
