"""The experts phase's agent search (ADAS, phase 7b): real adapters from the expert library and the tool runtime
to the ADAS client protocols, and the search itself on the corpus' held-out splits.

    outcome = search_agent(model, tokenizer, library, corpus, cfg.adas, ctx)
    outcome.chosen.to_json()        # what the phase stores as agent.json and the served agent runs

- :class:`LibraryApplier` is the ADAS ``ExpertApplier``: ``{name: 1.0}`` applies that expert, several names a
  mixture (masks mixed as the released code does, ``ExpertLibrary.apply(alpha=...)``); the base weights come
  back bit for bit when the block ends (the library's guarantee).
- :class:`ExpertsClient` is ``adas.ModelClient`` plus ``tool_loop`` over :func:`forge_models.tools.run_agent_batch`
  (the same runtime the served agent uses), with the expert applied around the whole loop.
- Fitness uses the **validation** split only; the test split goes through :class:`HeldOutSplits`, read once
  by :func:`final_comparison` after the search.
- :class:`QuietStarThinker`: when the model carries Quiet-STaR's files, configs with a thought budget run
  (plain generation and the tool loop alike); without them the space holds budget 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Sequence

import torch

from forge_models.adas.client import Completion
from forge_models.adas import (
    AgentConfig, HeldOutSplits, ModelClient, Question, SearchConfig, SearchResult, ToolRun, final_comparison,
    questions_from_examples, search, seed_agents,
)
from forge_models.data.synthetic import Corpus
from forge_models.experts.config import AgentSearchConfig
from forge_models.experts.library import ExpertLibrary
from forge_models.generation import GenerationConfig
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tools import default_registry, run_agent_batch

__all__ = ["AgentSearchOutcome", "ExpertsClient", "LibraryApplier", "QuietStarThinker", "balanced_questions",
           "search_agent"]

KINDS = ("arithmetic", "tool", "persona", "narrative")


class LibraryApplier:
    """The expert library as ADAS' ``ExpertApplier`` (module docstring)."""

    def __init__(self, library: ExpertLibrary) -> None:
        self.library = library
        self.names = tuple(library.skills)
        self.can_dispatch = library.can_dispatch

    def classify(self, model: Any, tokenizer: Any, prompts: Sequence[str], ctx: Any,
                 tokens: list[int] | None = None) -> list[str]:
        return self.library.classify(model, tokenizer, prompts, ctx, tokens)

    def applied(self, model: Any, weights: Mapping[str, float]) -> ContextManager[Any]:
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ConfigError(f"experts {unknown} are not in the library ({list(self.names)})")
        if len(weights) == 1 and next(iter(weights.values())) == 1.0:
            return self.library.apply(model, next(iter(weights)))
        return self.library.apply(model, alpha=dict(weights))


class QuietStarThinker:
    """ADAS' ``ThoughtGenerator`` over a Quiet-STaR model: each generated token is predicted after a thought of
    the config's budget (:func:`forge_models.quietstar.generation.thought_generate`)."""

    def __init__(self, qs: Any) -> None:
        self.qs = qs

    def generate_fn(self, budget: int):
        from forge_models.quietstar.generation import thought_generate

        return thought_generate(self.qs, budget)

    def __call__(self, model, tokenizer, prompts, budget, cfg, ctx, gen) -> list[Completion]:
        outs = self.generate_fn(budget)(model, tokenizer, list(prompts), cfg, ctx, generator=gen)
        return [Completion(o.text, o.prompt_tokens, len(o.token_ids)) for o in outs]


class ExpertsClient(ModelClient):
    """``ModelClient`` whose tool loop is the project's tool runtime (``forge_models.tools``), with the thought
    budget when the client has a :class:`QuietStarThinker`."""

    def tool_loop(self, prompts, *, tools, max_tool_calls, temperature, max_new_tokens, seed, thought_budget, expert,
                  stop) -> list[ToolRun]:
        generate_fn = None
        if thought_budget:
            self.check_thought_budget(thought_budget)
            if not isinstance(self.thinker, QuietStarThinker):
                raise ConfigError("a thought budget in the tool loop needs a QuietStarThinker")
            generate_fn = self.thinker.generate_fn(thought_budget)
        registry = default_registry().subset(tools)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=tuple(stop),
                               batch_size=self.batch_size)
        if expert:
            if self.experts is None:
                raise ConfigError(f"expert weights {dict(expert)} asked of a client without an expert library")
            scope = self.experts.applied(self.model, expert)
        else:
            scope = contextlib.nullcontext()
        with scope:
            turns = run_agent_batch(self.model, self.tokenizer, list(prompts), registry=registry, gen=gen,
                                    max_tool_calls=max_tool_calls, seed=int(seed), ctx=self.ctx,
                                    max_positions=self.max_positions, generate_fn=generate_fn)
        runs = []
        for p, t in zip(prompts, turns):
            # The extraction rules read what followed the prompt (model text and the runtime's tool lines).
            text = t.text[len(p):] if t.text.startswith(p) else "".join(t.steps)
            results = tuple(c.result for c in t.tool_calls if c.ok)
            runs.append(ToolRun(text, results, len(t.steps), t.prompt_tokens, t.completion_tokens,
                                tool_calls=len(t.tool_calls)))
        return runs


