"""Config of Phase 5 (the Forge training loop): frozen, documented, validated before any training starts.

Defaults are sized for a tiny CPU run (~400 optimizer steps on the tiny Cognate model, 1-2 minutes);
larger presets override the stage budgets, batch size and sequence length. The ten stages are listed
explicitly (``stages``), each with its step budget, exit criterion and what it switches on, so the
config reads as the plan of the run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forge_models.config import DataMix, Frozen, data_mix_field
from forge_models.training import criteria as _criteria

__all__ = [
    "CHAOS_LIMIT",
    "EXIT_CRITERIA",
    "CurriculumConfig",
    "DreamConfig",
    "GrokfastConfig",
    "SelfModelConfig",
    "StageConfig",
    "TrainingConfig",
    "default_stages",
]

CHAOS_LIMIT = 0.3
"""Design guard rail: gradient noise never exceeds 0.3 x the gradient's own RMS."""

EXIT_CRITERIA = tuple(_criteria.EXIT_CRITERIA)
"""Exit criteria a stage may name: the registry of forge_models.training.criteria (what each one checks)."""


class GrokfastConfig(Frozen):
    """Grokfast gradient filter (arXiv 2405.20233), applied between backward() and the optimizer step."""

    enabled: bool = Field(
        False,
        description=(
            "Filter the gradients of the model (not of the self-model head). Off by default: on the tiny-preset "
            "trunk, EMA (0.98, 2.0) raised the held-out loss while plain AdamW lowered it (bench/training_loop.py)."
        ),
    )
    kind: Literal["ema", "ma"] = Field("ema", description="'ema' (one extra buffer) or 'ma' (window_size buffers).")
    alpha: float = Field(0.98, gt=0, lt=1, description="EMA momentum (paper default 0.98).")
    lamb: float = Field(2.0, ge=0, le=100, description="Amplification of the slow component (paper: 2.0 EMA, 5.0 MA).")
    window_size: int = Field(100, ge=1, le=10_000, description="MA window, the current gradient included (paper: 100).")


class CurriculumConfig(Frozen):
    """Edge-of-chaos curriculum: generated tasks at a difficulty kept where held-out success is in a band."""

    enabled: bool = Field(True, description="Feed generated tasks at the controlled difficulty in curriculum stages.")
    families: list[Literal["arithmetic", "tool"]] = Field(
        default_factory=lambda: ["arithmetic", "tool"], description="Task families generated (answer-checked ones)."
    )
    band_low: float = Field(0.55, gt=0, lt=1, description="Lower edge of the target held-out success band.")
    band_high: float = Field(0.75, gt=0, lt=1, description="Upper edge of the target held-out success band.")
    window: int = Field(48, ge=4, le=10_000, description="Fresh held-out samples per success measurement.")
    gain: float = Field(
        0.3, gt=0, le=5, description="Difficulty change per unit of success outside the band (proportional control)."
    )
    initial_difficulty: float = Field(0.0, ge=0, le=1, description="Difficulty in [0, 1] when the curriculum starts.")
    min_operand: int = Field(2, ge=2, le=10_000, description="Largest operand at difficulty 0.")
    max_operand: int = Field(999, ge=2, le=1_000_000, description="Largest operand at difficulty 1 (log-spaced between).")
    batch_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of each batch's rows filled with curriculum tasks in curriculum stages."
    )

    @model_validator(mode="after")
    def _check(self) -> "CurriculumConfig":
        if self.band_low >= self.band_high:
            raise ValueError(f"curriculum.band_low ({self.band_low}) must be < band_high ({self.band_high})")
        if self.max_operand < self.min_operand:
            raise ValueError("curriculum.max_operand must be >= min_operand")
        if not self.families:
            raise ValueError("curriculum.families must name at least one family (arithmetic, tool)")
        return self


