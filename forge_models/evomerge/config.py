"""Config of Phase 2 (EvoMerge): frozen, documented, validated before any model is merged.

Defaults are the project design's reference scale (``full``: 50 generations x population 8, GA) with the
published CMA-ES settings where CMA-ES is chosen (sigma0 = 1/6 as in Akiba et al. and mergekit-evolve).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from forge_models.config import Frozen
from forge_models.merge.registry import METHODS

__all__ = ["EvoMergeConfig", "FitnessConfig", "SEARCHABLE_METHODS"]

SEARCHABLE_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "model_stock", "slerp", "dfs",
)
"""Methods the search can use: the parameter-space merges and ``dfs``, data-flow-space layer routing
(Akiba et al. 2024; weights frozen, joint scales W = 1, see forge_models.evomerge.genome). ``passthrough``
(hand-written slices) is available through ``forge merge`` only."""

FITNESS_METRICS = ("arith_em", "tool_correct", "tool_valid", "choice_acc", "persona_acc", "narrative_acc", "loss")


class FitnessConfig(Frozen):
    """What a candidate merge is scored on: answer-checked held-out accuracy first, perplexity second."""

    split: str = Field(
        "validation",
        description="Split the search optimises on: 'validation' or 'train'. The test split is refused: it is "
        "kept for the final, unbiased comparison of the winner against its parents.",
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: {"arith_em": 1.0, "tool_correct": 1.0, "choice_acc": 1.0, "loss": -0.1},
        description="fitness = sum of weight * harness metric. Accuracies in [0, 1] (answer-checked); "
        "'loss' is held-out nats/token, so its weight is negative (perplexity as a weighted second term).",
    )
    max_examples: int | None = Field(
        None, ge=1, le=100_000,
        description="Answer-checked examples per task for fitness (None: eval.max_examples). More examples "
        "give a less noisy fitness at a proportional cost.",
    )

    @field_validator("split")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if v == "test":
            raise ValueError("the search must not optimise on the test split (it is reserved for the final "
                             "comparison); use 'validation'")
        if v not in ("validation", "train"):
            raise ValueError(f"unknown split {v!r}; use 'validation' (or 'train')")
        return v

    @field_validator("weights")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(FITNESS_METRICS))
        if unknown:
            raise ValueError(f"unknown fitness metric(s) {unknown}; choose from {list(FITNESS_METRICS)}")
        if not any(w != 0 for w in v.values()):
            raise ValueError("at least one fitness weight must be non-zero")
        if v.get("loss", 0) > 0:
            raise ValueError("the 'loss' weight must be <= 0 (a lower held-out loss is better)")
        return v


class EvoMergeConfig(Frozen):
    """Phase 2: evolve merge recipes of the previous phase's models; keep the best on held-out fitness."""

    strategy: Literal["ga", "cmaes"] = Field(
        "ga",
        description="'ga': the project's genetic scheme over methods and their hyperparameters (top 2 make 3 "
        "mutants each, the rest make children by crossover, elites kept); 'cmaes': pycma CMA-ES over the "
        "continuous genes of one method (cmaes_method), as in Akiba et al. / mergekit-evolve.",
    )
    generations: int = Field(50, ge=1, le=10_000, description="Maximum generations (the first is the initial population).")
    population: int = Field(8, ge=2, le=1024, description="Candidates per generation.")
    methods: list[str] = Field(
        default_factory=lambda: ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                 "della", "model_stock"],
        description="Methods the GA draws initial recipes from and may mutate into (cycled over the first "
        f"generation). From {list(SEARCHABLE_METHODS)}; slerp only with exactly two parents; dfs (layer "
        "routing, changes depth) is opt-in.",
    )
    cmaes_method: str = Field(
        "dare_ties", description="The method whose genes CMA-ES optimises (Akiba et al.: DARE-TIES)."
    )
    dfs_repeats: int = Field(
        2, ge=1, le=8,
        description="DFS: how often the merged models' layer layout is repeated (Akiba et al.'s r; they used 3). "
        "The indicator has (all merged models' layers) x dfs_repeats genes.",
    )
    layer_groups: int = Field(
        1, ge=1, le=1024,
        description="Genes per model vary over this many groups of layers: each weight/density/t is a list "
        "interpolated over depth (mergekit's gradients); 1 = one value for the whole model.",
    )
    sigma0: float = Field(1 / 6, gt=0, le=1, description="CMA-ES initial step size, in units of each gene's range.")
    mutation_sigma: float = Field(0.1, gt=0, le=1, description="GA: Gaussian mutation, in units of each gene's range.")
    method_mutation_rate: float = Field(0.15, ge=0, le=1, description="GA: chance a mutant switches method.")
    elites: int = Field(2, ge=0, le=64, description="GA: best candidates carried into the next generation unchanged.")
    patience: int = Field(
        5, ge=1, le=10_000,
        description="Stop early when the best fitness has not improved by min_delta for this many generations.",
    )
    min_delta: float = Field(1e-4, ge=0, description="Smallest fitness gain that counts as an improvement.")
    base_model: str | None = Field(
        "trunk",
        description="Model of the input artifact that task vectors are taken against (Cognate's shared trunk). "
        "None: the input's 'base' model if present, else methods that need a base are not used.",
    )
    models: list[str] | None = Field(
        None, description="Models of the input artifact to merge (None: all except the base). At least two."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the merge computes in and writes (mergekit's dtype)."
    )
    fitness: FitnessConfig = Field(default_factory=FitnessConfig, description="How candidates are scored.")
    keep_candidates: bool = Field(
        False, description="Keep every evaluated candidate in the store (default: only the population, the "
        "winner and its lineage; the rest are deleted when they leave the population).",
    )

    @model_validator(mode="after")
    def _check(self) -> "EvoMergeConfig":
        bad = [m for m in self.methods if m not in SEARCHABLE_METHODS]
        if bad:
            raise ValueError(f"methods {bad} cannot be searched; choose from {list(SEARCHABLE_METHODS)}")
        if not self.methods:
            raise ValueError("methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: a method is listed twice")
        if self.cmaes_method not in SEARCHABLE_METHODS or self.cmaes_method == "model_stock":
            raise ValueError(f"cmaes_method {self.cmaes_method!r} has no continuous genes to optimise; "
                             f"choose from {[m for m in SEARCHABLE_METHODS if m != 'model_stock']}")
        for m in (*self.methods, self.cmaes_method):
            assert m in METHODS, m  # the registry and SEARCHABLE_METHODS stay in step (unit-tested)
        if self.strategy == "ga" and self.elites >= self.population:
            raise ValueError(f"elites ({self.elites}) must be smaller than population ({self.population})")
        if self.models is not None and len(self.models) < 2:
            raise ValueError("models: merging needs at least two models")
        return self
