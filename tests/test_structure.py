"""The packages' layering, checked on the source: checkpoints <- deployments <- evaluators <- cluster.

- No import runs upward (a lower package never imports a higher one, not even lazily inside a
  function or under TYPE_CHECKING).
- No module imports another package's private module (`pkg._mod`, `from pkg import _x`): other
  packages use only the public names in a package's `__init__.py`.
- So no import cycle between packages; the check below also looks for one directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("checkpoints", "deployments", "evaluators", "cluster")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in a file, names imported from a module included."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from pkg import _private` (a name that is a private module or attribute)
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if a.name.startswith("_")]
    return out


def _package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _product_files() -> list[Path]:
    return sorted(p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py"))


def _violations() -> tuple[list[str], list[str], set[tuple[str, str]]]:
    upward: list[str] = []
    private: list[str] = []
    edges: set[tuple[str, str]] = set()
    for path in _product_files():
        own = _package_of(path)
        own_parts = path.relative_to(ROOT).with_suffix("").parts
        for line, name in _imports(path):
            parts = name.split(".")
            other = parts[0]
            if other not in LAYERS or other == own:
                continue
            where = f"{path.relative_to(ROOT)}:{line}: {name}"
            edges.add((own, other))
            if LAYERS.index(other) > LAYERS.index(own):
                upward.append(where)
            if any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
                private.append(where)
        assert own_parts[0] in LAYERS
    return upward, private, edges


def test_no_upward_imports():
    upward, _, _ = _violations()
    assert not upward, "imports that run upward (checkpoints <- deployments <- evaluators <- cluster):\n" + "\n".join(upward)


def test_no_private_imports_across_packages():
    _, private, _ = _violations()
    assert not private, "imports of another package's private module (use its __init__'s names):\n" + "\n".join(private)


def test_no_import_cycle_between_packages():
    _, _, edges = _violations()
    graph = {p: {b for a, b in edges if a == p} for p in LAYERS}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph[n]
        return seen

    cycles = [p for p in LAYERS if p in reach(p)]
    assert not cycles, f"packages in an import cycle: {', '.join(cycles)} (edges: {sorted(edges)})"


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: a planted upward and private import are found (so it cannot pass vacuously)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cluster.config import load_config\n    import deployments._serve\n")
    names = [n for _, n in _imports(f)]
    assert "cluster.config" in names and "deployments._serve" in names
    assert len(_product_files()) > 50