class DreamConfig(Frozen):
    """Dream consolidation: sample at high temperature, keep answer-checked samples, replay them with real data."""

    enabled: bool = Field(True, description="Run dream cycles in dream stages and replay what they kept.")
    every: int = Field(15, ge=1, le=1_000_000, description="Optimizer steps between dream cycles within a dream stage.")
    n_samples: int = Field(16, ge=1, le=4096, description="Prompts dreamt on per cycle (one sample each).")
    temperature: float = Field(1.2, gt=0, le=10, description="Sampling temperature of dreams (above 1 = hotter).")
    max_new_tokens: int = Field(48, ge=4, le=1024, description="Longest dream continuation.")
    replay_ratio: float = Field(
        0.25, ge=0, lt=1, description="Share of batch rows filled from the dream buffer; the rest stays real data."
    )
    buffer_size: int = Field(256, ge=1, le=1_000_000, description="Kept dreams remembered (oldest dropped first).")
    min_cycles: int = Field(2, ge=1, le=1000, description="Exit criterion 'dreams_kept': cycles needed in the stage.")


class SelfModelConfig(Frozen):
    """Self-modelling: an auxiliary head predicts the model's own tempered output distribution from an early layer."""

    enabled: bool = Field(True, description="Train the self-model head (it is never part of the exported model).")
    weight: float = Field(
        0.1, ge=0, le=10, description="Weight of the self-model loss on the trunk (times the stage's multiplier)."
    )
    tap_layer: int = Field(0, ge=0, le=1000, description="Decoder layer whose output the head reads (first call).")
    temperature: float = Field(2.0, gt=0, le=100, description="Temperature of the target: softmax(logits / T).")
    fit_ratio: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Exit criterion 'self_model_fit': head loss <= fit_ratio x the copy baseline's (logit lens).",
    )


class StageConfig(Frozen):
    """One of the loop's stages: budget, exit criterion and what it switches on."""

    name: str = Field(description="Stage name (lowercase letters, digits, dashes).", pattern=r"^[a-z0-9-]{1,40}$")
    group: Literal["adapt", "ramp", "dream", "self", "stabilise"] = Field(description="Which part of the plan it is.")
    steps: int = Field(ge=1, le=10_000_000, description="Step budget: the stage ends here if its criterion is unmet.")
    exit: str = Field(description=f"Exit criterion, one of {list(EXIT_CRITERIA)}.")
    curriculum: bool = Field(False, description="Mix curriculum tasks into the batches (and run the controller).")
    chaos: float = Field(0.0, ge=0, le=CHAOS_LIMIT, description="Gradient-noise scale (x gradient RMS), <= 0.3.")
    dreams: bool = Field(False, description="Run dream cycles in this stage.")
    replay: bool = Field(False, description="Replay kept dreams in this stage's batches.")
    self_model: float = Field(0.0, ge=0, le=10, description="Multiplier of self_model.weight on the trunk here.")
    lr_decay: bool = Field(False, description="Decay the learning rate linearly to lr_min_ratio x lr over the budget.")

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.exit not in EXIT_CRITERIA:
            raise ValueError(f"stage {self.name!r}: unknown exit criterion {self.exit!r}; use {list(EXIT_CRITERIA)}")
        return self


def default_stages() -> list[StageConfig]:
    """The ten-stage plan: 1-3 base adaptation, 4-6 ramp to the edge of chaos, 7-8 dreams, 9-10 self-model."""
    S = StageConfig
    return [
        S(name="adapt-warmup", group="adapt", steps=30, exit="warmed_up"),
        S(name="adapt-fit", group="adapt", steps=40, exit="val_improved"),
        S(name="adapt-settle", group="adapt", steps=40, exit="val_plateau"),
        S(name="ramp-enter", group="ramp", steps=40, exit="in_band", curriculum=True),
        S(name="ramp-chaos", group="ramp", steps=50, exit="in_band", curriculum=True, chaos=0.15),
        S(name="ramp-edge", group="ramp", steps=50, exit="in_band", curriculum=True, chaos=0.3),
        S(name="dream-1", group="dream", steps=40, exit="dreams_kept", curriculum=True, dreams=True, replay=True),
        S(name="dream-2", group="dream", steps=40, exit="dreams_kept", curriculum=True, dreams=True, replay=True),
        S(name="self-model", group="self", steps=40, exit="self_model_fit", curriculum=True, replay=True,
          self_model=1.0),
        S(name="stabilise", group="stabilise", steps=40, exit="stable", curriculum=True, replay=True,
          self_model=1.0, lr_decay=True),
    ]


