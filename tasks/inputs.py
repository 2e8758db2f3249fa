"""How a one-model phase task opens its input: which model of the previous output, and how to load it.

Kept apart from `tasks.runtime` on purpose: phase code versions are the import closure of each task module
(`tasks.cache.code_version`), and the loader reaches into `forge_models.bitnet`; only the tasks that take a
model import this module, so editing BitNet does not recompute Cognate or the data step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from forge_models.runtime import ArtifactIntegrityError, refuse_pickles
from tasks.runtime import MODEL_LOAD_LOCK


def input_model_folder(model_root: Path, wanted: str | None, uri: str, field: str | None) -> tuple[str, Path]:
    """The one model a one-model phase takes from the previous output at ``model_root`` (downloaded from ``uri``).

    ``wanted`` names it (the phase's ``field``, e.g. ``bitnet.input_model``); None takes the only one there.
    Raises before any compute when the name is unknown or the choice is ambiguous.
    """
    names = sorted(p.parent.name for p in model_root.glob("*/config.json"))
    if wanted is not None:
        if wanted not in names:
            raise ArtifactIntegrityError(f"{field} {wanted!r} is not in {uri} (it holds {names})")
        return wanted, model_root / wanted
    if len(names) != 1:
        hint = f"set {field} to the one to use" if field else "this phase takes exactly one model"
        raise ArtifactIntegrityError(f"{uri} holds {names}; {hint}")
    return names[0], model_root / names[0]


def load_input_model(folder: Path):
    """A phase's input model: BitLinear from latent weights for a packed BitNet folder, else from_pretrained.

    Returns ``(model, latent_meta)``; ``latent_meta`` is None for a full-precision folder.
    """
    from transformers import AutoModelForCausalLM

    from forge_models import bitnet

    latent = folder / bitnet.LATENT_DIR
    if latent.is_dir():
        return bitnet.load_latent(latent), json.loads((latent / "bitnet_latent.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "bitnet":
        raise ArtifactIntegrityError(
            f"{folder} is a packed BitNet folder without its latent weights (latent/); the training loop needs "
            "them to keep training the ternary model. Run the bitnet phase of this pipeline to produce them."
        )
    refuse_pickles(folder, "input model")
    with MODEL_LOAD_LOCK:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True), None
