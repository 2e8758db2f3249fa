"""The resumable checkpoint format every training phase shares (and `tasks/` mirrors to the store).

A stage's checkpoints live in ``<checkpoint_dir>/<stage>/step-XXXXXX/``: ``model.safetensors`` (weights,
never pickled), ``optimizer.pt`` (optimizer and RNG state, read back with ``weights_only=True``),
``state.json`` (stage, step, total, whether final, the digest of what it was written for, phase extras)
and a ``COMPLETE`` marker written last. Only a folder with its marker is trusted; older ones are dropped
once a newer one is complete, then ``ctx.on_checkpoint`` is told (the orchestration layer uploads it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from forge_models.runtime import ConfigError, PhaseContext

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_FORMAT = 1


def digest(payload: dict[str, Any]) -> str:
    """sha256 of a JSON payload: what a checkpoint was written for."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def state_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the model (names, shapes, dtypes, bytes): identifies the weights."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    return digest({
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    })


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint folder of a stage that has its COMPLETE marker, or None."""
    if not stage_dir.is_dir():
        return None
    complete = [p for p in stage_dir.glob("step-*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(
    stage_dir: Path,
    *,
    stage: str,
    step: int,
    total: int,
    config_digest: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: PhaseContext,
    extra: dict[str, Any],
) -> Path:
    """Write a complete checkpoint (marker last), drop older ones of the stage, then notify the caller."""
    folder = stage_dir / f"step-{step:06d}"
    if folder.exists():
        shutil.rmtree(folder)  # a leftover of a crashed write: never trust a half-written folder
    folder.mkdir(parents=True)
    safetensors.torch.save_model(model, str(folder / "model.safetensors"))
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, folder / "optimizer.pt")
    state = {"format": CHECKPOINT_FORMAT, "stage": stage, "step": step, "steps_total": total,
             "final": step == total, "config_digest": config_digest, **extra}
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    (folder / COMPLETE_MARKER).write_text("")
    for old in stage_dir.glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    if ctx.on_checkpoint is not None:
        ctx.on_checkpoint(folder)
    return folder


def load_checkpoint(
    folder: Path,
    *,
    config_digest: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    what: str,
) -> dict[str, Any]:
    """Load weights (and, unless the stage is final, optimizer and RNG state); return state.json.

    Raises ConfigError when the checkpoint was written for something else (``what`` names it).
    """
    state = json.loads((folder / "state.json").read_text())
    if state.get("config_digest") != config_digest:
        raise ConfigError(
            f"checkpoint {folder} was written for a different {what} (digest {state.get('config_digest')} != "
            f"{config_digest}); continuing from it would be unsafe. Clear the checkpoint folder "
            f"{folder.parent.parent} (or use another one) to start over."
        )
    safetensors.torch.load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
    if not state["final"]:
        blob = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"]["torch"])
        if "cuda" in blob["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state
