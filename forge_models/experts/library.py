"""The stored expert library, in two forms, and its loader ``load_experts(folder, model=None)``.

**With its basis** (phase 7, :func:`save_experts`):

- ``basis.safetensors`` — per target ``<name>.U``, ``<name>.S``, ``<name>.Vh`` (fp32): the directions z scales.
  Stored rather than recomputed so a reloaded expert is exactly the trained one on any machine.
- ``experts.safetensors`` — per skill and target ``<skill>::<name>``: the trained z (fp32).
- ``experts.json`` — format version, ``storage: "basis"``, composition, ``max_mult``, targets (shape, rank,
  ternary, fingerprint of the weight the basis came from), skills (harness metric, objective), dispatcher and
  its exemplars.
- ``manifest.json`` — written **last**: every other file with its size and sha256. :func:`load_experts`
  refuses a folder whose manifest is missing or does not match, naming the file.

**Basis-free** (phase 8 carries this into the compressed artifact, :func:`save_expert_vectors`): the same
``experts.safetensors`` and ``experts.json`` (``storage: "vectors"``; each target's ``fingerprint`` is the one of
the weight z was **trained** on), ``trained_singular_values.safetensors`` (the trained basis' S per target: as
many floats as one expert, kept only to report how far the basis moved) and the manifest. No U, Vh: the fp32
basis is as large as the dense weights it decomposes and would defeat a byte budget. Loading it needs the
model it will be applied to: ``load_experts(folder, model=m)`` **re-bases** the library, i.e. takes the SVD
(fp32) of m's effective target weights (for a compressed model: the decoded compressed weights) and keeps
the stored number of directions per target. Before any SVD it refuses a model lacking a target, or with a
target of another shape or kind (dense vs ternary). ``lib.rebased`` records per target the trained and the
new weight fingerprint and the relative change of the singular values; a changed basis is logged as a
warning. That is a **deviation**: z was trained on the directions of the uncompressed weights and is applied
to those of the compressed ones (on the same weights the re-based expert is the trained one, up to the
SVD's rounding: same matrix, same SVD, and the composition does not depend on the sign of a singular pair).

Use::

    lib = load_experts("out/experts")                  # or load_experts("model/experts", model=compressed)
    with lib.apply(model, "arithmetic"):      # or lib.apply(model, alpha={"arithmetic": .7, "tool": .3})
        ...                                   # the model computes with the expert; base restored on exit
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import safetensors.torch
import torch
from torch import nn

from forge_models.experts.dispatch import classify_prompts, expert_masks, mix_masks
from forge_models.experts.svf import MaskState, TargetBasis, attached, basis_of, is_ternary
from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = ["ExpertLibrary", "TargetRebase", "save_experts", "save_expert_vectors", "load_experts", "check_targets",
           "rebase", "FORMAT_VERSION", "STORAGE_BASIS", "STORAGE_VECTORS"]

log = logging.getLogger("forge_models.experts")

FORMAT_VERSION = 1
COMPOSITION = "W' = W + U diag(S * (c * m - 1)) Vh, m = sigmoid(z) * max_mult, c = sum(S) / sum(S * m)"
STORAGE_BASIS = "basis"  # basis.safetensors stored (phase 7)
STORAGE_VECTORS = "vectors"  # z only; the basis is recomputed from the model's weights at load (phase 8)
BASIS_FILE = "basis.safetensors"
EXPERTS_FILE = "experts.safetensors"
TRAINED_S_FILE = "trained_singular_values.safetensors"
DOC_FILE = "experts.json"
REQUIRED = {STORAGE_BASIS: (BASIS_FILE, EXPERTS_FILE, DOC_FILE),
            STORAGE_VECTORS: (TRAINED_S_FILE, EXPERTS_FILE, DOC_FILE)}
_DOC_KEYS = {"format_version", "storage", "composition", "max_mult", "targets", "skills"}


@dataclass(frozen=True)
class TargetRebase:
    """How one target's basis moved when a basis-free library was re-based on a model's weights.

    Attributes:
        name: the target layer.
        trained_fingerprint: sha256 of the effective weight z was trained on (from ``experts.json``).
        fingerprint: sha256 of the effective weight the basis was now taken from.
        s_rel_change: ``||S_now - S_trained|| / ||S_trained||`` over the directions z scales (0 when unchanged).
    """

    name: str
    trained_fingerprint: str
    fingerprint: str
    s_rel_change: float

    @property
    def changed(self) -> bool:
        return self.fingerprint != self.trained_fingerprint


@dataclass
class ExpertLibrary:
    """Bases, z per skill and the metadata needed to apply and dispatch them."""

    bases: dict[str, TargetBasis]
    z: dict[str, dict[str, torch.Tensor]]
    max_mult: float
    meta: dict[str, Any] = field(default_factory=dict)
    rebased: dict[str, TargetRebase] = field(default_factory=dict)  # empty unless loaded basis-free
    trained_s: dict[str, torch.Tensor] = field(default_factory=dict)  # S of the trained basis (default: bases' S)

    @property
    def skills(self) -> list[str]:
        return sorted(self.z)

    def targets(self) -> list[dict[str, Any]]:
        """Per target what ``experts.json`` stores; ``fingerprint`` is the weight z was trained on."""
        out = []
        for n, b in self.bases.items():
            trained = self.rebased[n].trained_fingerprint if n in self.rebased else b.fingerprint
            out.append({"name": n, "shape": [int(b.U.shape[0]), int(b.Vh.shape[1])], "rank": b.rank,
                        "full_rank": b.full_rank, "ternary": b.ternary, "fingerprint": trained})
        return out

    def rebase_summary(self) -> dict[str, float]:
        """Counts and singular-value changes of the re-based targets (empty for a library with its basis)."""
        if not self.rebased:
            return {}
        ch = [r.s_rel_change for r in self.rebased.values()]
        return {"targets": float(len(ch)), "targets_changed": float(sum(r.changed for r in self.rebased.values())),
                "s_rel_change_mean": sum(ch) / len(ch), "s_rel_change_max": max(ch)}

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

    @property
    def exemplars(self) -> dict[str, str]:
        """The first pass's exemplar text per skill, as the phase stored them (``experts.json`` ``dispatch``)."""
        found = (self.meta.get("dispatch") or {}).get("exemplars") or {}
        return {k: str(v) for k, v in found.items() if k in self.z}

    @property
    def can_dispatch(self) -> bool:
        """Whether :meth:`classify` can run: an exemplar stored for every expert."""
        return bool(self.z) and len(self.exemplars) == len(self.z)

    def classify(self, model: Any, tokenizer: Any, prompts: Sequence[str], ctx: Any,
                 tokens: list[int] | None = None) -> list[str]:
        """First pass of two-pass dispatch on ``prompts``: a skill of this library or UNKNOWN (answer with the
        base), judged by ``model`` with its base weights and the stored exemplars and margin (``tokens``: as
        :func:`~forge_models.experts.dispatch.classify_prompts`)."""
        if not self.can_dispatch:
            raise ConfigError(f"this library stores exemplars for {sorted(self.exemplars)} of its experts "
                              f"{self.skills}; dispatch needs one per expert")
        margin = float((self.meta.get("dispatch") or {}).get("margin", 0.0))
        return classify_prompts(model, tokenizer, prompts, self.exemplars, ctx, margin, tokens)

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


