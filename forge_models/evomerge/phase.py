"""Phase 2, EvoMerge, under the phase contract: ``run(inputs, cfg, ctx, fan_out) -> PhaseOutput``.

The search scores many candidates, and where they are merged and scored (threads, a Dask or Ray cluster,
a store they are kept in) is the caller's business: it hands in ``fan_out``, which scores a list of recipes
on a split and returns one :class:`Scored` per recipe, in order. Everything else is here:

1. :func:`forge_models.evomerge.evolve` runs the strategy, scoring each generation through ``fan_out`` on
   the fitness split; per generation, best / mean / diversity go to ``ctx.tracker``. Candidates that leave
   the population (and are not an ancestor of the best) are handed to ``discard`` once, so the caller may
   delete their stored copies (``cfg.keep_candidates`` keeps them all).
2. The winner, every parent and the plain average of the parents are scored on the fitness split
   (selection-biased for the winner, and labelled so; the test split is read only by the pipeline's final
   evaluation): a parent is the one-hot ``linear`` recipe of that model (bit-identical to it), the average
   ``linear`` with equal weights, so every comparison goes through the same merge-and-score path.
3. The margins of the winner over the best parent and over the average, per split, are metrics.
4. The winner's recipe in mergekit format (``forge merge --config recipe.yaml``) is written with the model
   paths the caller gives (store URIs in the pipeline).

The returned `PhaseOutput` has no models (the winner is whichever copy ``fan_out`` stored, under
``details["winner_key"]``); its details hold the recipe text, lineage, final population, comparison table
and history, for the caller's report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import yaml

from forge_models.evomerge.config import EvoMergeConfig
from forge_models.evomerge.genome import Genome, MergeSpace, gene_specs
from forge_models.evomerge.search import Candidate, evolve
from forge_models.runtime import PhaseContext, PhaseOutput

__all__ = ["COLUMNS", "EvoMergeInputs", "FanOut", "Scored", "reference_genomes", "run"]

COLUMNS = ("fitness", "arith_em", "tool_correct", "choice_acc", "loss")
"""Columns of the lineage, population and comparison tables."""


class Scored(Protocol):
    """What scoring one recipe gives back (e.g. the orchestration's candidate score)."""

    key: str
    fitness: float
    metrics: Mapping[str, float]


FanOut = Callable[[list[Genome], str], Sequence[Scored]]
"""Score recipes on a split (``validation``, ``test``); one result per recipe, in order."""


@dataclass(frozen=True)
class EvoMergeInputs:
    """What the search needs besides its config.

    Attributes:
        space: the models to merge, the base, layer groups (see `MergeSpace`).
        model_paths: where each model of the space (and the base) lives, as the recipe should name it.
        seed: the run seed, written into the recipe's reproduce line.
    """

    space: MergeSpace
    model_paths: Mapping[str, str]
    seed: int = 0


def reference_genomes(space: MergeSpace) -> dict[str, Genome]:
    """Each parent as a one-hot linear recipe, and the plain average as an equal-weight linear recipe."""
    n = len(gene_specs("linear", space))
    per = space.layer_groups
    out = {}
    for i, name in enumerate(space.models):
        out[f"parent:{name}"] = Genome.make("linear", [1.0 if j // per == i else 0.0 for j in range(n)], space)
    out["average"] = Genome.make("linear", [1.0] * n, space)
    return out


def run(inputs: EvoMergeInputs, cfg: EvoMergeConfig, ctx: PhaseContext, fan_out: FanOut,
        discard: Callable[[str], None] | None = None) -> PhaseOutput:
    """Search, compare the winner with its parents and their average on both splits, write its recipe."""
    space = inputs.space
    scores: dict[tuple[str, str], Scored] = {}
    seen: dict[str, Candidate] = {}
    discarded: set[str] = set()

    def score(genomes: list[Genome], split: str) -> list[Scored]:
        out = list(fan_out(genomes, split))
        for r in out:
            scores[(r.key, split)] = r
        return out

    def drop(key: str) -> None:
        if discard is not None and key not in discarded:
            discard(key)
        discarded.add(key)

    def ancestors(k: str) -> set[str]:
        out, todo = set(), [k]
        while todo:
            c = todo.pop()
            if c not in out and c in seen:
                out.add(c)
                todo.extend(seen[c].parents)
        return out

    def on_generation(stats, population: list[Candidate], cands: list[Candidate]) -> None:
        for c in cands:
            seen.setdefault(c.key, c)
        ctx.tracker.log_metrics({
            "generation/best": stats.best, "generation/mean": stats.mean, "generation/diversity": stats.diversity,
            "generation/evaluated": stats.evaluated, "generation/cached": stats.cached,
            "generation/seconds": stats.seconds,
        }, step=stats.generation)
        ctx.tracker.progress(stats.generation + 1, cfg.generations,
                             f"generation {stats.generation}: best {stats.best:.4f}, mean {stats.mean:.4f}, "
                             f"diversity {stats.diversity:.3f}")
        if cfg.keep_candidates:
            return
        keep = {c.key for c in population} | ancestors(stats.best_key)
        for k in seen:
            if k not in keep and k not in discarded:
                drop(k)

    fit_split = cfg.fitness.split
    result = evolve(space, cfg, lambda genomes: [r.fitness for r in score(genomes, fit_split)], seed=ctx.seed,
                    on_generation=on_generation)
    best = result.best
    refs = reference_genomes(space)
    compare = {"best": best.genome, **refs}
    comparison = {split: dict(zip(compare, score(list(compare.values()), split))) for split in (fit_split,)}  # the test split is the final evaluation's alone
    if not cfg.keep_candidates:  # the references were stored only to be scored
        for g in refs.values():
            if g.key() != best.key and g.key() not in seen:
                drop(g.key())

    recipe = best.genome.recipe(space, dict(inputs.model_paths), cfg.dtype)
    recipe_text = (
        f"# EvoMerge winner ({best.genome.describe(space)}), fitness {best.fitness:.4f} on {fit_split}.\n"
        f"# Reproduce: forge merge --config recipe.yaml --out DIR --seed {inputs.seed}\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    lineage = [_row(c, space, scores.get((c.key, fit_split))) for c in result.lineage()]
    population = [{"rank": i + 1, **_row(c, space, scores.get((c.key, fit_split)))}
                  for i, c in enumerate(result.population)]
    history = [vars(h) for h in result.history]
    table = []
    for name in compare:
        row = {"model": name, "recipe": compare[name].describe(space)}
        for split, res in comparison.items():
            row[f"{split}/fitness"] = res[name].fitness
            for col in COLUMNS[1:]:
                if col in res[name].metrics:
                    row[f"{split}/{col}"] = res[name].metrics[col]
        table.append(row)
    metrics: dict[str, float] = {
        "evaluations": float(result.evaluations), "generations": float(len(result.history)),
        "best_fitness": float(best.fitness),
    }
    for split, res in comparison.items():
        for name, r in res.items():
            metrics[f"{split}/{name}/fitness"] = r.fitness
        parent_best = max(r.fitness for n, r in res.items() if n.startswith("parent:"))
        metrics[f"{split}/margin_over_best_parent"] = res["best"].fitness - parent_best
        metrics[f"{split}/margin_over_average"] = res["best"].fitness - res["average"].fitness
    return PhaseOutput(
        models={}, tokenizer=None, metrics=metrics,
        curves={"generation/best": [(h["generation"], h["best"]) for h in history],
                "generation/mean": [(h["generation"], h["mean"]) for h in history]},
        details={
            "result": result, "winner_key": best.key, "winner": best.genome, "recipe_text": recipe_text,
            "lineage": lineage, "population": population, "history": history, "comparison": table,
            "scores": comparison, "discarded": len(discarded),
        },
    )


def _row(c: Candidate, space: MergeSpace, s: Scored | None) -> dict:
    row = {"key": c.key, "generation": c.generation, "origin": c.origin, "parents": ",".join(c.parents),
           "method": c.genome.method, "fitness": c.fitness, "recipe": c.genome.describe(space)}
    if s is not None:
        row.update({k: s.metrics[k] for k in COLUMNS[1:] if k in s.metrics})
    return row
