"""Prefect task for one EvoMerge candidate: merge its recipe, store the merged model, score it held out.

`flows/evomerge.py` maps :func:`candidate_task` over each generation's new recipes with the configured
task runner (threads, Dask, Ray). A candidate is stored like any artifact, at
``<store>/evomerge-candidates/<search key>/<recipe key>/merged/`` with its manifest written last, and is
deleted by the flow when it leaves the population (the winner and its lineage stay).

Results are cached by (input models, data, eval and fitness settings, recipe key, split): a recipe is
never scored twice on the same split, in this run or a later one (a rerun after an interruption replays
the deterministic search from the cache in seconds).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.config import ForgeConfig
from forge_models.evomerge import Genome, MergeSpace, merge_candidate, score
from forge_models.runtime import ArtifactIntegrityError, ConfigError, PhaseContext
from tasks import runtime as _rt  # a module reference: Dask pickles this task by value
from tasks.cache import phase_key
from tasks.evaluate import model_folders
from tasks.runtime import PHASE_TASK_OPTIONS, resolve_device
from tasks.store import ArtifactRef, Store

EVOMERGE_VERSION = "1"
MERGED = "merged"
"""Folder name of the merged model inside a candidate and inside the phase output."""


class CandidateScore(BaseModel):
    """What scoring one candidate returns (small JSON; the model itself stays in the store)."""

    model_config = ConfigDict(frozen=True)

    key: str
    method: str
    split: str
    fitness: float
    metrics: dict[str, float]
    uri: str
    digest: str
    seconds: float
    executor: str


def evomerge_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"evomerge": config.evomerge.model_dump(mode="json"), "eval": config.eval.model_dump(mode="json"),
                          "seed": config.seed, "precision": config.device.precision}, sort_keys=True)
    return phase_key("evomerge", EVOMERGE_VERSION, section, [previous.digest], dataset.digest)


def candidate_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef, genome: dict, split: str) -> str:
    section = json.dumps({
        "recipe": Genome.from_dict(genome).key(), "split": split, "fitness": config.evomerge.fitness.model_dump(mode="json"),
        "eval": config.eval.model_dump(mode="json"), "space": _space_section(config), "dtype": config.evomerge.dtype,
        "seed": config.seed, "precision": config.device.precision,
    }, sort_keys=True)
    return phase_key("evomerge-candidate", EVOMERGE_VERSION, section, [previous.digest], dataset.digest)


def _space_section(config: ForgeConfig) -> dict:
    cfg = config.evomerge
    return {"base": cfg.base_model, "models": cfg.models, "layer_groups": cfg.layer_groups,
            "dfs_repeats": cfg.dfs_repeats}


def search_space(config: ForgeConfig, names: list[str], uri: str, store: Store | None = None) -> MergeSpace:
    """The models to merge and the base, checked against the folders of the input artifact. With ``store``,
    the merged models' layer counts are read from their config.json (DFS needs them)."""
    cfg = config.evomerge
    base = cfg.base_model
    if base is not None and base not in names:
        raise ArtifactIntegrityError(f"evomerge.base_model {base!r} is not in {uri} (it holds {names})")
    models = cfg.models if cfg.models is not None else [n for n in names if n != base]
    missing = [m for m in models if m not in names]
    if missing:
        raise ArtifactIntegrityError(f"evomerge.models {missing} are not in {uri} (it holds {names})")
    if len(models) < 2:
        raise ConfigError(f"evomerge needs at least two models to merge; {uri} gives {models} besides the base "
                          f"{base!r}. Configure more Cognate variants (or base models on the pretrained route).")
    layers = tuple(_layer_count(store, uri, m) for m in models) if store is not None else ()
    return MergeSpace(models=tuple(models), base=base, layer_groups=cfg.layer_groups, layers=layers,
                      dfs_repeats=cfg.dfs_repeats)


