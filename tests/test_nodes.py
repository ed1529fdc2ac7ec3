"""``persona_mw.nodes`` is the one owner of node ids: it builds, parses and orders them, and no other
source file spells a node-id prefix (``user:``, ``group:``, ``context:``, ``@context:``) itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from persona_mw import nodes
from persona_mw.graph import PreferenceGraph
from persona_mw.store import open_store
from persona_mw.types import ScopeNode

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("user:", "group:", "context:", "@context:")

# Files that may still spell node-id prefixes, each with its reason. Keep this list short.
ALLOWED = {
    # The owner.
    "persona_mw/nodes.py": "the one place that builds and parses node ids",
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _node_id_literals(path: Path) -> list[str]:
    """``file:line: text`` for each string literal (or f-string start) that spells a node-id prefix:
    starts with ``user:``/``group:``/``context:``, or holds ``@context:`` anywhere. Docstrings and
    comments are prose and do not count."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            text = head.value if isinstance(head, ast.Constant) and isinstance(head.value, str) else ""
            whole = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if text.startswith(PREFIXES) or "@context:" in whole:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: f{whole!r}")
            for v in node.values:  # the f-string's own constants are judged as one string above
                skip.add(id(v))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value.startswith(PREFIXES) or "@context:" in node.value:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return found


def test_no_node_id_literal_outside_nodes_py():
    files = [p for d in ("persona_mw", "plugins", "adapters") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    found = [hit for p in files if str(p.relative_to(ROOT)) not in ALLOWED for hit in _node_id_literals(p)]
    assert not found, ("node ids are built and parsed only by persona_mw.nodes (user_node, scope_node, parse, "
                       "kind_of, ...); these literals spell a node-id prefix:\n" + "\n".join(found))


def test_the_scan_finds_literals(tmp_path):
    """The scan above can fail: each way of spelling a prefix is caught, prose is not."""
    src = ROOT / "tests" / "_nodes_scan_sample.py"
    src.write_text('"""Doc: user:ana@context:x is prose."""\n'
                   'a = f"user:{u}"\nb = "group:" + g\nc = n.startswith("context:")\nd = f"{u}@context:{c}"\n'
                   'e = "the context: is fine"\n')
    try:
        hits = _node_id_literals(src)
    finally:
        src.unlink()
    assert sorted(int(h.split(":")[1]) for h in hits) == [2, 3, 4, 5], hits


def test_every_allow_listed_file_exists():
    for rel in ALLOWED:
        assert (ROOT / rel).is_file(), rel


@pytest.mark.parametrize("node_id, kind, user, name", [
    ("global", "global", None, None),
    ("user:ana", "user", "ana", None),
    ("user:ana@evil", "user", "ana@evil", None),
    ("user:ana@context:x", "user_context", "ana", "x"),
    ("user:ana@evil@context:x", "user_context", "ana@evil", "x"),
    ("group:acme", "group", None, "acme"),
    ("context:coding", "context", None, "coding"),
])
def test_parse_round_trips(node_id, kind, user, name):
    ref = nodes.parse(node_id)
    assert (ref.kind, ref.user, ref.name) == (kind, user, name)
    assert ref.id == node_id
    assert nodes.kind_of(node_id) == kind
    assert nodes.user_of(node_id) == user
    assert nodes.is_user_scoped(node_id) == (kind in ("user", "user_context"))
    assert nodes.is_group(node_id) == (kind == "group")
    assert nodes.context_of(node_id) == (name if kind in ("context", "user_context") else None)


@pytest.mark.parametrize("bad", ["", "user:", "user:@x", "group:", "team:a", "user:a@context:", "user:a:b", "ana"])
def test_parse_refuses_non_ids(bad):
    with pytest.raises(ValueError, match="not a node id"):
        nodes.parse(bad)
    assert nodes.user_of(bad) is None and nodes.name_of(bad) is None


def test_builders_and_exact_membership():
    assert nodes.scope_node("ana") == nodes.user_node("ana") == "user:ana"
    assert nodes.scope_node("ana", "x") == nodes.user_context_node("ana", "x") == "user:ana@context:x"
    assert nodes.scope_node("ana", "") == "user:ana"
    assert nodes.group_node("g") == "group:g" and nodes.context_node("c") == "context:c"
    assert "user:ana@evil@context:x".startswith(nodes.user_context_prefix("ana@evil"))
    assert not "user:ana@evil@context:x".startswith(nodes.user_context_prefix("ana"))
    assert nodes.is_user_node_of("user:ana@context:x", "ana")
    assert not nodes.is_user_node_of("user:ana@evil@context:x", "ana")
    assert not nodes.is_user_node_of("user:ana@evil", "ana")


def test_most_specific_first_is_the_specificity_order():
    scope = [ScopeNode(id=i, kind=nodes.kind_of(i), weight=w)  # type: ignore[arg-type]
             for i, w in [("global", 0.1), ("context:c", 0.1), ("group:b", 0.1), ("group:a", 0.3),
                          ("user:ana", 0.2), ("user:ana@context:c", 0.2)]]
    assert [n.id for n in nodes.most_specific_first(scope)] == [
        "user:ana@context:c", "user:ana", "group:a", "group:b", "context:c", "global"]
    assert sorted(["global", "group:a", "user:ana", "context:c", "user:ana@context:c"], key=nodes.specificity) == [
        "user:ana@context:c", "user:ana", "group:a", "context:c", "global"]


def test_graph_export_links_a_user_context_node_to_its_own_user(tmp_path, store_url):
    """GraphML export: ``user:ana@evil@context:x`` specializes ``user:ana@evil`` and ``context:x``.

    The export split the id at the first '@', so it linked user ``ana@evil``'s context node to
    *user ana* and to a made-up node ``evil@context:x``.
    """
    store = open_store(store_url())
    for n in ("user:ana", "user:ana@evil", "user:ana@evil@context:x", "context:x"):
        store.ensure_node(n)
    g = PreferenceGraph(store).export_graph()
    assert set(g.successors("user:ana@evil@context:x")) == {"user:ana@evil", "context:x"}
    assert g.edges["user:ana@evil@context:x", "user:ana@evil"]["kind"] == "specializes"
    assert g.edges["user:ana@evil@context:x", "context:x"]["kind"] == "in_context"
    assert "evil@context:x" not in g
    assert set(g.predecessors("user:ana")) == set()
    store.close()
