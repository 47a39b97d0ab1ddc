"""The three floors: harness may import evals and pipeline, evals may import pipeline, pipeline
imports neither. Every import is read from the source (at module level and inside functions),
and so are the package names given to ``importlib.resources.files`` and
``importlib.import_module``, so no stair going up can hide in a function body or a string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOOR = {"pipeline": 0, "evals": 1, "harness": 2}
STRING_LOADERS = {"files", "import_module", "as_file"}


def _targets(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import and every package named in a string to a loader."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in STRING_LOADERS:
                for arg in node.args[:1]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.append((node.lineno, arg.value.split(".")[0]))
    return found


def upward_imports(root: Path = REPO) -> list[str]:
    """Every import in pipeline/, evals/ and harness/ that reaches a higher floor."""
    bad = []
    for package, level in FLOOR.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in _targets(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if FLOOR.get(target, -1) > level:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_no_import_reaches_a_higher_floor():
    assert upward_imports() == []


@pytest.mark.parametrize("snippet", [
    "from harness.config import RunConfig",
    "def f():\n    import harness.rundir\n",
    "from importlib import resources\nref = resources.files('harness')\n",
    "import importlib\nm = importlib.import_module('evals.alpaca')\n",
])
def test_the_walk_sees_every_kind_of_import(tmp_path, snippet):
    for package in FLOOR:
        (tmp_path / package).mkdir()
    (tmp_path / "pipeline" / "leak.py").write_text(snippet)
    assert len(upward_imports(tmp_path)) == 1
