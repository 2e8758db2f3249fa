"""Sub-flow: evaluate every model of an artifact on a held-out split, fanned out as mapped tasks.

The task runner is ``config.runner`` (threads by default; a Dask or Ray cluster for scale-out), so this
is the place where evaluation work leaves the machine that runs the pipeline.

    from flows.evaluate import run_evaluation
    scores = run_evaluation(config, dataset_ref, artifact_ref, split="test")   # {model: metrics}
"""

from __future__ import annotations

from prefect import flow, unmapped

from flows.runners import resource_annotation, subflow_options
from tasks.config import ForgeConfig
from tasks.evaluate import ModelEvaluation, evaluate_model_task, model_folders
from tasks.runtime import HEADLINE_METRICS, metrics_table, prefect_artifact
from tasks.store import ArtifactRef, Store

COLUMNS = list(HEADLINE_METRICS)


@flow(name="evaluate-models", persist_result=False)
def evaluate_models(config: ForgeConfig, dataset: ArtifactRef, artifact: ArtifactRef, split: str = "test") -> list[ModelEvaluation]:
    names = model_folders(Store(config.store.url), artifact)
    with resource_annotation(config.runner):
        futures = evaluate_model_task.map(unmapped(config), unmapped(dataset), unmapped(artifact), names, unmapped(split))
    results = [f.result() for f in futures]
    table = metrics_table({"after": {r.model: r.metrics for r in results}}, COLUMNS)
    prefect_artifact("create_markdown_artifact", key="test-evaluation",
              markdown=f"# {split} split: {artifact.uri}\n\n{table}\n", description=f"{split}-split evaluation")
    return results


def run_evaluation(config: ForgeConfig, dataset: ArtifactRef, artifact: ArtifactRef, split: str = "test",
                   result_storage=None) -> list[ModelEvaluation]:
    return evaluate_models.with_options(**subflow_options(config.runner, result_storage))(config, dataset, artifact, split)
