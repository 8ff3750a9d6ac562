"""Keeps BUILD true to the tree (Bazel cannot run here) and the library's layering enforced."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = {"py_library", "py_binary", "py_test"}


def _targets() -> dict[str, dict]:
    tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
    targets = {}
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not isinstance(call, ast.Call) or getattr(call.func, "id", None) not in KINDS:
            continue
        fields = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        assert fields["name"] not in targets, f"duplicate target {fields['name']}"
        targets[fields["name"]] = {"kind": call.func.id, **fields}
    return targets


TARGETS = _targets()
SOURCES = {src: name for name, t in TARGETS.items() for src in t["srcs"]}


def _python_files() -> list[str]:
    files = []
    for folder in ("mfl_tff", "experiments", "tests"):
        files += [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")]
    return sorted(files)


def _project_imports(path: str) -> set[str]:
    """Files of this project imported by `path` (modules and packages)."""
    tree = ast.parse((ROOT / path).read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] not in ("mfl_tff", "experiments", "tests"):
                continue
            module = name.replace(".", "/") + ".py"
            if (ROOT / module).exists():
                found.add(module)
    found.discard(path)
    return found


def test_every_python_file_has_exactly_one_target_of_the_right_kind():
    for path in _python_files():
        assert path in SOURCES, f"{path} has no target in BUILD"
        kind = TARGETS[SOURCES[path]]["kind"]
        if path.endswith("_test.py"):
            assert kind == "py_test", f"{path} should be a py_test, is a {kind}"
        elif path.startswith("mfl_tff/"):
            assert kind == "py_library", f"{path} should be a py_library, is a {kind}"


def test_every_src_exists():
    for src in SOURCES:
        assert (ROOT / src).is_file(), f"BUILD names {src}, which does not exist"


def test_every_dep_is_a_defined_target():
    for name, target in TARGETS.items():
        for dep in target.get("deps", []):
            assert dep.startswith(":") and dep[1:] in TARGETS, f"{name}: unknown dep {dep}"


@pytest.mark.parametrize("path", _python_files())
def test_deps_cover_the_project_imports(path):
    target = TARGETS[SOURCES[path]]
    deps = {d[1:] for d in target.get("deps", [])}
    for imported in _project_imports(path):
        if imported.endswith("__init__.py"):
            continue
        assert SOURCES[imported] in deps, f"{path} imports {imported}; add its target to deps"


# experiments -> training -> evaluation, algorithms -> meta, models, data; the pure-TF
# meta-learning math knows nothing of TFF (nor of gRPC, which TFF's runtime brings); the library
# knows nothing of flags. A key ending in "/" covers a package, its __init__.py included.
FORBIDDEN = {
    # Importing any subpackage runs this file first, so it must not load TFF either.
    "mfl_tff/__init__.py": (
        "tensorflow_federated",
        "grpc",
        "mfl_tff.data",
        "mfl_tff.models",
        "mfl_tff.algorithms",
        "mfl_tff.evaluation",
        "mfl_tff.training",
        "absl.flags",
    ),
    "mfl_tff/meta/": (
        "tensorflow_federated",
        "grpc",
        "mfl_tff.data",
        "mfl_tff.algorithms",
        "mfl_tff.evaluation",
        "mfl_tff.training",
        "absl.flags",
    ),
    "mfl_tff/data/": ("mfl_tff.algorithms", "mfl_tff.evaluation", "mfl_tff.training", "absl.flags"),
    "mfl_tff/models/": (
        "mfl_tff.data",
        "mfl_tff.algorithms",
        "mfl_tff.evaluation",
        "mfl_tff.training",
        "absl.flags",
    ),
    "mfl_tff/algorithms/": ("mfl_tff.evaluation", "mfl_tff.training", "absl.flags"),
    "mfl_tff/evaluation/": ("mfl_tff.training", "absl.flags"),
    "mfl_tff/training/": ("experiments", "absl.flags"),
}


@pytest.mark.parametrize("path", [p for p in _python_files() if p.startswith("mfl_tff/")])
def test_dependencies_point_one_way(path):
    tree = ast.parse((ROOT / path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    for prefix, banned in FORBIDDEN.items():
        if path.startswith(prefix):
            bad = sorted(m for m in imported for b in banned if m == b or m.startswith(b + "."))
            assert not bad, f"{path} must not import {bad} (the library's layering)"


def test_every_package_init_is_under_a_layering_rule():
    inits = [p for p in _python_files() if p.startswith("mfl_tff/") and p.endswith("__init__.py")]
    assert "mfl_tff/__init__.py" in inits and len(inits) > 5
    for path in inits:
        assert any(
            path.startswith(prefix) for prefix in FORBIDDEN
        ), f"{path} is under no layering rule; add its package to FORBIDDEN"


def test_importing_the_meta_math_loads_neither_tff_nor_grpc():
    # A fresh interpreter: this one has TFF loaded already. Package __init__ files count too,
    # since `import mfl_tff.meta` runs mfl_tff/__init__.py first.
    check = (
        "import mfl_tff.meta, sys; "
        "loaded = [m for m in ('tensorflow_federated', 'grpc') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, "-c", check],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_build_parser_sees_the_targets():
    # Guards the checks above against vacuously passing on an empty or unparsed BUILD.
    kinds = {t["kind"] for t in TARGETS.values()}
    assert kinds == KINDS and len(TARGETS) > 40
