"""Packed BitNet folders: write them, read them back for integer inference, and measure them on disk.

A folder written by :func:`export_packed` holds:

- ``model.safetensors`` — for every converted layer ``<name>``: ``<name>.weight`` (uint8 packed ternary
  codes, ``(ceil(out/4), in)`` for "2bit", ``(ceil(out/5), in)`` for "base3"), ``<name>.weight_scale``
  (float32 ``(1,)``, s_w = 1/mean|W|, the output is *divided* by it), ``<name>.bias`` and
  ``<name>.rms_norm.weight`` when present; every other tensor in ``kept_dtype`` (tied tensors once).
- ``config.json`` — the model's config; for "2bit" with ``quantization_config`` =
  ``{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
  "use_rms_norm": <act_norm == "rms">, "rms_norm_eps": ..., "modules_to_not_convert": <every kept
  linear layer>}``, so ``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds it through transformers'
  BitNet support (its ``BitLinear``: same quantisers, same scale convention, same ``LlamaRMSNorm``).
  ``modules_to_not_convert`` is explicit because a given list replaces transformers' default skips.
- ``bitnet.json`` — packing, activation norm, converted layer shapes, kept layers (our own loader's map).
- the tokenizer and ``generation_config.json`` when available.

transformers' ``BitLinear`` allocates ``out // 4`` packed rows, so a "2bit" export refuses layers whose
``out`` is not a multiple of 4 (keep them with a pattern); "base3" is read only by :func:`load_packed`.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
from pathlib import Path
from typing import Any, Iterable

import safetensors.torch
import torch
from torch import nn
from transformers.initialization import no_init_weights
from transformers import AutoConfig, AutoModelForCausalLM

from forge_models.bitnet.convert import bit_linears
from forge_models.bitnet.layers import KERNEL_BACKEND, BitLinear, PackedBitLinear, default_packed_backend
from forge_models.bitnet.packing import PACKINGS
from forge_models.bitnet.quant import weight_quant
from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = [
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "META_FILE",
    "export_packed",
    "load_packed",
    "write_bf16_reference",
    "safetensors_bytes",
    "folder_bytes",
    "packed_linears",
    "LATENT_DIR",
    "save_latent",
    "load_latent",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bitnet.json"
KEPT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LATENT_DIR = "latent"
"""Sub-folder of a packed folder holding the latent weights that later training phases continue from."""
LATENT_META = "bitnet_latent.json"


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage with an earlier one (tied embedding / head)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out


def _kept_linear_names(model: nn.Module) -> list[str]:
    converted = [n for n, _ in bit_linears(model)]
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, BitLinear) and not any(n.startswith(c + ".") for c in converted)
    ]


def export_packed(
    model: nn.Module,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    packing: str = "2bit",
    kept_dtype: str = "float32",
) -> Path:
    """Write ``model`` (converted by :func:`convert_to_bitnet`) as a packed folder; returns the folder.

    The ternary weights are those of the fully quantised layer (quant_strength 1), whatever the
    layers' current strength. The folder is created if needed; existing files of the same name are replaced.

    Raises:
        ConfigError: unknown packing / kept dtype, no BitLinear in the model, or (for "2bit") a converted
            layer whose output size is not a multiple of 4 (transformers cannot load it).
    """
    if packing not in PACKINGS:
        raise ConfigError(f"unknown packing {packing!r}; use one of {sorted(PACKINGS)}")
    if kept_dtype not in KEPT_DTYPES:
        raise ConfigError(f"unknown kept_dtype {kept_dtype!r}; use one of {sorted(KEPT_DTYPES)}")
    layers = dict(bit_linears(model))
    if not layers:
        raise ConfigError("export_packed needs a model converted with convert_to_bitnet (it has no BitLinear)")
    if packing == "2bit":
        odd = [n for n, m in layers.items() if m.out_features % 4]
        if odd:
            raise ConfigError(
                f"layers {odd} have an output size that is not a multiple of 4; transformers' BitLinear cannot "
                f"load them from a 2-bit folder. Keep them in high precision (bitnet.keep_patterns) or use "
                f"packing 'base3'."
            )
    fmt, dtype = PACKINGS[packing], KEPT_DTYPES[kept_dtype]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    for key, t in _dedupe(model.state_dict()).items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "weight":
            q, scale = weight_quant(t)
            tensors[key] = fmt.pack(q.cpu()).contiguous()
            tensors[f"{owner}.weight_scale"] = scale.reshape(1).float().cpu()
        else:
            t = t.detach().cpu()
            tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    norms = {m.act_norm for m in layers.values()}
    if len(norms) != 1:
        raise ConfigError(f"converted layers mix activation norms {sorted(norms)}; convert the model with one setting")
    act_norm = norms.pop()
    eps = next(iter(layers.values())).rms_norm_eps
    kept_linear = _kept_linear_names(model)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if packing == "2bit":
        config.quantization_config = {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
            "use_rms_norm": act_norm == "rms",
            "rms_norm_eps": eps,
            "modules_to_not_convert": kept_linear,
        }
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    meta = {
        "format": FORMAT_VERSION,
        "packing": packing,
        "act_norm": act_norm,
        "rms_norm_eps": eps,
        "kept_dtype": kept_dtype,
        "converted": {n: [m.out_features, m.in_features] for n, m in layers.items()},
        "kept_linear": kept_linear,
        "transformers_loadable": packing == "2bit",
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return folder


def load_packed(folder: str | Path, *, device: str | torch.device = "cpu", backend: str | None = None) -> nn.Module:
    """Rebuild the model of a packed folder with :class:`PackedBitLinear` layers (integer inference).

    Kept tensors are loaded in float32. ``backend`` picks the layers' integer kernel (see
    :data:`forge_models.bitnet.layers.PACKED_BACKENDS`); unset, :func:`default_packed_backend` picks the fused
    ``"ternary_kernel"`` where it builds (calls of up to 32 rows run it on the file's 2-bit codes, which are
    kept as they are; prefill uses ``_int_mm``), else ``"rowwise2bit"`` where torch has fbgemm, else
    ``"int_mm"``. Every backend gives bit-identical outputs. Raises ArtifactIntegrityError naming the file
    when the folder is incomplete, holds an invalid 2-bit code, or does not match the architecture in its
    config.
    """
    folder = Path(folder)
    for name in (META_FILE, WEIGHTS_FILE, "config.json"):
        if not (folder / name).is_file():
            raise ArtifactIntegrityError(f"{folder / name} is missing; {folder} is not a complete packed BitNet folder")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION or meta.get("packing") not in PACKINGS:
        raise ArtifactIntegrityError(f"{folder / META_FILE}: unsupported format {meta.get('format')} / packing {meta.get('packing')}")
    fmt = PACKINGS[meta["packing"]]
    backend = backend or default_packed_backend()
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the packed layers ourselves
    config.dtype = torch.float32
    # Skipping initialisation leaves the float linear weights as untouched allocations: they are replaced by
    # packed layers below and freed without ever becoming resident, so loading never holds the fp32 model
    # (peak RSS stays near the packed size). Every tensor kept is loaded from the file; missing ones raise.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config).float()
    model.tie_weights()  # init_weights (which ties) was skipped with the initialisation
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))

    for name, (out_features, in_features) in meta["converted"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise ArtifactIntegrityError(f"{folder / META_FILE}: the model has no layer {name!r}") from exc
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (out_features, in_features):
            raise ArtifactIntegrityError(f"{folder / META_FILE}: layer {name!r} does not match the config's architecture")
        try:
            packed, scale = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale")
        except KeyError as exc:
            raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE} lacks {exc.args[0]}") from exc
        if packed.shape[1:] != (in_features,):
            raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE}: {name}.weight has shape {tuple(packed.shape)}")
        extra = dict(bias=tensors.pop(f"{name}.bias", None),
                     rms_norm_weight=tensors.pop(f"{name}.rms_norm.weight", None),
                     rms_norm_eps=float(meta["rms_norm_eps"]), backend=backend)
        if meta["packing"] == "2bit" and backend == KERNEL_BACKEND:
            # The file's 2-bit layout is the fused kernel's: used as is, nothing unpacked (load peak memory).
            shape_only = torch.empty((out_features, in_features), dtype=torch.int8, device="meta")
            try:
                layer = PackedBitLinear(shape_only, scale, codes_2bit=packed, **extra)
            except ConfigError as exc:
                raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE}: {name}.weight: {exc}") from exc
        else:
            layer = PackedBitLinear(fmt.unpack(packed, out_features), scale, **extra)
        model.set_submodule(name, layer)

    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE} has tensors the model lacks: {result.unexpected_keys[:5]}")
    converted = tuple(f"{n}." for n in meta["converted"])
    missing = {k for k in result.missing_keys if not k.startswith(converted)} - _tied_aliases(model, tensors)
    if missing:
        raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE} lacks tensors: {sorted(missing)[:5]}")
    del tensors
    _release_freed_heap()
    return model.to(device).eval()


def _release_freed_heap() -> None:
    """Hand memory freed during loading back to the OS (glibc only; a no-op elsewhere).

    Unpacking and re-laying out each layer allocates transients of a few MB; glibc keeps such freed blocks
    in the heap, which left a loaded 23 MB packed model at ~59 MB resident instead of ~33 MB (measured with
    ``bench/bitnet_inference.py``'s fresh-process RSS). ``malloc_trim(0)`` returns them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_latent(model: nn.Module, folder: str | Path, *, keep_patterns: Iterable[str], act_norm: str) -> Path:
    """Write a converted model's latent fp32 weights and its conversion settings, so training can go on.

    The packed folder is what runs; this is what trains: later phases (the Forge training loop) rebuild
    the BitLinear model with :func:`load_latent` and keep training the latent weights through the
    quantised forward pass. Stored as ``model.safetensors`` + ``config.json`` (without quantization
    config) + ``bitnet_latent.json``.
    """
    layers = dict(bit_linears(model))
    if not layers:
        raise ConfigError("save_latent needs a model converted with convert_to_bitnet (it has no BitLinear)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in _dedupe(model.state_dict()).items()}
    safetensors.torch.save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(folder)
    meta = {"format": FORMAT_VERSION, "keep_patterns": list(keep_patterns), "act_norm": act_norm,
            "rms_norm_eps": next(iter(layers.values())).rms_norm_eps, "converted": sorted(layers)}
    (folder / LATENT_META).write_text(json.dumps(meta, indent=1))
    return folder


def load_latent(folder: str | Path) -> nn.Module:
    """Rebuild the BitLinear model (latent fp32 weights, quant strength 1) written by :func:`save_latent`.

    Raises ArtifactIntegrityError naming the file when the folder is incomplete or does not match.
    """
    from forge_models.bitnet.convert import convert_to_bitnet

    folder = Path(folder)
    for name in (LATENT_META, WEIGHTS_FILE, "config.json"):
        if not (folder / name).is_file():
            raise ArtifactIntegrityError(f"{folder / name} is missing; {folder} is not a latent BitNet folder")
    meta = json.loads((folder / LATENT_META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ArtifactIntegrityError(f"{folder / LATENT_META}: unsupported format {meta.get('format')}")
    config = AutoConfig.from_pretrained(folder)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config).float()
    conversion = convert_to_bitnet(model, meta["keep_patterns"], meta["act_norm"], meta["rms_norm_eps"])
    if sorted(conversion.converted) != meta["converted"]:
        raise ArtifactIntegrityError(f"{folder / LATENT_META}: the rebuilt model converts different layers "
                                     f"({len(conversion.converted)} vs {len(meta['converted'])})")
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE} has tensors the model lacks: {result.unexpected_keys[:5]}")
    missing = set(result.missing_keys) - _tied_aliases(model, tensors)
    if missing:
        raise ArtifactIntegrityError(f"{folder / WEIGHTS_FILE} lacks tensors: {sorted(missing)[:5]}")
    return model


def _tied_aliases(model: nn.Module, loaded: Iterable[str]) -> set[str]:
    """State-dict keys whose tensor is shared with a key that was loaded (so they were loaded too)."""
    loaded = set(loaded)
    state = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for key, t in state.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    aliases = set()
    for keys in by_storage.values():
        if len(keys) > 1 and loaded & set(keys):
            aliases.update(keys)
    return aliases


def packed_linears(model: nn.Module) -> list[tuple[str, PackedBitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedBitLinear)]


# -------------------------------------------------------------------------------------------- sizes


def safetensors_bytes(path: str | Path, linear_names: Iterable[str]) -> dict[str, int]:
    """Bytes of a safetensors file by category, read from its header (the file itself, not estimates).

    ``linear``: ``<name>.weight`` and ``<name>.weight_scale`` of the given layers; ``other``: every other
    tensor; ``header``: the 8-byte length plus the JSON header; ``file``: the file size on disk.
    """
    path = Path(path)
    names = set(linear_names)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    sizes = {"linear": 0, "other": 0, "header": 8 + n, "file": path.stat().st_size}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        owner, _, leaf = key.rpartition(".")
        sizes["linear" if owner in names and leaf in ("weight", "weight_scale") else "other"] += end - start
    if sizes["linear"] + sizes["other"] + sizes["header"] != sizes["file"]:
        raise ArtifactIntegrityError(f"{path}: tensor bytes and header do not add up to the file size")
    return sizes


def folder_bytes(folder: str | Path) -> int:
    """Total bytes of all files under ``folder``."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def write_bf16_reference(model: nn.Module, path: str | Path) -> Path:
    """Write the bf16 model of the same shape (the original architecture, weights in bf16) to ``path``.

    Converted layers contribute their latent ``weight``/``bias`` under their original names; the
    activation norms BitLinear adds are not part of the original architecture and are left out.
    """
    layers = {n for n, _ in bit_linears(model)}
    state = {
        k: v.detach().cpu().to(torch.bfloat16).contiguous() if v.is_floating_point() else v.detach().cpu()
        for k, v in _dedupe(model.state_dict()).items()
        if not any(k.startswith(f"{n}.rms_norm.") for n in layers)
    }
    path = Path(path)
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    return path
