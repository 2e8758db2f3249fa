"""Phase 2, EvoMerge, as a sub-flow: the search's candidates fanned out as mapped tasks on ``config.runner``.

    from flows.evomerge import run_evomerge
    result = run_evomerge(config, dataset, previous)      # a PhaseResult, like every phase task

The phase itself (search, reference genomes, margins, pruning, recipe) is `forge_models.evomerge.phase`;
its store side (cache key, candidates, winner folder, report) is `tasks.evomerge`. This module only gives
the search its ``fan_out``: each batch of recipes mapped over :func:`tasks.evomerge.candidate_task` with the
configured task runner (threads, a Dask or a Ray cluster). Outputs at ``<store>/evomerge/<key>/``:
``merged/`` (the winner, with tokenizer), ``recipe.yaml`` (mergekit format; ``forge merge --config
recipe.yaml --out DIR`` reproduces the tensors), ``search.json``, ``fitness.png``, ``report.md``,
``phase.json`` and ``manifest.json`` (last).
"""

from __future__ import annotations

from prefect import flow, unmapped

from flows.runners import resource_annotation, subflow_options
from forge_models.evomerge import Genome
from tasks.config import ForgeConfig
from tasks.evomerge import CandidateScore, candidate_task, evomerge_key, run_evomerge_phase
from tasks.runtime import PhaseResult
from tasks.store import Store


@flow(name="evomerge", persist_result=False)
def evomerge_flow(config: ForgeConfig, dataset: PhaseResult, previous: PhaseResult, parent_run_id: str | None = None) -> PhaseResult:
    """Phase 2 (see module docstring)."""
    store = Store(config.store.url)
    prefix = store.uri("evomerge-candidates", evomerge_key(config, dataset.ref, previous.ref))

    def fan_out(genomes: list[Genome], split: str, refresh: bool = False) -> list[CandidateScore]:
        fn = candidate_task.with_options(refresh_cache=True) if refresh else candidate_task
        with resource_annotation(config.runner):
            futures = fn.map(unmapped(config), unmapped(dataset.ref), unmapped(previous.ref),
                             [g.to_dict() for g in genomes], unmapped(split), unmapped(prefix))
        return [f.result() for f in futures]

    return run_evomerge_phase(config, dataset, previous, fan_out, parent_run_id)


def run_evomerge(config: ForgeConfig, dataset: PhaseResult, previous: PhaseResult, parent_run_id: str | None = None,
                 result_storage=None) -> PhaseResult:
    """Run the sub-flow with the configured task runner (and the pipeline's result storage)."""
    return evomerge_flow.with_options(**subflow_options(config.runner, result_storage))(config, dataset, previous, parent_run_id)
