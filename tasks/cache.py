"""Cache keys: sha256 of phase name, phase code version, phase config, sorted input digests, data digest.

Same inputs -> same key -> the finished output is reused, by Prefect's cache (the key is the task's
`cache_key_fn`) and by the task itself (a task that finds a valid manifest at its key returns it).
Keys never hash tensors or modules: only JSON and digests, so they are stable across processes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import forge_models


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
        "code_version": f"{forge_models.CODE_VERSION}/{phase_version}",
        "config": json.loads(config_json),
        "inputs": sorted(input_digests),
        "data": data_digest,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def folder_digest(path: str) -> str:
    """sha256 over the relative names and sha256 of every file in a local folder (a plain HF model folder)."""
    from pathlib import Path

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
