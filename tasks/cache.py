"""Cache keys: sha256 of phase name, phase code version, phase config, sorted input digests, data digest.

Same inputs -> same key -> the finished output is reused, by Prefect's cache (the key is the task's
`cache_key_fn`) and by the task itself (a task that finds a valid manifest at its key returns it).
Keys never hash tensors or modules: only JSON and digests, so they are stable across processes.

The **code version** of a phase is derived from its source, not bumped by hand: the sha256 of the bytes
of every project module the phase's task module reaches through its imports (see :func:`code_version`).
Editing any of them (the phase's package, the harness, the data code, the task wrapper) gives a new key
and the phase is recomputed; editing a module the phase never imports does not.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import forge_models

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("forge_models", "tasks", "flows")

# Steps that are not phases of the table, and the module(s) each runs from; a phase's roots come from its
# entry in the phase table (the module of its task), so a new phase needs nothing here.
STEP_ROOTS: dict[str, tuple[str, ...]] = {
    "data": ("tasks.data",),
    "evomerge-candidate": ("tasks.evomerge",),
    "evaluate": ("tasks.evaluate",),
    "import": ("tasks.imports",),
}


def phase_roots(phase: str) -> tuple[str, ...]:
    """The module(s) whose import closure is the code of ``phase`` (a table phase or a step above)."""
    if phase in STEP_ROOTS:
        return STEP_ROOTS[phase]
    from tasks.phases import PHASES  # the table imports the phase configs; keep this module light

    spec = PHASES.get(phase)
    if spec is None or spec.task is None:
        return ()
    return (spec.task.split(":", 1)[0],)


def phase_key(
    phase: str,
    phase_version: str,
    config_json: str,
    input_digests: Iterable[str] = (),
    data_digest: str = "",
) -> str:
    """The cache key of one phase run (64 hex chars)."""
    payload = {
        "phase": phase,
        "code_version": f"{forge_models.CODE_VERSION}/{phase_version}/{code_version(phase)}",
        "config": json.loads(config_json),
        "inputs": sorted(input_digests),
        "data": data_digest,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@lru_cache(maxsize=None)
def code_version(phase: str) -> str:
    """sha256 over the path and bytes of every project source file phase ``phase`` runs.

    The files are the import closure of ``phase_roots(phase)`` within forge_models / tasks / flows (static:
    ``import`` statements read with ``ast``, never executed). Importing ``a.b.c`` runs the ``__init__`` of
    ``a`` and ``a.b``: their bytes count, but their own imports are followed only when names are imported
    from the package itself. A phase without a known root module (or whose roots are gone) hashes every
    project file: never stale, at the price of recomputing more often.
    """
    roots = [m for m in phase_roots(phase) if _module_file(m) is not None]
    files = _import_closure(tuple(roots)) if roots else sorted(
        p for pkg in PROJECT_PACKAGES for p in (ROOT / pkg).rglob("*.py")
    )
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _import_closure(roots: tuple[str, ...]) -> list[Path]:
    """Every project file reached from ``roots`` (see :func:`code_version`), sorted."""
    followed: set[str] = set()
    files: set[Path] = set()
    queue = list(roots)
    while queue:
        name = queue.pop()
        if name in followed:
            continue
        path = _module_file(name)
        if path is None:
            continue
        followed.add(name)
        files.add(path)
        parts = name.split(".")
        for i in range(1, len(parts)):  # parent packages run, but their imports are not this module's
            parent = _module_file(".".join(parts[:i]))
            if parent is not None:
                files.add(parent)
        queue.extend(_imports(path, name))
    return sorted(files)


def _imports(path: Path, name: str) -> list[str]:
    """Project modules imported by the file of module ``name``."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from pkg import sub" imports the submodule pkg.sub; names that are not submodules come from
            # pkg itself, whose imports are then followed too.
            subs = [f"{module}.{alias.name}" for alias in node.names if _module_file(f"{module}.{alias.name}")]
            found.extend(subs)
            if len(subs) < len(node.names):
                found.append(module)
    return [m for m in found if m.split(".")[0] in PROJECT_PACKAGES]


def folder_digest(path: str) -> str:
    """sha256 over the relative names and sha256 of every file in a local folder (a plain HF model folder)."""
    from tasks.store import sha256_file

    root = Path(path)
    if not root.is_dir():
        from forge_models.runtime import ConfigError

        raise ConfigError(f"{path!r} is not a folder")
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()
