"""Fitness of a candidate merge: the shared harness on a held-out split, combined by configured weights.

fitness = sum_k weight_k * metric_k over the harness metrics (answer-checked accuracies in [0, 1], and the
held-out loss in nats/token with a negative weight). A weighted metric the split cannot measure (for
example ``arith_em`` when the split holds no arithmetic example) is an error, not a zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from forge_models.config import EvalConfig
from forge_models.data import Example
from forge_models.eval import evaluate
from forge_models.evomerge.config import FitnessConfig
from forge_models.evomerge.genome import Genome, MergeSpace
from forge_models.merge import MergeRecipe, MergeResult, merge_models
from forge_models.runtime import ConfigError, PhaseContext

__all__ = ["fitness_of", "score", "merge_candidate", "tasks_for"]


def fitness_of(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted sum (see module docstring); raises ConfigError naming a weighted metric that is missing."""
    missing = [k for k, w in weights.items() if w != 0 and k not in metrics]
    if missing:
        raise ConfigError(
            f"fitness metric(s) {missing} were not measured on this split (the harness reported "
            f"{sorted(metrics)}); drop them from evomerge.fitness.weights or add that kind of data"
        )
    return float(sum(w * float(metrics[k]) for k, w in weights.items() if w != 0))


# Which harness task family measures a metric (by name prefix); a metric not listed keeps every family.
_FAMILY = (
    (("loss", "ppl"), ("perplexity",)),
    (("arith_",), ("arithmetic",)),
    (("tool_valid", "tool_correct"), ("tool",)),
    (("tool_call_valid", "tool_success", "tool_answer_correct"), ("tool_loop",)),
    (("persona_rule", "system_"), ("system",)),
    (("choice_", "persona_acc", "narrative_acc"), ("choice",)),
)


def tasks_for(weights: Mapping[str, float], available: Sequence[str]) -> tuple[str, ...]:
    """The harness task families the weighted metrics need (each candidate is scored thousands of times, so
    the families no weight reads, e.g. the tool loop's second generation, are not run); all of
    ``available`` when a weighted metric's family is unknown."""
    needed: set[str] = set()
    for name, w in weights.items():
        if w == 0:
            continue
        family = next((f for prefixes, f in _FAMILY if name.startswith(prefixes)), None)
        if family is None:
            return tuple(available)
        needed.update(family)
    return tuple(t for t in available if t in needed) or tuple(available)


def score(model: Any, tokenizer: Any, examples: Sequence[Example], eval_cfg: EvalConfig, fitness: FitnessConfig,
          ctx: PhaseContext) -> tuple[float, dict[str, float]]:
    """Run the harness on ``examples`` and return (fitness, metrics)."""
    if fitness.max_examples is not None:
        eval_cfg = eval_cfg.model_copy(update={"max_examples": fitness.max_examples})
    eval_cfg = eval_cfg.model_copy(update={"tasks": tasks_for(fitness.weights, eval_cfg.tasks)})
    metrics = evaluate(model, tokenizer, examples, eval_cfg, ctx)
    return fitness_of(metrics, fitness.weights), metrics


def merge_candidate(genome: Genome, space: MergeSpace, folders: Mapping[str, Path], out_dir: Path, *,
                    dtype: str = "float32", seed: int = 0) -> MergeResult:
    """Write the candidate's merge of ``folders`` (model name -> local folder) to ``out_dir``."""
    recipe = MergeRecipe.model_validate(genome.recipe(space, {k: str(v) for k, v in folders.items()}, dtype))
    return merge_models(recipe, out_dir, seed=seed, overwrite=True)
