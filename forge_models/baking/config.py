"""BakingConfig: the settings of Phase 6, prompt baking (Bhargava et al., "Prompt Baking", arXiv 2409.13697).

Defaults follow the verified tiny CPU bake of the reference (LoRA r 8, alpha 16 on all seven linear types,
Adam lr 2e-3, fresh trajectories every step) rather than the authors' 8B run (r 32, alpha 1, lr 1e-4, up to
1000 epochs), which needs far more steps than a CPU preset can pay; each such field says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from forge_models.config import LORA_TARGETS, Frozen, LoraSettings

__all__ = ["BakePrompt", "LoraSettings", "BakingConfig", "DEFAULT_TARGETS", "resolve_targets"]


DEFAULT_TARGETS = LORA_TARGETS
"""LoRA target module names per ``config.model_type`` (the reference's toy bake adapts all seven linear types;
the paper's script adapts q/k/v/o only — set ``lora.targets`` for that)."""


def resolve_targets(targets: tuple[str, ...] | None, model_type: str, field: str = "baking.lora.targets") -> tuple[str, ...]:
    """The LoRA targets to use: the explicit ones, else the architecture's default; unknown architectures must
    name them (guessing would silently adapt the wrong layers)."""
    from forge_models.runtime import ConfigError

    if targets:
        return tuple(targets)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"{field}: no default for model_type {model_type!r} (defaults exist for "
                          f"{sorted(DEFAULT_TARGETS)}); name the linear modules to adapt")
    return DEFAULT_TARGETS[model_type]


class BakePrompt(Frozen):
    """One prompt u to bake, and the task inputs x its trajectories are conditioned on."""

    name: str = Field(description="Short name used in metric names and file names (letters, digits, -, _).",
                      pattern=r"^[A-Za-z0-9_-]{1,40}$")
    text: str | None = Field(None, description="The prompt text (put in the chat template's system slot; "
                                               "without a template, before the input). Exactly one of text/file.")
    file: str | None = Field(None, description="A UTF-8 text file holding the prompt. Exactly one of text/file.")
    train_inputs: tuple[str, ...] = Field(
        (), description="Inputs x trajectories are sampled for during baking. Empty: the user prompts of the "
                        "dataset's train split (answer-checked examples).")
    heldout_inputs: tuple[str, ...] = Field(
        (), description="Inputs KL is measured on, never trained on. Empty: the user prompts of the evaluation "
                        "split. Must not overlap train_inputs.")

    @model_validator(mode="after")
    def _check(self) -> "BakePrompt":
        if (self.text is None) == (self.file is None):
            raise ValueError(f"prompt {self.name!r}: give exactly one of text or file")
        if self.file is not None and not Path(self.file).is_file():
            raise ValueError(f"prompt {self.name!r}: file {self.file!r} does not exist")
        overlap = set(self.train_inputs) & set(self.heldout_inputs)
        if overlap:
            raise ValueError(f"prompt {self.name!r}: {len(overlap)} held-out inputs are also train inputs, e.g. "
                             f"{sorted(overlap)[0]!r}")
        return self

    def prompt_text(self) -> str:
        return self.text if self.text is not None else Path(self.file).read_text(encoding="utf-8")


class BakingConfig(Frozen):
    """Phase 6: bake system prompts into the weights by forward-KL distillation from the prompted model."""

    input_model: str | None = Field(
        None, description="Which model of a multi-model input to bake (None: the input must hold exactly one).")
    prompts: tuple[BakePrompt, ...] = Field(
        (), description="Prompts baked in this order (sequential baking B(B(theta, u1), u2)): e.g. tools, then "
                        "persona. The phase refuses to run with none.")
    sequence: Literal["cumulative", "chained"] = Field(
        "cumulative",
        description="How several prompts are baked one after another. 'chained' is the paper's B(B(theta, u1), u2): "
                    "bake k's teacher is the model after bake k-1, prompted with u_k alone. 'cumulative' (default, a "
                    "deviation): bake k's teacher is the input model prompted with u_1..u_k joined, so the last bake "
                    "targets exactly what the headline measures (the input with every prompt). On the tiny model "
                    "chained missed that target (KL ratio 0.82-0.98) where one joint prompt reached 0.23; see "
                    "docs/phases/baking.md.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter.")
    steps: int = Field(300, ge=1, le=1_000_000, description="Optimizer steps per prompt (reference toy: 300).")
    lr: float = Field(2e-3, gt=0, le=1.0, description="Adam learning rate (paper 1e-4 at 8B; reference toy 2e-3).")
    trajectory_tokens: int = Field(
        24, ge=1, le=4096, description="Tokens sampled per trajectory (paper: 100-300; toy: 24). Positions after "
                                       "the first EOS do not count.")
    inputs_per_step: int = Field(4, ge=1, le=1024, description="Inputs x drawn per step.")
    samples_per_input: int = Field(
        8, ge=1, le=1024, description="Fresh trajectories sampled per input and step (toy: 32 per step in all). "
                                      "Fresh samples every step: a fixed pool overfits (reference).")
    temperature: float = Field(
        1.0, gt=0, le=10.0, description="Sampling temperature of the trajectories (paper: 2.0, sweeps 1-5; toy 1.0).")
    eval_samples_per_input: int = Field(
        4, ge=1, le=1024, description="Trajectories per held-out input when measuring KL (same seed for every "
                                      "model compared, so the comparisons are paired).")
    max_heldout_inputs: int = Field(32, ge=2, le=100_000, description="Held-out inputs measured at most.")
    half_bake_steps: tuple[int, ...] = Field(
        (), description="Steps at which the adapter is checkpointed and its held-out KL measured (half-baking = "
                        "early stopping, the paper's operator, not weight interpolation). Each must be < steps.")
    min_merge_kept: float = Field(
        0.5, ge=0.0, le=1.0,
        description="The stored (merged, reloaded) model must keep at least this share of the adapter's KL "
                    "reduction, else the phase fails: a merge into ternary weights can erase the bake (the "
                    "quantisation trap) and that must never pass as success.")
    max_behaviour_inputs: int = Field(
        48, ge=0, le=100_000,
        description="Held-out system-dialogue questions the behaviour is checked on (persona rules, tool-loop answers, "
                    "tool policy: input with the prompts vs the stored model without), when the prompts joined in "
                    "order form a checkable system prompt (forge_models.baking.behaviour). 0: not checked.")
    behaviour_max_new_tokens: int = Field(48, ge=8, le=1024, description="Tokens per generation step of those checks.")
    max_text_loss_rise: float = Field(
        0.20, ge=0.0, le=100.0,
        description="Stated bound on what baking may cost on held-out text (the issue's real-text perplexity goal): "
                    "per text (each held-out-only eval source, and the held-out corpus), the upper end of the paired "
                    "95% interval of stored baked - input loss per window must be <= this many nats/token "
                    "(0.20 = perplexity x1.22). Reported as met / not met, like the KL goal.")
    seed: int | None = Field(None, description="Sampling/initialisation seed (None: the run seed).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")

    @model_validator(mode="after")
    def _check(self) -> "BakingConfig":
        names = [p.name for p in self.prompts]
        if len(set(names)) != len(names):
            raise ValueError(f"baking.prompts: names must be unique, got {names}")
        bad = [s for s in self.half_bake_steps if not 0 < s < self.steps]
        if bad:
            raise ValueError(f"baking.half_bake_steps {bad} must lie in (0, steps={self.steps})")
        if list(self.half_bake_steps) != sorted(set(self.half_bake_steps)):
            raise ValueError("baking.half_bake_steps must be strictly increasing")
        return self
