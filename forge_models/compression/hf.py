"""Loading a compressed folder with ``AutoModelForCausalLM.from_pretrained`` (after ``import forge_models``).

The compression phase writes ``quantization_config = {"quant_method": "forge_compressed", "format": ...}``
into the folder's ``config.json`` and a ``model.safetensors.index.json`` that maps the plain tensors (norms,
biases) to their shard, so transformers finds a checkpoint and loads those itself. The encoded tensors are not
in the index: :class:`ForgeCompressedQuantizer`, registered under that method name in transformers' quantizer
registry, decodes them from the recipe after transformers has loaded the rest (the same code as
:func:`forge_models.compression.artifact.load_compressed`), in the dtype ``from_pretrained`` was asked for, and
replaces ternary BitLinear weights by packed layers.

Deviation from transformers' built-in quantizers: the decoded weights are dense tensors in the compute
dtype, not kernels that run on the codes (as load_compressed). Serialising the loaded model again
(``save_pretrained``) is refused: the folder is the artifact; recompress from a plain model instead.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from forge_models.compression.artifact import FORMAT, RECIPE_FILE, install_weights, read_artifact
from forge_models.runtime import ArtifactIntegrityError

__all__ = ["METHOD", "INDEX_FILE", "ForgeCompressedConfig", "ForgeCompressedQuantizer", "write_hf_files"]

METHOD = "forge_compressed"
INDEX_FILE = "model.safetensors.index.json"


class ForgeCompressedConfig(QuantizationConfigMixin):
    """The ``quantization_config`` entry of a compressed folder's ``config.json``."""

    def __init__(self, format: str = FORMAT, **kwargs: Any):  # noqa: A002  (the stored key's name)
        self.quant_method = METHOD
        self.format = format

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "format": self.format}


class _TiedWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "This checkpoint seem corrupted. The tied weights" not in record.getMessage()


def _modeling_logger() -> logging.Logger:
    return logging.getLogger("transformers.modeling_utils")


class ForgeCompressedQuantizer(HfQuantizer):
    """Decodes the recipe's tensors into the model transformers built from the folder's config."""

    requires_calibration = True  # only loads folders the compression phase wrote; never quantizes on the fly

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.quantization_config.format != FORMAT:
            raise ArtifactIntegrityError(
                f"quantization_config format {self.quantization_config.format!r}: this code reads {FORMAT}"
            )

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        # The encoded tensors are decoded after loading, not missing: keep them out of transformers' load report.
        recipe = json.loads((Path(model.config.name_or_path) / RECIPE_FILE).read_text())
        names = set(recipe["tensors"])
        tied = getattr(model, "_tied_weights_keys", None)
        if getattr(model.config, "tie_word_embeddings", False) and isinstance(tied, dict):
            names |= set(tied)  # tied to an encoded tensor: tied again after decoding
        patterns = {"^" + re.escape(n) + "$" for n in names}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | patterns
        # transformers warns that a tied pair absent from the index is a corrupted checkpoint; here it is encoded.
        self._filter = _TiedWarningFilter()
        _modeling_logger().addFilter(self._filter)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        if getattr(self, "_filter", None) is not None:
            _modeling_logger().removeFilter(self._filter)
            self._filter = None
        folder = Path(model.config.name_or_path)
        recipe, fields, plain = read_artifact(folder)
        ref = next(p for p in model.parameters() if p.is_floating_point())
        install_weights(model, recipe, fields, plain, ref.dtype, str(folder))
        model.to(ref.device)

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(ForgeCompressedConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(ForgeCompressedQuantizer)


def write_hf_files(folder: Path, plain_shard: str, plain_names: list[str]) -> None:
    """Make ``folder`` loadable by ``from_pretrained``: the quantization_config in config.json and the index of
    the plain tensors (written before the recipe, which is the artifact's last file)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = ForgeCompressedConfig().to_dict()
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    index = {"metadata": {"format": FORMAT}, "weight_map": {n: plain_shard for n in sorted(plain_names)}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))


register()
