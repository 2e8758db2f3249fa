"""Phase 2, EvoMerge, as a sub-flow: evolve merge recipes, each generation's candidates fanned out as tasks.

    from flows.evomerge import run_evomerge
    result = run_evomerge(config, dataset, previous)      # a PhaseResult, like every phase task

What happens (the search itself is ``forge_models.evomerge``; this module only orchestrates):

1. The committed output at ``<store>/evomerge/<key>/`` is reused if it exists (``run_phase``).
2. Each generation, the strategy's new recipes are mapped over :func:`tasks.evomerge.candidate_task` with
   the configured task runner (``config.runner``: threads, a Dask or a Ray cluster). Every candidate is
   merged, stored, and scored on the fitness split (validation by default; the test split is refused).
   Candidates that leave the population are deleted from the store; the population, the winner and its
   lineage stay. Per generation, best / mean fitness and diversity go to MLflow and the progress bar.
3. After the search, the winner, every parent and the plain average of the parents are scored on the
   fitness split (mapped, cached; selection-biased for the winner, and labelled so). The test split is read
   only by the pipeline's final evaluation.
4. Output: ``merged/`` (the winner as a Hugging Face folder, with tokenizer), ``recipe.yaml`` (mergekit
   format, model paths are the parents' store URIs: ``forge merge --config recipe.yaml --out DIR``
   reproduces the tensors), ``search.json`` (history, lineage, final population, comparison),
   ``fitness.png``, ``report.md``, ``phase.json`` and ``manifest.json`` (last).

A parent is scored as the one-hot ``linear`` recipe of that model (bit-identical to the model: weight 1
on it, 0 on the others), the plain average as ``linear`` with equal weights, so every comparison goes
through the same merge-store-score path.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from prefect import flow, unmapped

from flows.config import ForgeConfig
from flows.runners import resource_annotation, subflow_options
from forge_models.evomerge import Candidate, Genome, MergeSpace, evolve, gene_specs
from forge_models.runtime import PhaseContext
from tasks.evaluate import model_folders
from tasks.evomerge import MERGED, CandidateScore, candidate_task, evomerge_key, search_space
from tasks.runtime import PhaseResult, PhaseWritten, _artifact, run_phase
from tasks.store import ArtifactRef, Store
from tasks.tracking import Tracking

COLUMNS = ("fitness", "arith_em", "tool_correct", "choice_acc", "loss")


def reference_genomes(space: MergeSpace) -> dict[str, Genome]:
    """Each parent as a one-hot linear recipe, and the plain average as an equal-weight linear recipe."""
    n = len(gene_specs("linear", space))
    per = space.layer_groups
    out = {}
    for i, name in enumerate(space.models):
        out[f"parent:{name}"] = Genome.make("linear", [1.0 if j // per == i else 0.0 for j in range(n)], space)
    out["average"] = Genome.make("linear", [1.0] * n, space)
    return out


def _body(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef, key: str):
    def body(ctx: PhaseContext, _inputs: list[Path], out_dir: Path) -> PhaseWritten:
        cfg = config.evomerge
        store = Store(config.store.url)
        space = search_space(config, model_folders(store, previous), previous.uri, store)
        prefix = store.uri("evomerge-candidates", key)
        scores: dict[tuple[str, str], CandidateScore] = {}
        seen: dict[str, Candidate] = {}
        deleted: set[str] = set()

        def run_batch(genomes: list[Genome], split: str, refresh: bool = False) -> list[CandidateScore]:
            fn = candidate_task.with_options(refresh_cache=True) if refresh else candidate_task
            with resource_annotation(config.runner):
                futures = fn.map(unmapped(config), unmapped(dataset), unmapped(previous), [g.to_dict() for g in genomes],
                                 unmapped(split), unmapped(prefix))
            out = [f.result() for f in futures]
            for r in out:
                scores[(r.key, split)] = r
            return out

        def evaluate(genomes: list[Genome]) -> list[float]:
            return [r.fitness for r in run_batch(genomes, cfg.fitness.split)]

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
                if k not in keep and k not in deleted:
                    store.delete(store.uri_join(prefix, k))
                    deleted.add(k)

        result = evolve(space, cfg, evaluate, seed=ctx.seed, on_generation=on_generation)
        best = result.best
        refs = reference_genomes(space)
        compare = {"best": best.genome, **refs}
        fit_split = cfg.fitness.split
        comparison = {split: dict(zip(compare, run_batch(list(compare.values()), split)))
                      for split in (fit_split,)}  # the test split is the final evaluation's alone

        if not cfg.keep_candidates:  # the references were stored only to be scored
            for name, g in refs.items():
                if g.key() != best.key and g.key() not in seen:
                    store.delete(store.uri_join(prefix, g.key()))
                    deleted.add(g.key())
        # The winner's folder survives the clean-up unless it had left the population and come back.
        best_uri = store.uri_join(prefix, best.key)
        if not store.exists(store.uri_join(best_uri, "manifest.json")):
            run_batch([best.genome], fit_split, refresh=True)
        store.download(best_uri, out_dir / "winner")
        (out_dir / "winner" / MERGED).rename(out_dir / MERGED)
        shutil.rmtree(out_dir / "winner")  # its manifest and genome.json describe the candidate, not this output
        paths = {n: store.uri_join(previous.uri, n) for n in (*space.models, *([space.base] if space.base else []))}
        recipe = best.genome.recipe(space, paths, cfg.dtype)
        import yaml

        recipe_text = (
            f"# EvoMerge winner ({best.genome.describe(space)}), fitness {best.fitness:.4f} on {fit_split}.\n"
            f"# Reproduce: forge merge --config recipe.yaml --out DIR --seed {config.seed}\n"
            + yaml.safe_dump(recipe, sort_keys=False)
        )
        (out_dir / "recipe.yaml").write_text(recipe_text)
        (out_dir / MERGED / "mergekit_config.yml").write_text(recipe_text)

        lineage = [_row(c, space, scores.get((c.key, fit_split))) for c in result.lineage()]
        population = [{"rank": i + 1, **_row(c, space, scores.get((c.key, fit_split)))} for i, c in enumerate(result.population)]
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
        (out_dir / "search.json").write_text(json.dumps({
            "space": {"models": list(space.models), "base": space.base, "layer_groups": space.layer_groups},
            "strategy": cfg.strategy, "stopped_by": result.stopped_by, "history": history, "lineage": lineage,
            "population": population, "comparison": table, "winner": best.genome.to_dict(),
        }, indent=1, default=str))
        _fitness_png(history, out_dir / "fitness.png", cfg.strategy)
        _artifact("create_table_artifact", key="evomerge-population", table=population,
                  description=f"EvoMerge final population ({cfg.strategy}, {len(history)} generations)")
        report = _report(config, previous, space, result, table, comparison, fit_split, deleted)
        return PhaseWritten(
            metrics=metrics, report_md=report, steps_run=0,
            curves={"generation/best": [(h["generation"], h["best"]) for h in history],
                    "generation/mean": [(h["generation"], h["mean"]) for h in history]},
            details={"stopped_by": result.stopped_by, "winner": best.genome.describe(space), "comparison": table,
                     "history": history, "executors": sorted({r.executor for r in scores.values()})},
            tables={"lineage.json": lineage, "population.json": population, "comparison.json": table},
        )

    return body


def _row(c: Candidate, space: MergeSpace, s: CandidateScore | None) -> dict:
    row = {"key": c.key, "generation": c.generation, "origin": c.origin, "parents": ",".join(c.parents),
           "method": c.genome.method, "fitness": c.fitness, "recipe": c.genome.describe(space)}
    if s is not None:
        row.update({k: s.metrics[k] for k in COLUMNS[1:] if k in s.metrics})
    return row


def _fitness_png(history: list[dict], path: Path, strategy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["best"] for h in history], marker="o", label="best so far")
    ax.plot(gens, [h["mean"] if math.isfinite(h["mean"]) else float("nan") for h in history], marker=".", label="generation mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (validation)")
    ax.set_title(f"EvoMerge ({strategy})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(config, previous, space, result, table, comparison, fit_split, deleted) -> str:
    cfg = config.evomerge
    cols = [f"{fit_split}/{c}" for c in ("fitness", "arith_em", "tool_correct", "choice_acc", "loss")]
    lines = [
        "# Phase 2: EvoMerge",
        "",
        f"Input: `{previous.uri}`; merged models {list(space.models)} against base `{space.base}`, "
        f"{space.layer_groups} layer group(s). Strategy **{cfg.strategy}**, population {cfg.population}, "
        f"{len(result.history)} of {cfg.generations} generations (stopped by {result.stopped_by}), "
        f"{result.evaluations} recipes scored (each once). Fitness = "
        + " + ".join(f"{w:g}*{k}" for k, w in cfg.fitness.weights.items()) + f" on the **{fit_split}** split.",
        "",
        f"Winner: `{result.best.genome.describe(space)}` (found in generation {result.best.generation}, {result.best.origin}).",
        "",
        "| model | recipe | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for row in table:
        lines.append(f"| {row['model']} | {row['recipe'][:60]} | "
                     + " | ".join(f"{row[c]:.4f}" if c in row else "-" for c in cols) + " |")
    for split, res in comparison.items():
        parents = {n: r.fitness for n, r in res.items() if n.startswith("parent:")}
        diffs = ", ".join(f"{res['best'].fitness - f:+.4f} vs {n.split(':', 1)[1]}" for n, f in parents.items())
        lines.append("")
        lines.append(f"On **{split}** (selection-biased: the winner was chosen on it), the winner's fitness differs by "
                     f"{diffs}, and by {res['best'].fitness - res['average'].fitness:+.4f} vs the plain average.")
    lines += [
        "",
        "| generation | best | mean | diversity | scored | cached | seconds |",
        "|---|---|---|---|---|---|---|",
        *[f"| {h.generation} | {h.best:.4f} | {h.mean:.4f} | {h.diversity:.3f} | {h.evaluated} | {h.cached} | {h.seconds:.1f} |"
          for h in result.history],
        "",
        f"Candidates deleted from the store when they left the population: {len(deleted)}. "
        "The winner's recipe is `recipe.yaml` (mergekit format).",
    ]
    return "\n".join(lines) + "\n"


@flow(name="evomerge", persist_result=False)
def evomerge_flow(config: ForgeConfig, dataset: PhaseResult, previous: PhaseResult, parent_run_id: str | None = None) -> PhaseResult:
    """Phase 2 (see module docstring)."""
    store = Store(config.store.url)
    key = evomerge_key(config, dataset.ref, previous.ref)
    return run_phase(
        phase="evomerge", kind="model", key=key, store_url=config.store.url,
        config_section=config.evomerge.model_dump(mode="json"), inputs=[dataset.ref, previous.ref],
        body=_body(config, dataset.ref, previous.ref, key),
        tracking=Tracking.from_config(config.tracking, store, config.name), parent_run_id=parent_run_id,
        device=config.device.device, precision=config.device.precision, seed=config.seed,
        threads=config.device.threads, download_inputs=False,
    )


def run_evomerge(config: ForgeConfig, dataset: PhaseResult, previous: PhaseResult, parent_run_id: str | None = None,
                 result_storage=None) -> PhaseResult:
    """Run the sub-flow with the configured task runner (and the pipeline's result storage)."""
    return evomerge_flow.with_options(**subflow_options(config.runner, result_storage))(config, dataset, previous, parent_run_id)
