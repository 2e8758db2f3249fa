"""Prefect task: evaluate one model folder of a stored artifact with the shared harness.

Mapped over the models of an artifact by `flows/evaluate.py`; the task runner (threads, Dask, Ray) comes
from ``config.runner``. Results are cached by (artifact digest, dataset digest, model, split, eval config),
so a rerun of the same pipeline does not evaluate again.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict

from forge_models.runtime import PhaseContext
from tasks.cache import phase_key
from tasks import runtime as _rt  # a module reference: Dask pickles this task by value
from tasks.config import ForgeConfig
from tasks.runtime import resolve_device, PHASE_TASK_OPTIONS
from tasks.store import ArtifactRef, Store

EVAL_VERSION = "1"


class ModelEvaluation(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    split: str
    metrics: dict[str, float]
    executor: str  # where it ran: a Dask worker address, or host/thread


def eval_key(config: ForgeConfig, dataset: ArtifactRef, artifact: ArtifactRef, model: str, split: str) -> str:
    section = json.dumps({"eval": config.eval.model_dump(mode="json"), "model": model, "split": split,
                          "precision": config.device.precision}, sort_keys=True)
    return phase_key("evaluate", EVAL_VERSION, section, [artifact.digest], dataset.digest)


def model_folders(store: Store, artifact: ArtifactRef) -> list[str]:
    manifest, _ = store.read_manifest(artifact.uri)
    return sorted({rel.split("/", 1)[0] for rel in manifest["files"] if rel.endswith("/config.json") and rel.count("/") == 1})


def load_model(folder: Path, device: torch.device):
    """A stored model folder as a float32 causal LM on ``device``: a compressed artifact (``recipe.json``,
    phase 8) through ``load_compressed``; anything else (plain or packed BitNet) through ``from_pretrained``."""
    import forge_models  # noqa: F401  (registers the Cognate architecture)
    from transformers import AutoModelForCausalLM

    from forge_models.compression.artifact import RECIPE_FILE, load_compressed

    with _rt.MODEL_LOAD_LOCK:  # both switch torch's global default device (meta): not thread-safe
        if (folder / RECIPE_FILE).is_file():
            return load_compressed(folder, torch.float32, device)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)


@task(
    name="evaluate-model",
    **PHASE_TASK_OPTIONS,
    retry_delay_seconds=[1, 5],
    cache_key_fn=lambda ctx, p: "evaluate-" + eval_key(p["config"], p["dataset"], p["artifact"], p["model"], p["split"]),
)
def evaluate_model_task(
    config: ForgeConfig, dataset: ArtifactRef, artifact: ArtifactRef, model: str, split: str = "test"
) -> ModelEvaluation:
    """Download one model folder (verified) and the corpus, and run the harness on ``split``."""
    import forge_models  # noqa: F401  (registers the Cognate architecture)

    from forge_models.data import Corpus
    from forge_models.eval import evaluate
    from forge_models.tokenizer import load_tokenizer

    store = Store(config.store.url)
    device = resolve_device(config.device.device)
    with tempfile.TemporaryDirectory(prefix="forge-eval-") as tmp:
        tmp = Path(tmp)
        store.download(dataset.uri, tmp / "data", expected_digest=dataset.digest, only="corpus")
        store.download(artifact.uri, tmp / "model", expected_digest=artifact.digest, only=model)
        corpus = Corpus.load(tmp / "data" / "corpus")
        tokenizer = load_tokenizer(tmp / "model" / model)
        net = load_model(tmp / "model" / model, device)
        ctx = PhaseContext(device=device, seed=config.seed, precision=config.device.precision)
        metrics = evaluate(net, tokenizer, corpus.split(split), config.eval.for_split(split), ctx)  # test: every example
    return ModelEvaluation(model=model, split=split, metrics=metrics, executor=_rt.executor_name())
