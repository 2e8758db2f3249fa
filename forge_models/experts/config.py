"""The experts phase's config, apart from the code that runs it.

Kept free of the harness and training imports on purpose: the phase table (``tasks/phases.py``) imports every
phase's config, and phase code versions follow imports, so an edit of the training code must not change the
data step's cache key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from forge_models.config import Frozen

__all__ = ["AgentSearchConfig", "ExpertsConfig", "GENERATION_SKILLS", "SKILL_NAMES", "TrainSettings"]

SKILL_NAMES = ("arithmetic", "tool", "persona", "narrative")
"""The skills :data:`forge_models.experts.train.SKILLS` defines (a test keeps the two equal)."""

GENERATION_SKILLS = ("arithmetic", "tool")
"""The skills whose replies are generated and answer-checked (REINFORCE by default; ``experts.objectives`` may
switch them to the differentiable ``answer`` objective)."""


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one expert's training (the phase config fills them)."""

    steps: int
    batch_size: int
    samples: int
    temperature: float
    max_new_tokens: int
    lr: float
    kl_coeff: float
    max_grad_norm: float
    init_value: float
    init_std: float
    max_mult: float


class AgentSearchConfig(Frozen):
    """The ADAS agent-configuration search run at the end of the experts phase (forge_models/adas).

    On by default with a small budget: 4 seeds + 2 x 3 designs on 40 validation questions, then the final
    comparison on 80 test questions, took 21 s on the tiny preset's Cognate trunk (533k parameters, one thread
    of the shared 2-core CPU; docs/adas.md). Larger models or budgets cost proportionally more; set
    ``enabled=false`` to skip it. Thought budgets are searched only when the input model carries Quiet-STaR's files
    (``quietstar.json`` + head); without them the budget is 0.
    """

    enabled: bool = Field(True, description="Run the agent search and store the chosen configuration as agent.json.")
    generations: int = Field(2, ge=0, le=100, description="Search generations after the hand-designed seed agents.")
    population: int = Field(3, ge=1, le=64, description="Designs proposed per generation.")
    validation_questions: int = Field(
        40, ge=4, le=100_000, description="Validation questions each design is scored on (the first N, same for all)."
    )
    test_questions: int = Field(
        80, ge=4, le=100_000, description="Test questions of the final comparison (read once, after the search)."
    )
    bootstrap_samples: int = Field(2000, ge=100, le=1_000_000, description="Bootstrap resamples of each interval.")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Tokens per model call of every design.")
    max_thought_budget: int = Field(
        8, ge=0, le=64, description="Largest Quiet-STaR thought budget searched (budgets 0, 2, 4, 8 up to this) when "
                                    "the input model carries Quiet-STaR's files; ignored without them.")
    seed: int = Field(0, description="Seeds the proposer, every design's decoding and the bootstrap.")


