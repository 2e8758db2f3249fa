"""The contract every phase in `forge_models` follows, and the errors it may raise.

A phase is a plain function ``run(inputs, cfg, ctx) -> PhaseOutput``: models and data in memory in,
models and *measured* metrics out. ``ctx`` carries the explicit device, seed, precision, a local folder
for resumable checkpoints, and a :class:`Tracker` for metrics and progress. The orchestration layer
(``tasks/``) supplies a tracker that writes to MLflow and Prefect; unit tests use :class:`NullTracker`.

Nothing here imports Prefect, MLflow or s3fs: the ML library must run and be tested without servers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch


class ForgeError(Exception):
    """An error that retrying cannot fix (bad config, divergence, OOM, failed quality gate, bad artifact).

    The orchestration layer never retries these; the message must say what to change.
    """


class ConfigError(ForgeError):
    """The configuration is invalid or contradictory."""


class TrainingDiverged(ForgeError):
    """The loss became NaN or infinite."""


class OutOfMemory(ForgeError):
    """The device ran out of memory."""


class QualityGateFailed(ForgeError):
    """A phase ran but did not reach the minimum quality it promises; its output is not stored."""


class ArtifactIntegrityError(ForgeError):
    """A stored artifact is missing, incomplete, tampered with or of the wrong kind."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that are pickles: loading one runs whatever code it carries."""


def refuse_pickles(folder, field: str) -> None:
    """Raise ConfigError if a model folder holds pickled weights, before ``from_pretrained`` could unpickle them.

    ``from_pretrained`` falls back to ``pytorch_model.bin`` (``torch.load``) when a folder has no safetensors;
    callers also pass ``use_safetensors=True``, and this check names the file and says what to do.
    """
    from pathlib import Path

    pickles = sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"{field}: {folder} holds pickled weights ({', '.join(pickles)}), which are refused since loading a "
            "pickle runs code; keep only .safetensors weights there (convert them where you trust them)"
        )


class Tracker(Protocol):
    """Side channel for metrics and progress. Implementations must be cheap and never raise."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def progress(self, done: int, total: int, message: str = "") -> None: ...


class NullTracker:
    """Tracker that drops everything (unit tests, library use)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def progress(self, done: int, total: int, message: str = "") -> None:
        pass


class RecordingTracker:
    """Tracker that keeps everything in memory (tests and notebooks)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.events: list[tuple[int, int, str]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.events.append((done, total, message))

    def series(self, name: str) -> list[tuple[int | None, float]]:
        return [(s, m[name]) for s, m in self.metrics if name in m]


@dataclass(frozen=True)
class PhaseContext:
    """Everything a phase needs besides its inputs and config. Explicit: no globals.

    Attributes:
        device: where tensors live.
        seed: the run seed; a phase derives its own generators from it.
        precision: "bf16" (autocast), "fp32", or "auto" (bf16 autocast on CPUs with avx512_bf16 and on
            CUDA devices that support it; fp32 otherwise).
        checkpoint_dir: local folder for resumable checkpoints (None disables checkpointing).
        tracker: metrics and progress sink.
        on_checkpoint: called with the folder of a checkpoint once it is complete on local disk, so the
            orchestration layer can mirror it to the store. May raise a transient error.
    """

    device: torch.device = torch.device("cpu")
    seed: int = 0
    precision: str = "auto"
    checkpoint_dir: Path | None = None
    tracker: Tracker = field(default_factory=NullTracker)
    on_checkpoint: Callable[[Path], None] | None = None

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype to train and evaluate with, or None for plain fp32."""
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if self.device.type == "cpu":
            return torch.bfloat16 if _cpu_has_bf16() else None
        return None

    def autocast(self):
        """A context manager for the configured precision (a no-op in fp32)."""
        dtype = self.autocast_dtype()
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class PhaseOutput:
    """What a phase returns.

    Attributes:
        models: named output models ("trunk", "variant-0", ... or "model").
        tokenizer: the tokenizer the models use.
        metrics: flat headline metrics, all measured (e.g. "variant-0/val_ppl").
        evaluations: per evaluated model, the harness metrics before/after, e.g.
            {"before": {"init": {...}}, "after": {"trunk": {...}, "variant-0": {...}}}.
        details: small JSON-serialisable facts for the report (parameter counts, settings per model).
        curves: named loss curves, lists of (step, value), for plots.
    """

    models: dict[str, Any]
    tokenizer: Any
    metrics: dict[str, float]
    evaluations: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def check_finite(loss: torch.Tensor | float, step: int, what: str = "loss") -> None:
    """Raise TrainingDiverged (never retried) on a NaN or infinite loss."""
    value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{what} became {value} at step {step}. Lower the learning rate, raise warmup_steps, "
            f"or set precision to fp32; this is not retried."
        )


def translate_oom(exc: BaseException) -> BaseException:
    """Turn a torch out-of-memory error into OutOfMemory with advice; other errors pass through."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return OutOfMemory(
            f"out of memory: {exc}. Lower batch_size or seq_len, or use a smaller model; not retried."
        )
    return exc