def _new_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        raise ConfigError(f"{folder} already holds an expert library; write to a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _finish(folder: Path, storage: str, targets: list[dict[str, Any]], z: Mapping[str, Mapping[str, torch.Tensor]],
            max_mult: float, meta: Mapping[str, Any]) -> Path:
    """z, experts.json, then the manifest (last) over every other file of the folder."""
    safetensors.torch.save_file({f"{k}::{n}": t.detach().float().cpu().contiguous() for k, zs in z.items()
                                 for n, t in zs.items()}, folder / EXPERTS_FILE)
    doc = {
        **{k: v for k, v in dict(meta).items() if k not in _DOC_KEYS},
        "format_version": FORMAT_VERSION,
        "storage": storage,
        "composition": COMPOSITION,
        "max_mult": max_mult,
        "targets": targets,
        "skills": sorted(z),
    }
    (folder / DOC_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha(p)}
             for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=2, sort_keys=True))
    return folder


def save_experts(folder: str | Path, bases: Mapping[str, TargetBasis], z: Mapping[str, Mapping[str, torch.Tensor]],
                 max_mult: float, meta: Mapping[str, Any]) -> Path:
    """Write a library folder with its basis (see the module docstring); the manifest goes last."""
    folder = _new_folder(folder)
    basis_t = {}
    for n, b in bases.items():
        basis_t.update({f"{n}.U": b.U.contiguous(), f"{n}.S": b.S.contiguous(), f"{n}.Vh": b.Vh.contiguous()})
    safetensors.torch.save_file(basis_t, folder / BASIS_FILE)
    lib = ExpertLibrary(dict(bases), {k: dict(v) for k, v in z.items()}, max_mult)
    return _finish(folder, STORAGE_BASIS, lib.targets(), z, max_mult, meta)


