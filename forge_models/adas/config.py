"""Typed, frozen configurations of the ADAS search: the agent space, the search, the sandbox, the meta-agent.

An :class:`AgentConfig` is one real agent design around the final model: which expert weights it runs
with, whether it thinks (Quiet-STaR thought budget), whether it runs a tool loop and with which tools, how
it decodes (greedy, temperature, self-consistency by majority vote), how the answer is extracted and how the
prompt is phrased. It is JSON-serialisable (``to_json`` / ``from_json``): that JSON is what the artifact
stores and what the served agent runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

from pydantic import Field, field_validator, model_validator

from forge_models.adas.rules import EXTRACTORS, TOOLS
from forge_models.config import Frozen
from forge_models.runtime import ArtifactIntegrityError, ConfigError

PROMPT_STYLES = ("plain", "cot")
"""``plain``: the question's prompt as is. ``cot``: zero-shot chain of thought (Kojima et al. 2022): the
instruction "Let's think step by step." after the prompt, so the model's answer starts with reasoning."""

COT_INSTRUCTION = " Let's think step by step."

MAX_VOTES = 16
MAX_THOUGHT_BUDGET = 64


class AgentConfig(Frozen):
    """One agent design: what runs around the model for each question."""

    name: str = Field("agent", min_length=1, max_length=80, description="Label in reports (not part of the design's identity).")
    experts: dict[str, float] = Field(
        default_factory=dict,
        description="Expert vectors and their mixture weights in [0, 1] (names from the expert library). Empty: the "
        "base weights; one name with weight 1: that expert; several: a mixture the expert library composes.",
    )
    dispatch: bool = Field(
        False,
        description="Two-pass dispatch (Transformer^2): the model first classifies each question with the expert "
        "library's stored exemplars, then answers it with that skill's expert (unknown: the base weights). "
        "Excludes fixed ``experts``.",
    )
    thought_budget: int = Field(0, ge=0, le=MAX_THOUGHT_BUDGET, description="Quiet-STaR thought tokens per generated token; 0 = no thinking.")
    tools: tuple[str, ...] = Field((), description="Tools of the tool loop (names in adas.rules.TOOLS); empty = no tool loop.")
    max_tool_calls: int = Field(2, ge=1, le=8, description="Most tool calls per question in the tool loop.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy decoding; above 0 = sampling at this temperature.")
    votes: int = Field(
        1, ge=1, le=MAX_VOTES,
        description="Self-consistency (Wang et al. 2023): sample this many answers and return the majority of the "
        "extracted ones (ties: the earliest to reach the count). 1 = one call. Above 1 needs temperature > 0.",
    )
    extraction: str = Field("auto", description="Answer-extraction rule (a name in adas.rules.EXTRACTORS).")
    prompt_style: Literal["plain", "cot"] = Field("plain", description="'plain' or 'cot' (zero-shot chain-of-thought instruction).")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Most tokens per model call.")

    @field_validator("experts")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not name:
                raise ValueError("expert names must be non-empty")
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"expert weight {name}={w} must be in [0, 1]")
        if v and sum(v.values()) <= 0:
            raise ValueError("a mixture needs at least one positive weight (use {} for the base weights)")
        return dict(sorted(v.items()))

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(TOOLS))
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {sorted(TOOLS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"tools listed twice: {list(v)}")
        return tuple(sorted(v))

    @field_validator("extraction")
    @classmethod
    def _extraction(cls, v: str) -> str:
        if v not in EXTRACTORS:
            raise ValueError(f"unknown extraction rule {v!r}; known: {sorted(EXTRACTORS)}")
        return v

    @model_validator(mode="after")
    def _decoding(self) -> "AgentConfig":
        if self.dispatch and self.experts:
            raise ValueError(f"dispatch chooses the expert per question; fixed experts {self.experts} contradict it")
        if self.votes > 1 and self.temperature == 0.0:
            raise ValueError(
                f"self-consistency with {self.votes} votes needs temperature > 0 (greedy decoding would return "
                f"the same answer {self.votes} times)"
            )
        return self

    def key(self) -> str:
        """The design's identity: its JSON without the name and without fields that cannot change what it
        does (``max_tool_calls`` without tools), so the search never spends an evaluation on a behavioural
        duplicate. Two names for one design are one design."""
        exclude = {"name"} | (set() if self.tools else {"max_tool_calls"})
        return json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AgentConfig":
        try:
            return cls.model_validate_json(text)
        except ValueError as exc:
            raise ConfigError(f"not a valid agent configuration: {exc}") from exc

    @classmethod
    def from_artifact(cls, path: Path, skills: Iterable[str]) -> "AgentConfig":
        """The ``agent.json`` stored in an artifact, checked against the expert ``skills`` stored beside it:
        ArtifactIntegrityError naming the file when it does not parse or names an expert the library lacks."""
        try:
            cfg = cls.from_json(Path(path).read_text())
        except ConfigError as exc:
            raise ArtifactIntegrityError(f"{path}: {exc}") from None
        missing = sorted(set(cfg.experts) - set(skills))
        if missing:
            raise ArtifactIntegrityError(f"{path}: names experts {missing} that the artifact's experts/ library lacks")
        if cfg.dispatch and not list(skills):
            raise ArtifactIntegrityError(f"{path}: asks for dispatch but the artifact has no experts/ library")
        return cfg

    def calls_per_question(self) -> int:
        """Model calls of one question without tools (with tools: up to votes * (max_tool_calls + 1))."""
        return self.votes


class Capabilities(Frozen):
    """What a client can run: the search space is cut to it, and a config outside it is refused before compute."""

    experts: tuple[str, ...] = Field((), description="Expert names the client can apply (empty: base weights only).")
    max_thought_budget: int = Field(0, ge=0, le=MAX_THOUGHT_BUDGET, description="Largest thought budget it supports (0: no Quiet-STaR head).")
    tools: tuple[str, ...] = Field(tuple(sorted(TOOLS)), description="Tools its tool loop can run.")
    dispatch: bool = Field(False, description="Whether it can classify questions for two-pass dispatch.")

    def check(self, cfg: AgentConfig) -> None:
        """Raise ConfigError naming what ``cfg`` needs that this client lacks."""
        problems = []
        if cfg.dispatch and not self.dispatch:
            problems.append("dispatch (client has no expert library with exemplars)")
        missing = sorted(set(cfg.experts) - set(self.experts))
        if missing:
            problems.append(f"experts {missing} (client has {list(self.experts)})")
        if cfg.thought_budget > self.max_thought_budget:
            problems.append(f"thought_budget {cfg.thought_budget} (client supports up to {self.max_thought_budget})")
        missing_tools = sorted(set(cfg.tools) - set(self.tools))
        if missing_tools:
            problems.append(f"tools {missing_tools} (client has {list(self.tools)})")
        if problems:
            raise ConfigError(f"agent {cfg.name!r} needs what the client cannot run: " + "; ".join(problems))


class SearchSpace(Frozen):
    """The values the proposer may draw for each field (every one also valid for AgentConfig)."""

    temperatures: tuple[float, ...] = Field((0.0, 0.3, 0.7, 1.0), description="Temperatures to draw from (0 = greedy).")
    votes: tuple[int, ...] = Field((1, 3, 5, 7), description="Vote counts for self-consistency (used only with temperature > 0).")
    thought_budgets: tuple[int, ...] = Field((0, 2, 4, 8), description="Thought budgets (cut to the client's maximum).")
    extractions: tuple[str, ...] = Field(tuple(EXTRACTORS), description="Extraction rules to draw from.")
    prompt_styles: tuple[str, ...] = Field(PROMPT_STYLES, description="Prompt styles to draw from.")
    max_tool_calls: tuple[int, ...] = Field((1, 2, 3), description="Tool-call limits to draw from.")
    mixture_weights: tuple[float, ...] = Field((0.25, 0.5, 0.75, 1.0), description="Weights an expert may get in a mixture.")
    max_new_tokens: tuple[int, ...] = Field((32,), description="Token limits to draw from.")

    @model_validator(mode="after")
    def _valid(self) -> "SearchSpace":
        for name in ("temperatures", "votes", "thought_budgets", "extractions", "prompt_styles", "max_tool_calls",
                     "mixture_weights", "max_new_tokens"):
            if not getattr(self, name):
                raise ValueError(f"search space field {name} is empty")
        if any(not 0 <= t <= 2 for t in self.temperatures):
            raise ValueError("temperatures must be in [0, 2]")
        if any(not 1 <= v <= MAX_VOTES for v in self.votes):
            raise ValueError(f"votes must be in [1, {MAX_VOTES}]")
        if any(not 0 <= b <= MAX_THOUGHT_BUDGET for b in self.thought_budgets):
            raise ValueError(f"thought budgets must be in [0, {MAX_THOUGHT_BUDGET}]")
        unknown = sorted(set(self.extractions) - set(EXTRACTORS)) + sorted(set(self.prompt_styles) - set(PROMPT_STYLES))
        if unknown:
            raise ValueError(f"unknown extraction rules / prompt styles {unknown}")
        if any(not 0 < w <= 1 for w in self.mixture_weights):
            raise ValueError("mixture weights must be in (0, 1]")
        return self


class SandboxConfig(Frozen):
    """Limits of the subprocess a generated agent's code runs in (see forge_models.adas.sandbox)."""

    wall_seconds: float = Field(
        30.0, gt=0, le=3600,
        description="Wall-clock budget of the agent's own code over all questions of one evaluation; time spent "
        "serving its model calls in the parent is not counted. Past it the process group is killed.",
    )
    cpu_seconds: int = Field(60, ge=1, le=7200, description="RLIMIT_CPU of the child (a backstop to the wall clock).")
    memory_mb: int = Field(512, ge=64, le=65536, description="RLIMIT_AS of the child (address space, MiB).")
    max_llm_calls_per_question: int = Field(16, ge=1, le=256, description="Model calls one question may make; more is an error.")
    max_new_tokens: int = Field(64, ge=1, le=1024, description="Most tokens one model call of the code may ask for.")


class MetaAgentConfig(Frozen):
    """The optional LLM meta-agent (Meta Agent Search). Without ``url`` nothing of it runs."""

    url: str | None = Field(None, description="Base URL of an OpenAI-compatible API (…/v1); None = no meta-agent.")
    model: str = Field("gpt-4o-2024-05-13", description="Model name sent to the endpoint (the paper's default meta-agent).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (read at call time; may be unset for local servers).")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature of the meta-agent.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="HTTP timeout per request.")
    max_debug_rounds: int = Field(3, ge=0, le=10, description="Times a failing agent is sent back to the meta-agent to fix (ADAS debug_max = 3) before it is skipped.")


