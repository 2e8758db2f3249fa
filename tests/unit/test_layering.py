"""The layering rule, enforced on the source: forge_models (pure ML) imports no orchestration; tasks never
import flows; no module uses another package's private names; and the merge package has no import cycle.

Every import is read from the syntax tree, including imports inside functions, so a lazy import counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("forge_models", "tasks", "flows")
FORBIDDEN = {
    "forge_models": ("tasks", "flows", "prefect", "mlflow", "s3fs", "prefect_dask", "prefect_ray", "distributed"),
    "tasks": ("flows",),
    "flows": (),
}


def violations(package: str, module: str, source: str) -> list[str]:
    """The layering problems of one module (``module`` is its dotted name, in ``package``)."""
    tree = ast.parse(source)
    out = []
    aliases: dict[str, str] = {}  # local name -> imported module of another package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, a.asname or a.name.split(".")[0], None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [(node.module, a.asname or a.name, a.name) for a in node.names]
        else:
            continue
        for mod, local, name in targets:
            top = mod.split(".")[0]
            if top in FORBIDDEN[package]:
                out.append(f"{module}: imports {mod}")
            if top in PACKAGES and top != package:
                if name is not None and name.startswith("_"):
                    out.append(f"{module}: imports the private name {mod}.{name}")
                aliases[local] = f"{mod}.{name}" if name else mod
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                out.append(f"{module}: uses the private name {aliases[node.value.id]}.{node.attr}")
    return out


def modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts), path.read_text()


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_import_only_downwards_and_no_private_names(package):
    problems = [v for name, src in modules(package) for v in violations(package, name, src)]
    assert problems == []


@pytest.mark.parametrize("package, source, expected", [
    ("forge_models", "import prefect\n", "imports prefect"),
    ("forge_models", "def f():\n    from mlflow import log_metric\n", "imports mlflow"),
    ("forge_models", "from tasks.config import ForgeConfig\n", "imports tasks.config"),
    ("forge_models", "import s3fs.core\n", "imports s3fs.core"),
    ("tasks", "from flows.config import load_config\n", "imports flows.config"),
    ("flows", "from tasks.runtime import _compute\n", "private name tasks.runtime._compute"),
    ("flows", "from tasks import runtime as rt\nrt._compute()\n", "private name tasks.runtime._compute"),
])
def test_the_check_catches_a_forbidden_import(package, source, expected):
    found = violations(package, f"{package}.added", source)
    assert any(expected in v for v in found), found


def test_merge_plan_and_registry_do_not_import_each_other():
    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    merge = ROOT / "forge_models" / "merge"
    assert "forge_models.merge.plan" not in imports(merge / "registry.py")
    assert "forge_models.merge.registry" in imports(merge / "plan.py")


def test_every_test_folder_is_a_package():
    """Two test files may share a basename (unit/ and integration/ both have test_serving.py) only if
    every folder is a package; without it `pytest` over the whole tree stops at collection, which is
    how CI failed once while each folder alone passed."""
    root = Path(__file__).resolve().parents[1]
    folders = {p.parent for p in root.rglob("test_*.py")}
    missing = sorted(str(f.relative_to(root)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"test folders without __init__.py: {missing}"