def _layer_count(store: Store, uri: str, model: str) -> int:
    cfg = json.loads(store.read_bytes(store.uri_join(store.uri_join(uri, model), "config.json")))
    count = cfg.get("num_hidden_layers", cfg.get("num_layers"))
    if not isinstance(count, int) or count < 1:
        raise ArtifactIntegrityError(f"{uri}/{model}/config.json gives no layer count (num_hidden_layers)")
    return count


# Parents and corpus are downloaded once per process (verified), not once per candidate.
_LOCAL_LOCK = threading.Lock()
_LOCAL: dict[str, Path] = {}
_LOCAL_ROOT: list[Path] = []


def _local_copy(store: Store, ref: ArtifactRef, only: str) -> Path:
    with _LOCAL_LOCK:
        if not _LOCAL_ROOT:
            _LOCAL_ROOT.append(Path(tempfile.mkdtemp(prefix="forge-evomerge-inputs-")))
            atexit.register(shutil.rmtree, _LOCAL_ROOT[0], True)
        key = f"{ref.digest}/{only}"
        if key not in _LOCAL or not _LOCAL[key].exists():
            dest = _LOCAL_ROOT[0] / ref.digest[:16] / only
            if dest.exists():
                shutil.rmtree(dest)
            store.download(ref.uri, dest.parent / f".{only}-partial", expected_digest=ref.digest, only=only)
            (dest.parent / f".{only}-partial" / only).rename(dest)
            shutil.rmtree(dest.parent / f".{only}-partial", ignore_errors=True)
            _LOCAL[key] = dest
        return _LOCAL[key]


@task(
    name="evomerge-candidate",
    **PHASE_TASK_OPTIONS,
    retry_delay_seconds=[1, 5],
    task_run_name="candidate-{split}",
    cache_key_fn=lambda ctx, p: "evocand-" + candidate_key(p["config"], p["dataset"], p["previous"], p["genome"], p["split"]),
)
def candidate_task(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef, genome: dict, split: str,
                   prefix: str) -> CandidateScore:
    """Merge ``genome`` (or reuse its stored merge under ``prefix``) and score it on ``split``."""
    import forge_models  # noqa: F401  (registers the Cognate architecture)
    from transformers import AutoModelForCausalLM

    from forge_models.data import Corpus
    from forge_models.tokenizer import load_tokenizer

    t0 = time.monotonic()
    store = Store(config.store.url)
    g = Genome.from_dict(genome)
    space = search_space(config, model_folders(store, previous), previous.uri, store)
    uri = store.uri_join(prefix, g.key())
    device = resolve_device(config.device.device)
    with tempfile.TemporaryDirectory(prefix="forge-candidate-") as tmp:
        tmp = Path(tmp)
        if store.exists(store.uri_join(uri, "manifest.json")):
            manifest = store.download(uri, tmp / "cand")
            digest = manifest["digest"]
        else:
            folders = {n: _local_copy(store, previous, n) for n in (*space.models, *([space.base] if space.base else []))}
            merge_candidate(g, space, folders, tmp / "cand" / MERGED, dtype=config.evomerge.dtype, seed=config.seed)
            (tmp / "cand" / "genome.json").write_text(json.dumps({**g.to_dict(), "describe": g.describe(space)}, indent=1))
            digest = store.write_prefix(tmp / "cand", uri, "model")
        corpus = Corpus.load(_local_copy(store, dataset, "corpus"))
        tokenizer = load_tokenizer(tmp / "cand" / MERGED)
        with _rt.MODEL_LOAD_LOCK:  # from_pretrained switches torch's default device: not thread-safe
            model = AutoModelForCausalLM.from_pretrained(tmp / "cand" / MERGED, dtype=torch.float32).to(device)
        ctx = PhaseContext(device=device, seed=config.seed, precision=config.device.precision)
        fitness, metrics = score(model, tokenizer, corpus.split(split), config.eval, config.evomerge.fitness, ctx)
    return CandidateScore(key=g.key(), method=g.method, split=split, fitness=fitness, metrics=metrics, uri=uri,
                          digest=digest, seconds=time.monotonic() - t0, executor=_rt.executor_name())
