"""Packages import one way: ir -> analysis -> runtime -> calibration -> importance/strategy -> passes ->
pipeline -> cli. A new import against that direction fails here; the few known ones are listed, each to be
removed (and then removed from the list: the test also fails when a listed edge is gone)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxprune"

# lower layers first; a module may import from its own layer or any lower one
LAYER = {
    "errors": 0, "ops": 0, "version": 0, "options": 0, "text": 0, "plotting": 0,
    "ir": 1,
    "analysis": 2,
    "runtime": 3,
    "cost": 4, "report": 4,
    "calibration": 5,
    "importance": 6, "strategy": 6, "autodiff": 6,
    "passes": 7,
    "pipeline": 8,
    "sparsity": 9,
    "sweep": 10,
    "cli": 11,
    "__init__": 12, "testing": 12,
    "__main__": 13,
}

# Back edges that exist today, from the issue "One pipeline of stages…"; remove them, then remove them here.
KNOWN_BACK_EDGES: set[tuple[str, str]] = set()


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges() -> dict[tuple[str, str], str]:
    """(importer package, imported package) -> one place it happens."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        source = rel.parts[0] if len(rel.parts) > 1 else rel.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxprune"):
                target = _package_of(node.module)
                if target != source:
                    edges.setdefault((source, target), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def test_every_package_has_a_layer():
    packages = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert packages <= set(LAYER), f"give {sorted(packages - set(LAYER))} a layer in LAYER"


def test_imports_point_down_the_layers():
    upward = {edge: where for edge, where in import_edges().items()
              if LAYER[edge[0]] < LAYER[edge[1]] and edge not in KNOWN_BACK_EDGES}
    assert not upward, "imports against the layer order: " + "; ".join(
        f"{a} -> {b} ({where})" for (a, b), where in sorted(upward.items()))


def test_the_known_back_edges_still_exist():
    # when one is fixed, delete it from KNOWN_BACK_EDGES so it cannot come back unnoticed
    assert KNOWN_BACK_EDGES <= set(import_edges())
