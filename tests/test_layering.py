"""Core (``persona_mw/``) never imports from ``plugins/``: shared pieces live in core and plugins
import them, not the other way round. The built-in registry and the eval harness are the exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "persona_mw"

# The registry names the built-in plugins; the eval harness evaluates them.
ALLOWED = {"builtins.py", "manager.py"}
ALLOWED_DIRS = {"eval"}
# Left for the CLI's own rework (plugins will add their subcommands through a hook).
PENDING: set[tuple[str, str]] = set()


def plugin_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ``persona_mw.plugins`` in one file, lazy ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name == "persona_mw.plugins" or a.name.startswith(("persona_mw.plugins.", "plugins."))]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mod = node.module
            if mod == "persona_mw.plugins" or mod.startswith(("persona_mw.plugins.", "plugins.")) or mod == "plugins":
                found.append((node.lineno, mod))
            elif mod == "persona_mw" and any(a.name == "plugins" for a in node.names):
                found.append((node.lineno, "persona_mw.plugins"))
    return found


def core_plugin_imports() -> list[str]:
    bad = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE)
        if rel.parts[0] in ALLOWED_DIRS or str(rel) in ALLOWED:
            continue
        bad += [f"persona_mw/{rel}:{line}: {mod}" for line, mod in plugin_imports(path)
                if (str(rel), mod) not in PENDING]
    return bad


def test_core_does_not_import_plugins() -> None:
    assert core_plugin_imports() == []


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import persona_mw.plugins.rerank\nfrom persona_mw.plugins import _steering\n"
                 "from persona_mw import plugins\ndef f():\n    from persona_mw.plugins.fermi import place\n"
                 "from persona_mw import text\nimport persona_mw.placement\n")
    assert [m for _, m in plugin_imports(f)] == ["persona_mw.plugins.rerank", "persona_mw.plugins",
                                                 "persona_mw.plugins", "persona_mw.plugins.fermi"]


PLUGINS = CORE.parent / "plugins"


def adapter_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a concrete backend (``persona_mw.adapters.*``) in one file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        found += [(node.lineno, n) for n in names if n.startswith(("persona_mw.adapters", "adapters"))]
        if isinstance(node, ast.ImportFrom) and node.module == "persona_mw" and any(a.name == "adapters" for a in node.names):
            found.append((node.lineno, "persona_mw.adapters"))
    return found


def test_no_plugin_imports_a_concrete_backend(tmp_path: Path) -> None:
    """White-box plugins reach local models through ``PluginContext`` and shared tensor helpers through
    core (``persona_mw.logits``), never through ``persona_mw.adapters``."""
    bad = [f"plugins/{p.relative_to(PLUGINS)}:{line}: {mod}" for p in sorted(PLUGINS.rglob("*.py"))
           for line, mod in adapter_imports(p)]
    assert bad == []
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from persona_mw.adapters.transformers import top_p_mask\n"
                 "import persona_mw.adapters.litellm\nfrom persona_mw import adapters\n")
    assert sorted(m for _, m in adapter_imports(f)) == ["persona_mw.adapters", "persona_mw.adapters.litellm",
                                                        "persona_mw.adapters.transformers"]
