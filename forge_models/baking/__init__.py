"""Phase 6 — prompt baking (Bhargava et al. 2024, arXiv 2409.13697): system prompts distilled into the weights by
forward KL from the prompted model, through a peft LoRA adapter that is merged. See docs/phases/baking.md."""

from forge_models.baking.config import DEFAULT_TARGETS, BakePrompt, BakingConfig, LoraSettings, resolve_targets
from forge_models.baking.kl import (
    Contexts,
    context_ids,
    eos_mask,
    generated_logits,
    ModelLogits,
    kl_from_probs,
    model_logits,
    sample_trajectories,
    teacher_logits,
    token_kl,
    trajectory_kl,
    trajectory_logprob,
)
from forge_models.baking.phase import (
    GOAL_RATIO,
    BakingInputs,
    bake_prompt,
    is_bitnet,
    load_baked,
    measure,
    merge_adapter,
    run,
    save_baked,
    text_retention,
)

__all__ = ["DEFAULT_TARGETS", "BakePrompt", "BakingConfig", "LoraSettings", "resolve_targets", "Contexts", "context_ids",
           "eos_mask", "generated_logits", "kl_from_probs", "ModelLogits", "model_logits", "sample_trajectories", "teacher_logits",
           "token_kl", "trajectory_kl", "trajectory_logprob", "GOAL_RATIO", "BakingInputs", "bake_prompt", "is_bitnet",
           "load_baked", "measure", "merge_adapter", "run", "save_baked", "text_retention"]
