"""The layout the project keeps: small nodes and functions, no import circle, `models/` usable without Kedro, and
DVC stages that depend on the code they run (the import closure of their pipeline)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "qmllm_pipeline"
MAX_NODE_INPUTS, MAX_FUNCTION_LINES = 6, 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, at the top or inside a function (both run when its code runs)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], base]).strip(".")
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
            out |= subs or ({base} & set(modules))
    return out - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _closure(roots: set[str], graph: dict[str, set[str]], packages: bool = True) -> set[str]:
    """Every module reached from `roots` by imports; with `packages`, each module's packages too (importing a
    submodule runs their `__init__` first)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph[name]
            parent = name.rpartition(".")[0]
            if packages and parent in graph:
                todo.append(parent)
    return seen


def test_no_node_takes_more_than_six_inputs():
    from qmllm_pipeline.pipeline_registry import register_pipelines

    wide = {f"{node.func.__module__}.{getattr(node.func, '__qualname__', node.func)}": len(node.inputs)
            for pipeline in register_pipelines().values() for node in pipeline.nodes
            if len(node.inputs) > MAX_NODE_INPUTS}
    assert not wide, wide


def test_no_function_of_models_or_pipelines_is_longer_than_sixty_lines():
    long = {}
    for folder in ("models", "pipelines"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert not long, long


def test_no_import_circle():
    """No module reaches itself through what it imports (a package's `__init__` re-exporting its submodule, the
    Kedro layout `pipelines/<name>/__init__.py`, is not a circle)."""
    graph = _graph()
    circles = sorted(name for name in graph if name in _closure(graph[name], graph, packages=False))
    assert not circles, circles


def test_every_models_module_imports_without_kedro():
    names = sorted(name for name in _modules() if name.startswith("qmllm_pipeline.models"))
    probe = ("import importlib, sys\n"
             "class Blocked:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'kedro' or name.startswith('kedro.') or name.startswith('kedro_'):\n"
             "            raise ImportError(f'{name} is blocked: models/ must not need Kedro')\n"
             "sys.meta_path.insert(0, Blocked())\n"
             f"for name in {names!r}:\n"
             "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# What every stage runs besides its pipeline's nodes and what they import: the catalogue's datasets, which read its
# inputs and write its outputs. The project's settings and hooks are left out: they set the thread count from
# the `threads` parameter, tag and profile the MLflow run, and (to profile it) import every pipeline.
COMMON_ROOTS = {"qmllm_pipeline.datasets"}


def stage_code(stage: str, graph: dict[str, set[str]] | None = None) -> set[str]:
    """The source files (relative to the project root) a DVC stage's `kedro run --pipelines <stage>` imports."""
    graph = graph or _graph()
    roots = {name for name in graph if name.startswith(f"qmllm_pipeline.pipelines.{stage}")} | COMMON_ROOTS
    modules = _modules()
    return {str(modules[name].relative_to(ROOT)) for name in _closure(roots, graph)}


def _declared(deps: list[str]) -> set[str]:
    files = set()
    for dep in deps:
        path = ROOT / dep
        if dep.startswith("src/") and path.is_dir():
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")}
        elif dep.startswith("src/"):
            files.add(dep)
    return files


@pytest.mark.parametrize("stage", ["data", "features", "pretrain", "finetune", "safety_map", "evaluate"])
def test_dvc_code_dependencies_are_the_import_closure_of_the_stage(stage):
    declared = _declared(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"])
    expected = stage_code(stage)
    assert declared == expected, {"missing": sorted(expected - declared), "extra": sorted(declared - expected)}