class SearchConfig(Frozen):
    """The search: seeds, then ``generations`` x ``population`` proposed designs, scored on the validation split."""

    generations: int = Field(4, ge=0, le=1000, description="Search generations after the seed agents.")
    population: int = Field(4, ge=1, le=256, description="Designs proposed per generation.")
    proposer: Literal["evolution"] = Field("evolution", description="Proposal rule (a name in adas.search.PROPOSERS).")
    tournament: int = Field(3, ge=1, le=64, description="Tournament size for picking a parent (by bootstrap median).")
    crossover_rate: float = Field(0.3, ge=0, le=1, description="Chance a child is the per-field crossover of two parents (then mutated once).")
    mutations: int = Field(2, ge=1, le=8, description="Most fields one mutation changes (uniform 1..mutations).")
    max_questions: int | None = Field(None, ge=1, description="Validation questions used for fitness (None: all); the first N, the same for every design.")
    bootstrap_samples: int = Field(10_000, ge=100, le=1_000_000, description="Bootstrap resamples of each fitness interval (ADAS used 100,000).")
    seed: int = Field(0, description="Seeds the proposer's RNG, the decoding of every evaluation and the bootstrap.")
    space: SearchSpace = Field(default_factory=SearchSpace, description="Values the proposer draws from.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Limits for generated agent code.")
    meta_agent: MetaAgentConfig = Field(default_factory=MetaAgentConfig, description="Optional LLM meta-agent (off without a URL).")
