"""Exit criteria of the Forge loop's stages, by name: each says whether its stage may end at this check, and why.

A criterion is a plain function ``(state, stage, cfg, has_head) -> (met, reason)``; :data:`EXIT_CRITERIA`
maps the names a stage config may use (``StageConfig.exit``) to them. Adding one is a function with
``@criterion("name")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from forge_models.training.state import LoopState

if TYPE_CHECKING:
    from forge_models.training.config import StageConfig, TrainingConfig

Criterion = Callable[[LoopState, "StageConfig", "TrainingConfig", bool], tuple[bool, str]]

EXIT_CRITERIA: dict[str, Criterion] = {}
"""Exit criteria by name, in the order they are defined."""

__all__ = ["Criterion", "EXIT_CRITERIA", "criterion", "exit_criterion"]


def criterion(name: str) -> Callable[[Criterion], Criterion]:
    def register(fn: Criterion) -> Criterion:
        EXIT_CRITERIA[name] = fn
        return fn

    return register


def exit_criterion(name: str) -> Criterion:
    try:
        return EXIT_CRITERIA[name]
    except KeyError:
        from forge_models.runtime import ConfigError

        raise ConfigError(f"unknown exit criterion {name!r}") from None


def _entry_loss(s: LoopState) -> float:
    return s.records[-1]["entry"]["val_loss"]


@criterion("warmed_up")
def warmed_up(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """Warm-up over and check loss <= the stage's entry loss."""
    val, entry = s.last["val_loss"], _entry_loss(s)
    ok = s.step >= cfg.warmup_steps and val <= entry
    return ok, f"step {s.step} vs warm-up {cfg.warmup_steps}, loss {val:.4f} vs entry {entry:.4f}"


@criterion("val_improved")
def val_improved(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """Check loss <= entry loss - min_improvement."""
    val, entry = s.last["val_loss"], _entry_loss(s)
    ok = val <= entry - cfg.min_improvement
    return ok, f"loss {val:.4f} vs entry {entry:.4f} - {cfg.min_improvement}"


@criterion("val_plateau")
def val_plateau(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """Relative change between the stage's last two checks <= plateau_tol."""
    vals = s.stage_vals
    if len(vals) < 2:
        return False, "needs two checks in the stage"
    change = abs(vals[-1] - vals[-2]) / max(vals[-2], 1e-8)
    return change <= cfg.plateau_tol, f"relative change {change:.4f} vs {cfg.plateau_tol}"


@criterion("in_band")
def in_band(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """band_checks consecutive in-band curriculum measurements in the stage."""
    if not (stage.curriculum and cfg.curriculum.enabled):
        return False, "curriculum off in this stage: criterion cannot be met"
    return s.stage_band >= cfg.band_checks, f"{s.stage_band} consecutive in-band checks of {cfg.band_checks}"


@criterion("dreams_kept")
def dreams_kept(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """>= min_cycles dream cycles and >= 1 kept dream in the stage, check loss <= entry + stable_tol."""
    if not (stage.dreams and cfg.dreams.enabled):
        return False, "dreams off in this stage: criterion cannot be met"
    val, entry = s.last["val_loss"], _entry_loss(s)
    ok = (s.stage_dream_cycles >= cfg.dreams.min_cycles and s.stage_dream_kept >= 1
          and val <= entry + cfg.stable_tol)
    return ok, (f"{s.stage_dream_cycles} cycles (need {cfg.dreams.min_cycles}), {s.stage_dream_kept} kept, "
                f"loss {val:.4f} vs entry {entry:.4f} + {cfg.stable_tol}")


@criterion("self_model_fit")
def self_model_fit(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """Self-model head loss <= fit_ratio x the copy baseline's (logit lens)."""
    if not has_head:
        return False, "self-model disabled: criterion cannot be met"
    ratio = s.last["self_model_loss"] / max(s.last["self_model_copy_loss"], 1e-8)
    return ratio <= cfg.self_model.fit_ratio, f"head/copy loss ratio {ratio:.3f} vs {cfg.self_model.fit_ratio}"


@criterion("stable")
def stable(s: LoopState, stage, cfg, has_head: bool) -> tuple[bool, str]:
    """stable_checks consecutive checks within stable_tol of the best."""
    return s.stage_stable >= cfg.stable_checks, (
        f"{s.stage_stable} consecutive checks within {cfg.stable_tol} of the best {s.best_val:.4f}")