def save_expert_vectors(folder: str | Path, lib: ExpertLibrary) -> Path:
    """Write ``lib`` basis-free: z, the trained singular values and the metadata (module docstring).

    The stored fingerprints and singular values are those of the weights z was **trained** on, also when
    ``lib`` was itself loaded basis-free and re-based.
    """
    folder = _new_folder(folder)
    s = {n: lib.trained_s.get(n, b.S).detach().float().cpu().contiguous() for n, b in lib.bases.items()}
    safetensors.torch.save_file(s, folder / TRAINED_S_FILE)
    return _finish(folder, STORAGE_VECTORS, lib.targets(), lib.z, lib.max_mult, lib.meta)


def _shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear-like layer (nn.Linear, BitLinear, PackedBitLinear), None for anything else."""
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    if is_ternary(module):  # PackedBitLinear: no weight Parameter
        return int(module.out_features), int(module.in_features)
    return None


def check_targets(model: nn.Module, targets: Sequence[Mapping[str, Any]]) -> None:
    """Refuse (ConfigError, before any compute) a model that lacks a target or has one of another shape or kind."""
    modules = dict(model.named_modules())
    problems = []
    for t in targets:
        name = t["name"]
        module = modules.get(name)
        shape = None if module is None else _shape(module)
        if module is None:
            problems.append(f"{name}: no such layer")
        elif shape is None:
            problems.append(f"{name}: a {type(module).__name__}, not a linear layer")
        elif list(shape) != list(t["shape"]):
            problems.append(f"{name}: shape {list(shape)}, the experts were trained on {list(t['shape'])}")
        elif bool(t["ternary"]) != is_ternary(module):
            kinds = ("a ternary (BitLinear) layer", "a dense layer")
            problems.append(f"{name}: trained on {kinds[0] if t['ternary'] else kinds[1]}, the model's is "
                            f"{kinds[0] if is_ternary(module) else kinds[1]}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(f"this expert library does not fit {type(model).__name__}: {'; '.join(problems[:3])}{more}")


def rebase(model: nn.Module, targets: Sequence[Mapping[str, Any]], trained_s: Mapping[str, torch.Tensor]
           ) -> tuple[dict[str, TargetBasis], dict[str, TargetRebase]]:
    """The bases of ``targets`` recomputed (fp32 SVD) from ``model``'s effective weights, keeping each target's
    stored number of directions, and how far each moved from the trained basis."""
    check_targets(model, targets)
    modules = dict(model.named_modules())
    bases, report = {}, {}
    for t in targets:
        b = basis_of(t["name"], modules[t["name"]], int(t["rank"]))
        if b.rank != int(t["rank"]):
            raise ConfigError(f"{t['name']}: {b.rank} directions, the experts scale {t['rank']}")
        s0 = trained_s[t["name"]].float()
        rel = float(torch.linalg.vector_norm(b.S - s0) / torch.linalg.vector_norm(s0).clamp_min(1e-30))
        bases[b.name] = b
        report[b.name] = TargetRebase(b.name, t["fingerprint"], b.fingerprint, rel)
    changed = [r for r in report.values() if r.changed]
    if changed:
        log.warning("expert library re-based on other weights than it was trained on: %d of %d targets changed "
                    "(singular values moved by up to %.3g relative); z trained on the old basis is applied to the "
                    "new one", len(changed), len(report), max(r.s_rel_change for r in changed))
    return bases, report


def load_experts(folder: str | Path, model: nn.Module | None = None) -> ExpertLibrary:
    """Read a library written by :func:`save_experts` or :func:`save_expert_vectors`, verifying every file
    against the manifest first. A basis-free library needs ``model`` and is re-based on it (module docstring);
    for a library with its basis ``model`` is not needed (``apply`` checks the weights' fingerprints).

    Raises:
        ArtifactIntegrityError: a missing manifest, a missing or changed file (named), an unknown format.
        ConfigError: a basis-free library without ``model``, or a model its targets do not fit.
    """
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ArtifactIntegrityError(f"{folder}: no manifest.json (an incomplete or foreign expert library)")
    listed = json.loads(manifest.read_text())["files"]
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha(path) != entry["sha256"]:
            raise ArtifactIntegrityError(f"{path}: missing or does not match the library's manifest")
    if DOC_FILE not in listed:
        raise ArtifactIntegrityError(f"{folder / DOC_FILE}: missing from the library's manifest")
    doc = json.loads((folder / DOC_FILE).read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactIntegrityError(f"{folder}: expert library format {doc.get('format_version')}, "
                                     f"this code reads {FORMAT_VERSION}")
    storage = doc.get("storage", STORAGE_BASIS)
    if storage not in REQUIRED:
        raise ArtifactIntegrityError(f"{folder / DOC_FILE}: unknown storage {storage!r}")
    for name in REQUIRED[storage]:
        if name not in listed:
            raise ArtifactIntegrityError(f"{folder / name}: missing from the library's manifest "
                                         f"(a {storage!r} library needs {list(REQUIRED[storage])})")
    targets = doc["targets"]
    z: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in safetensors.torch.load_file(folder / EXPERTS_FILE).items():
        skill, name = key.split("::", 1)
        z.setdefault(skill, {})[name] = t
    for skill, zs in z.items():
        for t in targets:
            if t["name"] not in zs or zs[t["name"]].numel() != int(t["rank"]):
                raise ArtifactIntegrityError(f"{folder / EXPERTS_FILE}: expert {skill!r} has no {t['rank']}-entry "
                                             f"vector for {t['name']}")
    if storage == STORAGE_BASIS:
        basis_t = safetensors.torch.load_file(folder / BASIS_FILE)
        bases = {t["name"]: TargetBasis(t["name"], basis_t[f"{t['name']}.U"], basis_t[f"{t['name']}.S"],
                                        basis_t[f"{t['name']}.Vh"], bool(t["ternary"]), int(t["full_rank"]),
                                        t["fingerprint"]) for t in targets}
        return ExpertLibrary(bases=bases, z=z, max_mult=float(doc["max_mult"]), meta=doc,
                             trained_s={n: b.S for n, b in bases.items()})
    if model is None:
        raise ConfigError(f"{folder} stores no basis (storage {storage!r}): pass the model the experts are applied "
                          "to, load_experts(folder, model=...), so the basis is recomputed from its weights")
    trained_s = safetensors.torch.load_file(folder / TRAINED_S_FILE)
    missing = [t["name"] for t in targets if t["name"] not in trained_s]
    if missing:
        raise ArtifactIntegrityError(f"{folder / TRAINED_S_FILE}: no singular values for {missing[:3]}")
    bases, report = rebase(model, targets, trained_s)
    return ExpertLibrary(bases=bases, z=z, max_mult=float(doc["max_mult"]), meta=doc, rebased=report,
                         trained_s=dict(trained_s))
