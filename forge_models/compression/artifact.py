"""The compressed artifact: one folder that loads back to a runnable transformers model.

Layout::

    config.json                 the model config (architecture; no weights)
    tokenizer files             as ``tokenizer.save_pretrained`` writes them (chat template included)
    recipe.json                 per tensor: encoding, parameters, shape, dtype, shard, bytes, bits/weight
    shard-<group>.safetensors   encoded payloads as ``<tensor>::<field>``; other tensors as ``<tensor>``
    agent.json, experts/        only when the input carried them (phase 7): the chosen agent configuration, as
                                it was, and the expert library basis-free (z only; re-based on the decoded
                                weights at load: ``forge_models.experts.load_experts(folder / "experts", model=m)``)

:func:`load_compressed` builds the architecture from ``config.json``, decodes every tensor to the compute
dtype and loads the state dict; BitLinear layers (encoded ``ternary`` and flagged ``bitlinear``) become
:class:`forge_models.bitnet.layers.PackedBitLinear` with the stored codes and scale. Sizes reported
anywhere are read from these files (:func:`artifact_bytes`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from forge_models.compression.encoders import Encoded, make_encoder
from forge_models.runtime import ArtifactIntegrityError

__all__ = [
    "RECIPE_FILE", "FORMAT", "write_shard", "read_shard", "write_recipe", "read_artifact", "install_weights",
    "load_compressed", "artifact_bytes", "AGENT_FILE", "EXPERTS_DIR",
]

RECIPE_FILE = "recipe.json"
FORMAT = "forge-compressed-v1"
AGENT_FILE = "agent.json"
EXPERTS_DIR = "experts"


def shard_name(group: str) -> str:
    return f"shard-{group}.safetensors"


def write_shard(folder: Path, group: str, encoded: dict[str, Encoded], plain: dict[str, torch.Tensor]) -> Path:
    """Write one group's tensors (atomically: temp file, then rename) and return the path."""
    tensors: dict[str, torch.Tensor] = {}
    for name, enc in encoded.items():
        for field, t in enc.tensors.items():
            tensors[f"{name}::{field}"] = t.detach().cpu().contiguous()
    for name, t in plain.items():
        tensors[name] = t.detach().cpu().contiguous()
    path = folder / shard_name(group)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    return path


def read_shard(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(encoded fields by tensor, plain tensors) of one shard file."""
    fields: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, t in load_file(str(path)).items():
        if "::" in key:
            name, field = key.split("::", 1)
            fields.setdefault(name, {})[field] = t
        else:
            plain[key] = t
    return fields, plain


def write_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    tmp = folder / (RECIPE_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **recipe}, indent=1, sort_keys=True))
    os.replace(tmp, folder / RECIPE_FILE)


def artifact_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes on disk: total, shards (weights) and everything else (config, tokenizer, recipe, agent.json and the
    expert vectors when carried)."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    shards = sum(p.stat().st_size for p in files if p.name.startswith("shard-") and p.suffix == ".safetensors")
    total = sum(p.stat().st_size for p in files)
    return {"total": total, "weights": shards, "other": total - shards}


def decode_entry(entry: dict[str, Any], fields: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    enc = make_encoder({"name": entry["encoding"], **entry["params"]})
    e = Encoded(entry["encoding"], entry["params"], tuple(entry["shape"]), fields, {})
    return enc.decode(e, dtype)


def read_artifact(folder: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(recipe, encoded fields by tensor, plain tensors) of a compressed folder, checked against its recipe.

    Raises:
        ArtifactIntegrityError: missing recipe or shard, a wrong format, a tensor the recipe does not list.
    """
    folder = Path(folder)
    if not (folder / RECIPE_FILE).is_file():
        raise ArtifactIntegrityError(f"{folder} has no {RECIPE_FILE}: not a compressed artifact")
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    if recipe.get("format") != FORMAT:
        raise ArtifactIntegrityError(f"{folder}/{RECIPE_FILE} has format {recipe.get('format')!r}, expected {FORMAT}")
    plain: dict[str, torch.Tensor] = {}
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(set(e["shard"] for e in recipe["tensors"].values()) | set(recipe["plain"].values())):
        path = folder / shard
        if not path.is_file():
            raise ArtifactIntegrityError(f"shard {path} listed in the recipe is missing")
        f, p = read_shard(path)
        fields.update(f)
        plain.update(p)
    unlisted = [n for n in fields if n not in recipe["tensors"]]
    if unlisted:
        raise ArtifactIntegrityError(f"{folder} holds {unlisted[0]!r}, which the recipe does not list")
    return recipe, fields, plain


def install_weights(
    model: nn.Module, recipe: dict[str, Any], fields: dict[str, dict[str, torch.Tensor]],
    plain: dict[str, torch.Tensor], dtype: torch.dtype, where: str = "the artifact",
) -> nn.Module:
    """Decode every recipe tensor to ``dtype`` and put it, and the plain tensors, into ``model`` (built from the
    artifact's config, on the meta device or not): BitLinear weights become PackedBitLinear layers.

    Raises:
        ArtifactIntegrityError: a recipe tensor with no payload, a parameter left without a stored value.
    """
    from forge_models.bitnet.layers import PackedBitLinear

    state: dict[str, torch.Tensor] = {name: t.to(dtype) for name, t in plain.items()}
    packed: dict[str, PackedBitLinear] = {}
    for name, f in fields.items():
        entry = recipe["tensors"][name]
        if entry.get("bitlinear"):
            module = name.rsplit(".", 1)[0]
            enc = make_encoder({"name": entry["encoding"], **entry["params"]})
            q, scale = enc.decode_codes(Encoded(entry["encoding"], entry["params"], tuple(entry["shape"]), f))
            bl = entry["bitlinear"]
            norm = plain.get(f"{module}.rms_norm.weight")
            packed[module] = PackedBitLinear(
                q, scale, None if bl.get("bias") is None else plain[f"{module}.bias"].float(),
                None if norm is None else norm.float(), bl.get("eps", 1e-6),
            )
        else:
            state[name] = decode_entry(entry, f, dtype)
    missing = [n for n in recipe["tensors"] if n not in state and n.rsplit(".", 1)[0] not in packed]
    if missing:
        raise ArtifactIntegrityError(f"tensors in the recipe but in no shard: {missing[:5]}")
    for module, layer in packed.items():
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        for key in [k for k in state if k.startswith(module + ".")]:
            del state[key]
    model.load_state_dict(state, strict=False, assign=True)
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    for n in leftover:  # non-persistent buffers (rotary inv_freq) are recomputed, not stored
        if "rotary_emb" not in n:
            raise ArtifactIntegrityError(f"{where}: parameter {n} has no stored value")
    if leftover:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compressed model from its folder, weights decoded to ``dtype`` on ``device``.

    ``AutoModelForCausalLM.from_pretrained(folder)`` (after ``import forge_models``) does the same through
    transformers' quantizer registry (:mod:`forge_models.compression.hf`).

    Raises:
        ArtifactIntegrityError: missing recipe or shard, a tensor missing or unexpected, a bad payload.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    recipe, fields, plain = read_artifact(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # that entry is for from_pretrained; here we decode directly
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_weights(model, recipe, fields, plain, dtype, str(folder))
    return model.to(device).eval()
