"""The layout the architecture promises: no import circle, kernels independent of ``hiap``, the method independent of
token reduction, a test and a benchmark named after every public op, public op names that no submodule can shadow."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import hiap_kernels

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hiap", "hiap_kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every project module ``path`` imports, at the top or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # ``from pkg import name`` names a module only when pkg.name is one; keep the edges between modules.
        graph[name] = {target for target in _imports(path, name) if target in modules and target != name}
    return graph


def test_no_import_circle_anywhere():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            # A package's __init__ importing its own submodules is how packages work, not a circle.
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_kernels_never_import_hiap():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "hiap")
                 for name, targets in _graph().items() if name.startswith("hiap_kernels")}
    assert not {name: t for name, t in offenders.items() if t}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_method_never_imports_token_reduction():
    """``hiap.tokens`` patches gated and pruned models, so it reads the method; an arrow back (even one import inside
    a function) would tie the two into one layer. What both need (the token steps' overhead MACs) lives in a leaf of
    the method."""
    offenders = {name: sorted(t for t in targets if _within(t, "hiap.tokens"))
                 for name, targets in _graph().items() if _within(name, "hiap.method")}
    assert not {name: t for name, t in offenders.items() if t}


@pytest.mark.parametrize("op", sorted(hiap_kernels.TRITON_OPS))
def test_every_public_op_has_a_test_and_a_benchmark_of_its_name(op):
    assert (ROOT / "tests" / f"test_{op}.py").is_file()
    assert (ROOT / "bench" / f"bench_{op}.py").is_file()


@pytest.mark.parametrize("op", sorted(hiap_kernels.TRITON_OPS))
def test_every_public_op_is_a_plain_import_of_the_module_that_defines_it(op):
    """A reader follows ``hiap_kernels.<op>`` to its kernel by the import line; no submodule is named like an op
    (importing it would replace the function)."""
    function = getattr(hiap_kernels, op)
    module = importlib.import_module(function.__module__)
    assert callable(function) and getattr(module, op) is function and not module.__name__.endswith("." + op)
    source = (ROOT / "hiap_kernels" / "__init__.py").read_text()
    assert f"from {module.__name__} import {op}" in source


def test_the_benchmark_suite_collects():
    """Every bench_*.py imports and parametrises (a broken import would only show on the next GPU run)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HIAP_BENCH_RESULTS": "off"}
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--collect-only", "-q", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("test_deit_s_inference", "test_training_step", "test_ragged_attention", "test_sample_gates"):
        assert name in result.stdout