class ExpertsConfig(Frozen):
    """SVF experts: which matrices, which skills, how each expert trains, how prompts are dispatched."""

    input_model: str | None = Field(
        None, description="Which model of a multi-model input to specialise (None: the only one)."
    )
    skills: list[str] = Field(
        default_factory=lambda: ["arithmetic", "tool", "persona", "narrative"],
        description="Skills to train an expert for (arithmetic, tool, persona, narrative).",
    )
    objectives: dict[str, Literal["reinforce", "answer"]] = Field(
        default_factory=dict,
        description="Per generation skill (arithmetic, tool), its objective: 'reinforce' (default; the paper's, "
                    "+-1 answer-checked rewards of sampled replies) or 'answer' (cross-entropy of the corpus's "
                    "reference reply, teacher-forced, plus the KL penalty). REINFORCE learns nothing where the base "
                    "never answers right (every reward -1, every advantage 0), e.g. SmolLM2 on the corpus's "
                    "arithmetic format; 'answer' is the differentiable objective the issue allows there.")
    targets: list[str] = Field(
        default_factory=lambda: ["mlp"],
        description="Linear layers adapted: those whose name contains one of these (released code: 'mlp').",
    )
    ternary_rank: int = Field(
        16, ge=1, le=4096,
        description="For BitLinear targets: top singular directions of the ternary weight that z scales "
                    "(applied as a high-precision low-rank side term; dense targets use all min(m, n)).",
    )
    steps: int = Field(40, ge=1, le=100_000, description="Optimizer steps per expert.")
    batch_size: int = Field(8, ge=1, le=1024, description="Training prompts per step.")
    samples: int = Field(4, ge=1, le=64, description="REINFORCE: sampled replies per prompt.")
    temperature: float = Field(1.0, gt=0, le=5.0, description="REINFORCE: sampling temperature of the rollouts.")
    max_new_tokens: int = Field(24, ge=1, le=1024, description="REINFORCE: tokens per sampled reply.")
    lr: float = Field(
        0.05, gt=0, le=10.0,
        description="Adam learning rate on z (released 2e-3 at 8B scale; toy scale needs ~0.05-0.1, see docs).",
    )
    kl_coeff: float = Field(0.05, ge=0, le=100.0, description="Weight of KL(pi_expert || pi_base) in the loss.")
    max_grad_norm: float = Field(
        1.0, gt=0, description="Clip of the z gradient norm (released 1e-3 at 8B scale does not transfer)."
    )
    init_value: float = Field(0.1, description="Mean of the initial z (released init: 0.1, mask ~0.525).")
    init_std: float = Field(0.01, ge=0, description="Std of the initial z (released: 0.01).")
    max_mult: float = Field(1.0, gt=0, le=10.0, description="mask = sigmoid(z) * max_mult (released: 1).")
    dispatch: Literal["exemplar", "oracle"] = Field(
        "exemplar",
        description="First pass: 'exemplar' (the model itself, by likelihood of the prompt after each skill's "
                    "exemplars; unknown -> base) or 'oracle' (the example's own kind; benchmarks only).",
    )
    n_exemplars: int = Field(2, ge=1, le=16, description="Train examples per skill shown to the dispatcher.")
    dispatch_margin: float = Field(
        0.0, description="Nats/token an exemplar must make the prompt likelier by; below it -> unknown -> base."
    )
    eval_examples: int = Field(
        64, ge=4, le=100_000, description="Held-out examples per skill scored for each comparison."
    )
    fewshot_shots: int = Field(
        0, ge=0, le=1024,
        description="Few-shot mixing (Transformer^2's third strategy): per skill, alpha over the experts by CEM on this "
                    "many train-split examples of it, then the mixture measured on the held-out ones and offered to "
                    "the agent search as a seed ('cem-<skill>'). 0: off (CPU: ~5-7 min per skill on the tiny "
                    "trunk at the defaults below).")
    cem_population: int = Field(32, ge=2, le=1024, description="CEM candidates per iteration (released: 32).")
    cem_elite: float = Field(0.2, gt=0, le=1.0, description="CEM elite share refit each iteration (released: 0.2).")
    cem_iterations: int = Field(50, ge=1, le=10_000, description="CEM iterations (released: 50).")

    adas: AgentSearchConfig = Field(
        default_factory=AgentSearchConfig,
        description="Agent-configuration search (ADAS) over the stored library and the tool runtime (on, small budget).",
    )

    @model_validator(mode="after")
    def _known(self) -> "ExpertsConfig":
        unknown = sorted(set(self.skills) - set(SKILL_NAMES))
        if unknown or not self.skills:
            raise ValueError(f"experts.skills: unknown {unknown}; choose from {sorted(SKILL_NAMES)}")
        if len(set(self.skills)) != len(self.skills):
            raise ValueError("experts.skills lists a skill twice")
        if not self.targets:
            raise ValueError("experts.targets must name at least one pattern")
        bad = sorted(set(self.objectives) - (set(self.skills) & set(GENERATION_SKILLS)))
        if bad:
            raise ValueError(f"experts.objectives: {bad} are not generation skills of experts.skills "
                             f"{self.skills}; only {list(GENERATION_SKILLS)} choose an objective (persona and "
                             "narrative are trained by choice cross-entropy)")
        return self

    def settings(self) -> "TrainSettings":
        """The training hyper-parameters of one expert."""
        return TrainSettings(steps=self.steps, batch_size=self.batch_size, samples=self.samples,
                             temperature=self.temperature, max_new_tokens=self.max_new_tokens, lr=self.lr,
                             kl_coeff=self.kl_coeff, max_grad_norm=self.max_grad_norm, init_value=self.init_value,
                             init_std=self.init_std, max_mult=self.max_mult)
