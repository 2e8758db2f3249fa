"""The model an agent runs on, as a small protocol: a stub in tests, a real model through :class:`ModelClient`.

    generate(prompts, *, temperature, max_new_tokens, seed, thought_budget, expert, stop) -> [Completion]

returns one :class:`Completion` per prompt: the text plus its token counts, so every agent's cost is
measured, not estimated. ``capabilities()`` says which experts, thought budgets and tools the client can
run; the proposer draws only from those, and the executor refuses any other config before calling it.

A client may also provide ``tool_loop(prompts, *, tools, max_tool_calls, temperature, max_new_tokens, seed,
thought_budget, expert, stop) -> [ToolRun]`` to run a real tool runtime (e.g. ``forge_models.tools``'s
``run_agent``) instead of the executor's built-in loop over ``generate``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence, runtime_checkable

import torch

from forge_models.adas.config import Capabilities
from forge_models.generation import GenerationConfig, generate
from forge_models.runtime import ConfigError, PhaseContext


@dataclass(frozen=True)
class Completion:
    """One model call's continuation and its size in tokens."""

    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ToolRun:
    """One question's tool loop: the final text (everything generated), tool results, calls and tokens."""

    text: str
    tool_results: tuple[str, ...]
    model_calls: int
    prompt_tokens: int
    completion_tokens: int
    tool_calls: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Routing:
    """The first pass of two-pass dispatch for one prompt: the expert chosen (None: base) and what it cost."""

    expert: str | None
    model_calls: int
    prompt_tokens: int


@runtime_checkable
class GenerationClient(Protocol):
    """What an agent needs from a model (see the module docstring)."""

    def capabilities(self) -> Capabilities: ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        temperature: float,
        max_new_tokens: int,
        seed: int,
        thought_budget: int,
        expert: Mapping[str, float] | None,
        stop: Sequence[str],
    ) -> list[Completion]: ...


class ExpertApplier(Protocol):
    """Applies expert weights (a name -> weight mixture) to a model for the duration of a ``with`` block.

    The expert library (forge_models.experts) is opaque here: it must restore the base weights on exit.
    """

    names: tuple[str, ...]

    def applied(self, model: Any, weights: Mapping[str, float]) -> ContextManager[Any]: ...

    # Optional: ``classify(model, tokenizer, prompts, ctx) -> [name or "unknown"]``, the first pass of two-pass
    # dispatch; an applier with it (and ``can_dispatch`` true) lets the client run ``dispatch`` designs.


# (model, tokenizer, prompts, budget, GenerationConfig, ctx, generator) -> Completions with thoughts.
ThoughtGenerator = Callable[[Any, Any, Sequence[str], int, GenerationConfig, PhaseContext, "torch.Generator | None"], list[Completion]]


class ModelClient:
    """A Hugging Face-style causal LM (Cognate, Llama, SmolLM2, ...) behind the client protocol.

    Generation is :func:`forge_models.generation.generate` (the project's one generator: chat template when
    the tokenizer has one, KV cache where the model has one, left-padded batches). Sampling uses an explicit
    ``torch.Generator`` seeded per call. ``experts`` applies expert weights around a call; ``thinker``
    generates with a Quiet-STaR thought budget. Without them, configs that need them are refused by
    :meth:`capabilities` (and so by the executor), never silently run without.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        ctx: PhaseContext,
        *,
        batch_size: int = 16,
        experts: ExpertApplier | None = None,
        thinker: ThoughtGenerator | None = None,
        max_thought_budget: int = 0,
        max_positions: int | None = None,
    ) -> None:
        if thinker is None and max_thought_budget:
            raise ConfigError("max_thought_budget > 0 needs a thinker (a Quiet-STaR generator)")
        self.model, self.tokenizer, self.ctx = model, tokenizer, ctx
        self.batch_size = batch_size
        self.experts, self.thinker = experts, thinker
        self.max_thought_budget = max_thought_budget
        self.max_positions = max_positions

    def check_thought_budget(self, budget: int) -> None:
        """Raise ConfigError unless this client can think ``budget`` tokens (a thinker, within its maximum)."""
        if self.thinker is None or budget > self.max_thought_budget:
            raise ConfigError(f"thought_budget {budget} is beyond this client's {self.max_thought_budget}"
                              + (" (no Quiet-STaR head)" if self.thinker is None else ""))

    def capabilities(self) -> Capabilities:
        return Capabilities(experts=tuple(self.experts.names) if self.experts else (),
                            max_thought_budget=self.max_thought_budget,
                            dispatch=bool(getattr(self.experts, "can_dispatch", False)))

    def dispatch(self, prompts: Sequence[str]) -> list[Routing]:
        """The first pass: per prompt, the expert to answer it with (None: the base weights) and its cost."""
        if not self.capabilities().dispatch:
            raise ConfigError("dispatch asked of a client without an expert library that can classify")
        tokens: list[int] = []
        labels = self.experts.classify(self.model, self.tokenizer, list(prompts), self.ctx, tokens)  # type: ignore[union-attr]
        calls = len(self.experts.names) + 1  # type: ignore[union-attr]  # the prompt alone, then after each exemplar
        return [Routing(lab if lab in self.experts.names else None, calls, n)  # type: ignore[union-attr]
                for lab, n in zip(labels, tokens)]

    def generate(self, prompts, *, temperature, max_new_tokens, seed, thought_budget, expert, stop):
        if not prompts:
            return []
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=tuple(stop),
                               batch_size=self.batch_size)
        gen = torch.Generator(device="cpu").manual_seed(int(seed)) if temperature > 0 else None
        if expert:
            if self.experts is None:
                raise ConfigError(f"expert weights {dict(expert)} asked of a client without an expert library")
            scope = self.experts.applied(self.model, expert)
        else:
            scope = contextlib.nullcontext()
        with scope:
            if thought_budget:
                self.check_thought_budget(thought_budget)
                return self.thinker(self.model, self.tokenizer, prompts, thought_budget, cfg, self.ctx, gen)
            outs = generate(self.model, self.tokenizer, list(prompts), cfg, self.ctx, generator=gen,
                            max_positions=self.max_positions)
        return [Completion(o.text, o.prompt_tokens, len(o.token_ids)) for o in outs]
