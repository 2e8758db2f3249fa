"""The stored expert library: ``save_experts(folder, ...)`` and the plain loader ``load_experts(folder)``.

A library folder holds:

- ``basis.safetensors`` — per target ``<name>.U``, ``<name>.S``, ``<name>.Vh`` (fp32): the directions z scales.
  Stored rather than recomputed so a reloaded expert is exactly the trained one on any machine.
- ``experts.safetensors`` — per skill and target ``<skill>::<name>``: the trained z (fp32).
- ``experts.json`` — format version, composition, ``max_mult``, targets (shape, rank, ternary, fingerprint of
  the weight the basis came from), skills (harness metric, objective), dispatcher and its exemplars.
- ``manifest.json`` — written **last**: every other file with its size and sha256. :func:`load_experts`
  refuses a folder whose manifest is missing or does not match.

Use::

    lib = load_experts("out/experts")
    with lib.apply(model, "arithmetic"):      # or lib.apply(model, alpha={"arithmetic": .7, "tool": .3})
        ...                                   # the model computes with the expert; base restored on exit
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import safetensors.torch
import torch

from forge_models.experts.dispatch import expert_masks, mix_masks
from forge_models.experts.svf import MaskState, TargetBasis, attached
from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = ["ExpertLibrary", "save_experts", "load_experts", "FORMAT_VERSION"]

FORMAT_VERSION = 1
COMPOSITION = "W' = W + U diag(S * (c * m - 1)) Vh, m = sigmoid(z) * max_mult, c = sum(S) / sum(S * m)"


@dataclass
class ExpertLibrary:
    """Bases, z per skill and the metadata needed to apply and dispatch them."""

    bases: dict[str, TargetBasis]
    z: dict[str, dict[str, torch.Tensor]]
    max_mult: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def skills(self) -> list[str]:
        return sorted(self.z)

    def masks(self, skill: str | None = None, alpha: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
        if (skill is None) == (alpha is None):
            raise ConfigError("give exactly one of skill or alpha")
        if skill is not None:
            if skill not in self.z:
                raise ConfigError(f"no expert {skill!r} in this library (it has {self.skills})")
            return expert_masks(self.z[skill], self.max_mult)
        unknown = sorted(set(alpha) - set(self.z))  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"alpha names experts {unknown} not in this library ({self.skills})")
        return mix_masks(self.z, alpha, self.max_mult)  # type: ignore[arg-type]

    @contextmanager
    def apply(self, model: Any, skill: str | None = None, alpha: Mapping[str, float] | None = None
              ) -> Iterator[Any]:
        """Compute with one expert (or a mixture) inside the block; the base weights come back bit for bit."""
        state = MaskState()
        state.masks = {n: m.detach() for n, m in self.masks(skill, alpha).items()}
        with attached(model, self.bases, state):
            yield model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_experts(folder: str | Path, bases: Mapping[str, TargetBasis], z: Mapping[str, Mapping[str, torch.Tensor]],
                 max_mult: float, meta: Mapping[str, Any]) -> Path:
    """Write a library folder (see the module docstring); the manifest goes last."""
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        raise ConfigError(f"{folder} already holds an expert library; write to a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    basis_t = {}
    for n, b in bases.items():
        basis_t.update({f"{n}.U": b.U.contiguous(), f"{n}.S": b.S.contiguous(), f"{n}.Vh": b.Vh.contiguous()})
    safetensors.torch.save_file(basis_t, folder / "basis.safetensors")
    safetensors.torch.save_file({f"{k}::{n}": t.detach().float().contiguous() for k, zs in z.items()
                                 for n, t in zs.items()}, folder / "experts.safetensors")
    doc = {
        "format_version": FORMAT_VERSION,
        "composition": COMPOSITION,
        "max_mult": max_mult,
        "targets": [{"name": n, "shape": [b.U.shape[0], b.Vh.shape[1]], "rank": b.rank, "full_rank": b.full_rank,
                     "ternary": b.ternary, "fingerprint": b.fingerprint} for n, b in bases.items()],
        "skills": sorted(z),
        **dict(meta),
    }
    (folder / "experts.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha(p)}
             for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=2, sort_keys=True))
    return folder


def load_experts(folder: str | Path) -> ExpertLibrary:
    """Read a library written by :func:`save_experts`, verifying every file against the manifest first."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ArtifactIntegrityError(f"{folder}: no manifest.json (an incomplete or foreign expert library)")
    for name, entry in json.loads(manifest.read_text())["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha(path) != entry["sha256"]:
            raise ArtifactIntegrityError(f"{path}: missing or does not match the library's manifest")
    doc = json.loads((folder / "experts.json").read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactIntegrityError(f"{folder}: expert library format {doc.get('format_version')}, "
                                     f"this code reads {FORMAT_VERSION}")
    basis_t = safetensors.torch.load_file(folder / "basis.safetensors")
    bases = {t["name"]: TargetBasis(t["name"], basis_t[f"{t['name']}.U"], basis_t[f"{t['name']}.S"],
                                    basis_t[f"{t['name']}.Vh"], bool(t["ternary"]), int(t["full_rank"]),
                                    t["fingerprint"]) for t in doc["targets"]}
    z: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in safetensors.torch.load_file(folder / "experts.safetensors").items():
        skill, name = key.split("::", 1)
        z.setdefault(skill, {})[name] = t
    return ExpertLibrary(bases=bases, z=z, max_mult=float(doc["max_mult"]), meta=doc)
