"""The JSON part of the Forge loop's state: what ``state.json`` of a checkpoint holds (tensors are elsewhere)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["LoopState"]


@dataclass
class LoopState:
    """Where the loop is, what it has measured, and what it remembers (JSON-serialisable, resumable).

    The stage records, rollbacks, events and dream cycles are lists of plain dicts: they go to the report
    and ``phase.json`` as they are.
    """

    step: int = 0  # global optimizer steps done
    stage: int = 0  # index of the current stage in cfg.stages (== len(stages) when done)
    stage_step: int = 0  # steps done in the current stage
    checks: int = 0  # checks done (the curriculum's probe stream index)
    done: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)  # one per entered stage
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # e.g. chaos halved
    best_val: float | None = None  # best check loss so far, and its step
    best_step: int = 0
    chaos_scale: float = 1.0  # halved on noisy losses and rollbacks
    dream_buffer: list[str] = field(default_factory=list)  # kept dreams, oldest first
    dream_cycles: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)  # the last check's values
    stage_vals: list[float] = field(default_factory=list)  # check losses in the current stage
    recent_losses: list[float] = field(default_factory=list)  # train losses since the last check
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    stage_band: int = 0  # consecutive in-band checks in the stage
    stage_stable: int = 0  # consecutive checks near the best in the stage
    stage_dream_cycles: int = 0
    stage_dream_kept: int = 0
    curriculum: dict[str, Any] = field(default_factory=dict)  # the controller's state
    grok_shapes: dict[str, int | None] = field(default_factory=dict)  # Grokfast buffers to allocate on resume

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoopState":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"loop state has unknown entries {unknown}")
        return cls(**data)
