"""The layout docs/architecture.md describes: light imports, short functions, one place per
constraint fact."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lipschitz.constraints import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lipschitz"


@pytest.mark.parametrize("module, absent", [
    ("lipschitz", "torch"),  # importing the package loads nothing heavy
    ("lipschitz.linalg", "lipschitz.training"),
    ("lipschitz.constraints", "lipschitz.optim"),
    ("lipschitz.nn", "lipschitz.training"),
    ("lipschitz.certify", "lipschitz.training"),
    ("lipschitz.optim", "lipschitz.training"),
    ("lipschitz.data.tasks", "lipschitz.training"),
    ("lipschitz.cli", "torch"),  # `lipschitz --help` answers at once
])  # fmt: skip
def test_imports_flow_one_way(module, absent):
    code = f"import sys, {module}; assert {absent!r} not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"import {module} loads {absent}: {done.stderr[-500:]}"


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_no_function_is_longer_than_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > 80]  # fmt: skip
    assert not long, long


def test_constraint_names_are_spelled_in_one_place():
    """Facts about a method (bound, stacking, state, guarantee) come from its Constraint entry,
    so no module of the machinery names a method; configs and presets may choose one."""
    names = set(METHODS) - {"none"}
    machinery = [PACKAGE / "optim", PACKAGE / "training", PACKAGE / "certify.py", PACKAGE / "nn"]
    found = []
    for place in machinery:
        for path in [place] if place.is_file() else sorted(place.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    allowed = {  # the config keys of one method, and the re-export of the per-row cap
        "lipschitz/optim/build.py": {"'spectral_weight_decay'", "'row_rms_cap'"},
        "lipschitz/optim/__init__.py": {"'row_rms_cap'"},
    }
    found = [f for f in found if f.split()[1] not in allowed.get(f.split(":")[0], set())]
    assert not found, found


def test_no_module_imports_another_modules_private_names():
    """Modules meet at public, documented seams: no ``from lipschitz.x import _name``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lipschitz"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in private]
    assert not found, found


def _imports(path: Path) -> list[str]:
    """Every lipschitz module ``path`` imports, at any depth of its code (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lipschitz"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("lipschitz")]
    return found


def test_config_is_a_leaf():
    """config sits at the bottom: it reads no registry of the layers that read it."""
    assert set(_imports(PACKAGE / "config.py")) <= {"lipschitz.fileio"}


def _names_a_choice(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in ("model", "dataset")


def _is_string(node: ast.AST) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_string(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _choice_string_tests(source: str) -> list[int]:
    """Lines of ``source`` that compare ``X.model`` or ``X.dataset`` to a string."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(_names_a_choice, sides)) and any(map(_is_string, sides)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith") and _names_a_choice(node.func.value):
                lines.append(node.lineno)
    return lines


def test_no_module_compares_the_model_or_dataset_name_to_a_string():
    """What a model or dataset is comes from its registry entry (nn.build.MODELS,
    data.tasks.TASKS), not from ``cfg.model == "..."`` or ``cfg.dataset.endswith(...)``."""
    found = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
             for line in _choice_string_tests(path.read_text())]  # fmt: skip
    assert not found, found


def test_the_scan_finds_planted_string_comparisons():
    source = ('a = cfg.model == "lipschitz_gpt"\nb = "x" != self.cfg.dataset\n'
              'c = cfg.model.endswith("_gpt")\nd = cfg.dataset in ("cifar10", "mnist")\n'
              'e = MODELS[cfg.model].inputs == "images"\n')  # fmt: skip
    assert _choice_string_tests(source) == [1, 2, 3, 4]
