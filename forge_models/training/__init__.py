"""Phase 5 — the Forge training loop: Grokfast, an edge-of-chaos curriculum, dreams, self-modelling, ten stages.

Library use::

    from forge_models.training import TrainingConfig, TrainingInputs, run, gradfilter_ema
    out = run(TrainingInputs(model, tokenizer, corpus, eval_cfg), TrainingConfig(), ctx)
    out.models["model"]       # the trained LM (the self-model head is not part of it)

    grads = None              # Grokfast alone, in any training loop: between backward() and step()
    grads = gradfilter_ema(model, grads=grads, alpha=0.98, lamb=2.0)
"""

from forge_models.training.config import (
    CHAOS_LIMIT,
    EXIT_CRITERIA,
    CurriculumConfig,
    DreamConfig,
    GrokfastConfig,
    SelfModelConfig,
    StageConfig,
    TrainingConfig,
    default_stages,
)
from forge_models.training.curriculum import BandController, answer_success, difficulty_knobs, generate_tasks
from forge_models.training.dreams import check_dream, sample_continuations
from forge_models.training.grokfast import gradfilter_ema, gradfilter_ma
from forge_models.training.phase import TrainingInputs, run
from forge_models.training.selfmodel import SelfModelHead, self_model_loss

__all__ = [
    "CHAOS_LIMIT",
    "EXIT_CRITERIA",
    "BandController",
    "CurriculumConfig",
    "DreamConfig",
    "GrokfastConfig",
    "SelfModelConfig",
    "SelfModelHead",
    "StageConfig",
    "TrainingConfig",
    "TrainingInputs",
    "answer_success",
    "check_dream",
    "default_stages",
    "difficulty_knobs",
    "generate_tasks",
    "gradfilter_ema",
    "gradfilter_ma",
    "run",
    "sample_continuations",
    "self_model_loss",
]
