"""The package's import rules: engine -> models -> kernels, bench may import all, kernels only torch/triton,
nothing outside kernels/ touches its private modules (not even through import strings), and no module
imports itself back through others at import time (no cycles)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each folder may import of ours.
ALLOWED = {
    "kernels": {"kernels"},
    "models": {"kernels", "models"},
    "engine": {"kernels", "models", "engine"},
    "bench": {"kernels", "models", "engine", "bench"},
}
THIRD_PARTY_IN_KERNELS = {"torch", "triton", "numpy"}
MODULE_NAME = re.compile(r"d2v2(\.\w+)+")


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["d2v2", *path.relative_to(ROOT).parent.parts]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            names.append(node.value)  # import_module("d2v2....") strings count too
    return names


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_one_way(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "d2v2" and len(parts) > 1 and parts[1] in ALLOWED:
                assert parts[1] in ALLOWED[folder], f"{path.relative_to(ROOT)} imports {name}"
                if parts[1] == "kernels" and folder != "kernels":
                    assert not any(p.startswith("_") for p in parts[2:]), f"{path.relative_to(ROOT)} imports private {name}"
            elif folder == "kernels" and parts[0] and parts[0] not in sys.stdlib_module_names:
                assert parts[0] in THIRD_PARTY_IN_KERNELS, f"{path.relative_to(ROOT)} imports {name}"


def _import_time_modules(path: Path) -> set[str]:
    """Our modules a file imports when it is imported: imports inside functions run later and are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = []
    package = ["d2v2", *path.relative_to(ROOT).parent.parts]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]  # a name may be a submodule
        else:
            continue
        found |= {name for name in candidates if name in _MODULES}
    return found


def _module_name(path: Path) -> str:
    parts = ["d2v2", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_FILES = {path: _module_name(path) for folder in ALLOWED for path in sorted((ROOT / folder).rglob("*.py"))}
_MODULES = set(_FILES.values())


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_no_import_cycles(folder):
    graph = {name: _import_time_modules(path) for path, name in _FILES.items()}
    for start in sorted(name for path, name in _FILES.items() if path.relative_to(ROOT).parts[0] == folder):
        # Depth-first from each module: reaching it again is a cycle; the path says which.
        stack, seen = [(start, (start,))], set()
        while stack:
            name, trail = stack.pop()
            for nxt in graph[name] - {name.rpartition(".")[0]}:  # a submodule's own package is never a cycle
                assert nxt != start, "import cycle: " + " -> ".join((*trail, nxt))
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))


def test_models_layers_sit_below_the_methods():
    """``models/layers`` holds the shared building blocks: they import kernels and each other, never a
    method, a seam or the registry above them (which would make a block depend on who uses it)."""
    for path in sorted((ROOT / "models" / "layers").rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["d2v2", "models"] and len(parts) > 2:
                assert parts[2] == "layers", f"{path.relative_to(ROOT)} imports {name}"


def test_each_method_folder_holds_its_model_and_config():
    """One folder per method, its config beside it (torchtitan's ``models/<name>/``)."""
    from d2v2.models import METHODS

    for entry in METHODS.values():
        model_module, config_module = entry.model.__module__, entry.config.__module__
        assert model_module.rpartition(".")[0] == config_module.rpartition(".")[0], (model_module, config_module)
        assert config_module.endswith(".config") and (ROOT / "models" / config_module.split(".")[2]).is_dir()
