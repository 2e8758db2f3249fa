"""Phase 7 (experts): SVF expert vectors (Transformer^2) per skill, their library and two-pass dispatch.

    from forge_models.experts import load_experts
    lib = load_experts("forge-store/experts/<key>/experts")
    with lib.apply(model, "arithmetic"):
        ...   # the model computes with the arithmetic expert; the base weights come back bit for bit

    lib = load_experts("<compressed folder>/experts", model=compressed)   # basis-free: re-based on its weights

See docs/phases/experts.md for the method, its deviations from the paper and the measured figures.
"""

from forge_models.experts.dispatch import DISPATCHERS, UNKNOWN, cem, exemplar_dispatch, mix_masks, run_grouped
from forge_models.experts.library import (ExpertLibrary, TargetRebase, check_targets, load_experts, save_expert_vectors,
                                          save_experts)
from forge_models.experts.phase import ExpertsConfig, ExpertsInputs, evaluate_library, run, skill_outcomes
from forge_models.experts.svf import (MaskState, TargetBasis, attached, compose, decompose, find_targets,
                                      init_z, mask_from_z, svf_delta, z_count)
from forge_models.experts.train import SKILLS, Skill, TrainSettings, reference_reply, skill_with, train_expert

__all__ = ["DISPATCHERS", "UNKNOWN", "cem", "exemplar_dispatch", "mix_masks", "run_grouped", "ExpertLibrary",
           "TargetRebase", "check_targets", "load_experts", "save_expert_vectors", "save_experts", "ExpertsConfig",
           "ExpertsInputs", "evaluate_library", "run", "skill_outcomes", "MaskState", "TargetBasis", "attached",
           "compose", "decompose", "find_targets", "init_z", "mask_from_z", "svf_delta", "z_count", "SKILLS", "Skill", "reference_reply", "skill_with",
           "TrainSettings", "train_expert"]