class TrainingConfig(Frozen):
    """Phase 5: the Forge training loop (Grokfast, edge-of-chaos curriculum, dreams, self-modelling)."""

    stages: list[StageConfig] = Field(default_factory=default_stages, description="The stages, run in order.")
    lr: float = Field(3e-4, gt=0, le=1.0, description="Peak AdamW learning rate (fine-tuning a trained model).")
    warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up over the first global steps.")
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="Learning rate at the end of an lr_decay stage, x lr.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay on matrices (not norms/embeddings).")
    grad_clip: float = Field(1.0, gt=0, le=100, description="Gradient-norm clip, after Grokfast and noise.")
    chaos_max: float = Field(
        CHAOS_LIMIT, ge=0, le=CHAOS_LIMIT, description="Cap on any stage's gradient noise (design limit 0.3)."
    )
    loss_cv_max: float = Field(
        0.35,
        gt=0,
        description="If the train loss's coefficient of variation between two checks exceeds this, chaos is halved.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per step.")
    seq_len: int = Field(64, ge=16, le=32768, description="Tokens per sequence.")
    data_mix: DataMix = data_mix_field("Sampling weight of each corpus kind in the real-data rows.")
    eval_every: int = Field(10, ge=1, description="Steps between checks (held-out loss, curriculum success, criteria).")
    check_tokens: int = Field(2048, ge=64, le=10_000_000, description="Validation tokens scored at each check.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    max_regression: float = Field(
        0.25, gt=0, description="Roll back to the best state when the check loss exceeds the best by this (nats)."
    )
    min_improvement: float = Field(0.01, ge=0, description="Criterion 'val_improved': loss drop from stage entry (nats).")
    plateau_tol: float = Field(0.005, ge=0, description="Criterion 'val_plateau': relative change between checks.")
    band_checks: int = Field(2, ge=1, le=100, description="Criterion 'in_band': consecutive checks in the band.")
    stable_checks: int = Field(2, ge=1, le=100, description="Criterion 'stable': consecutive checks near the best.")
    stable_tol: float = Field(0.02, ge=0, description="Criterion 'stable': check loss <= best + this (nats).")
    max_loss_increase: float = Field(
        0.2, ge=0, description="Quality gate: harness held-out loss may exceed the input model's by at most this."
    )
    grokfast: GrokfastConfig = Field(default_factory=GrokfastConfig, description="Grokfast gradient filter.")
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig, description="Edge-of-chaos curriculum.")
    dreams: DreamConfig = Field(default_factory=DreamConfig, description="Dream consolidation and replay.")
    self_model: SelfModelConfig = Field(default_factory=SelfModelConfig, description="Self-model auxiliary head.")

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if not self.stages:
            raise ValueError("training.stages must list at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"training.stages names must be unique, got {names}")
        for s in self.stages:
            if s.chaos > self.chaos_max:
                raise ValueError(f"stage {s.name!r}: chaos {s.chaos} exceeds training.chaos_max {self.chaos_max}")
        real_rows = self.batch_size - round(self.batch_size * self.curriculum.batch_fraction) - round(
            self.batch_size * self.dreams.replay_ratio)
        if real_rows < 1:
            raise ValueError(
                f"batch_size {self.batch_size} leaves no real-data rows after curriculum ({self.curriculum.batch_fraction}) "
                f"and dream replay ({self.dreams.replay_ratio}) shares: real data must anchor every batch"
            )
        if self.warmup_steps >= sum(s.steps for s in self.stages):
            raise ValueError("training.warmup_steps must be < the total step budget of the stages")
        return self