def balanced_questions(split: str, questions: Sequence[Question], limit: int) -> list[Question]:
    """The first ``limit`` questions taken round-robin over the kinds (so a small budget covers every kind),
    re-indexed 0..n-1 for :class:`HeldOutSplits`."""
    by_kind: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_kind[q.kind].append(q)
    picked: list[Question] = []
    queues = [list(v) for _, v in sorted(by_kind.items())]
    while len(picked) < limit and any(queues):
        for qs in queues:
            if qs and len(picked) < limit:
                picked.append(qs.pop(0))
    return [dataclasses.replace(q, index=i, uid=f"{split}/{i}") for i, q in enumerate(picked)]


@dataclass
class AgentSearchOutcome:
    """What the search produced: the chosen config, the archive, the test comparison and the split guard."""

    chosen: AgentConfig
    result: SearchResult
    comparison: list[dict]
    splits: HeldOutSplits
    validation: list[Question]
    test: list[Question]
    dropped_overlap: int
    search_s: float
    final_s: float
    touched_by_search: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # split -> indices read

    def metrics(self) -> dict[str, float]:
        m = {"adas/archive_size": float(len(self.result.archive)), "adas/rejected": float(len(self.result.rejected)),
             "adas/validation_n": float(len(self.validation)), "adas/test_n": float(len(self.test)),
             "adas/search_s": self.search_s, "adas/final_s": self.final_s,
             "adas/winner/validation_median": self.result.winner.fitness.median}
        for row in self.comparison:
            p = f"adas/test/{row['name']}"
            m.update({f"{p}/accuracy": row["test_accuracy"], f"{p}/accuracy_lo": row["test_low"],
                      f"{p}/accuracy_hi": row["test_high"], f"{p}/winner_minus": row["winner_minus_this"],
                      f"{p}/winner_minus_lo": row["diff_low"], f"{p}/winner_minus_hi": row["diff_high"],
                      f"{p}/calls_per_query": row["calls_per_query"],
                      f"{p}/tokens_per_query": row["prompt_tokens_per_query"] + row["completion_tokens_per_query"],
                      f"{p}/seconds_per_query": row["seconds_per_query"]})
        return m


def search_agent(model: Any, tokenizer: Any, library: ExpertLibrary, corpus: Corpus, cfg: AgentSearchConfig,
                 ctx: PhaseContext, *, batch_size: int = 16, thinker: QuietStarThinker | None = None,
                 max_thought_budget: int = 0, extra_seeds: Sequence[AgentConfig] = ()) -> AgentSearchOutcome:
    """Search agent designs on the validation split, then compare winner, seeds and plain model on the test split.
    With a ``thinker`` (the model carries Quiet-STaR's thought machinery) the space includes thought budgets up to
    ``max_thought_budget``. ``extra_seeds`` join the hand-designed ones (e.g. the phase's few-shot mixtures)."""
    val_all = questions_from_examples("validation", corpus.split("validation"), KINDS)
    val_prompts = {q.prompt for q in val_all}
    test_raw = questions_from_examples("test", corpus.split("test"), KINDS)
    # The synthetic generator can draw one prompt twice across splits; such a question is not held out from
    # the search, so it is dropped from the test side (counted in the report).
    test_clean = [q for q in test_raw if q.prompt not in val_prompts]
    validation = balanced_questions("validation", val_all, cfg.validation_questions)
    test = balanced_questions("test", test_clean, cfg.test_questions)
    if not validation or not test:
        raise ConfigError(f"experts.adas: the corpus has {len(validation)} validation and {len(test)} test questions "
                          "with checkable answers; the search needs both")
    splits = HeldOutSplits(validation, test)
    client = ExpertsClient(model, tokenizer, ctx, batch_size=batch_size, experts=LibraryApplier(library),
                           thinker=thinker, max_thought_budget=max_thought_budget if thinker is not None else 0)
    search_cfg = SearchConfig(generations=cfg.generations, population=cfg.population, max_questions=None,
                              bootstrap_samples=cfg.bootstrap_samples, seed=cfg.seed,
                              space={"max_new_tokens": (cfg.max_new_tokens,)})
    # Every design (seeds included) gets the configured token limit: the served agent uses it as its default.
    seeds = [s.model_copy(update={"max_new_tokens": cfg.max_new_tokens})
             for s in [*seed_agents(client.capabilities()), *extra_seeds]]
    with torch.no_grad():
        t0 = time.perf_counter()
        result = search(splits, client, search_cfg, seeds=seeds, tracker=ctx.tracker)
        t1 = time.perf_counter()
        touched = {k: sorted(v) for k, v in splits.touched.items()}  # before the test split is read
        comparison = final_comparison(splits, client, result)
        t2 = time.perf_counter()
    return AgentSearchOutcome(result.best_config(), result, comparison, splits, validation, test,
                              len(test_raw) - len(test_clean), t1 - t0, t2 - t1, touched)
