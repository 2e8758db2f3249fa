"""EvoMerge's orchestration: the Prefect task that scores one candidate, and the phase body around
`forge_models.evomerge.phase.run`.

`flows/evomerge.py` maps :func:`candidate_task` over each generation's new recipes with the configured
task runner (threads, Dask, Ray) and hands that mapping to :func:`run_evomerge_phase` as the search's
``fan_out``. A candidate is stored like any artifact, at
``<store>/evomerge-candidates/<search key>/<recipe key>/merged/`` with its manifest written last, and is
deleted by the flow when it leaves the population (the winner and its lineage stay).

Results are cached by (input models, data, eval and fitness settings, recipe key, split): a recipe is
never scored twice on the same split, in this run or a later one (a rerun after an interruption replays
the deterministic search from the cache in seconds).
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict

from forge_models.evomerge import Genome, MergeSpace, merge_candidate, score
from forge_models.evomerge import phase as evomerge_phase
from forge_models.runtime import ArtifactIntegrityError, ConfigError, PhaseContext
from tasks import runtime as _rt  # a module reference: Dask pickles this task by value
from tasks.cache import phase_key
from tasks.config import ForgeConfig
from tasks.evaluate import model_folders
from tasks.runtime import PHASE_TASK_OPTIONS, PhaseResult, PhaseWritten, prefect_artifact, resolve_device, run_phase
from tasks.store import ArtifactRef, Store
from tasks.tracking import Tracking

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


# ---------------------------------------------------------------------------------- the phase


FanOut = Callable[..., list[CandidateScore]]
"""``fan_out(genomes, split, refresh=False)``: score recipes (merged and stored under the search's prefix)."""


def run_evomerge_phase(config: ForgeConfig, dataset: PhaseResult, previous: PhaseResult, fan_out: FanOut,
                       parent_run_id: str | None = None) -> PhaseResult:
    """Phase 2 at ``<store>/evomerge/<key>/``: the search (`forge_models.evomerge.phase`) with ``fan_out``,
    then the winner's folder, ``recipe.yaml``, ``search.json``, ``fitness.png``, ``report.md``."""
    store = Store(config.store.url)
    key = evomerge_key(config, dataset.ref, previous.ref)
    return run_phase(
        phase="evomerge", kind="model", key=key, store_url=config.store.url,
        config_section=config.evomerge.model_dump(mode="json"), inputs=[dataset.ref, previous.ref],
        body=_body(config, previous.ref, key, fan_out),
        tracking=Tracking.from_config(config.tracking, store, config.name), parent_run_id=parent_run_id,
        device=config.device.device, precision=config.device.precision, seed=config.seed,
        threads=config.device.threads, download_inputs=False,
    )


def _body(config: ForgeConfig, previous: ArtifactRef, key: str, fan_out: FanOut):
    def body(ctx: PhaseContext, _inputs: list[Path], out_dir: Path) -> PhaseWritten:
        cfg = config.evomerge
        store = Store(config.store.url)
        space = search_space(config, model_folders(store, previous), previous.uri, store)
        prefix = store.uri("evomerge-candidates", key)
        paths = {n: store.uri_join(previous.uri, n) for n in (*space.models, *([space.base] if space.base else []))}
        executors: set[str] = set()

        def scored(genomes: list, split: str, refresh: bool = False) -> list[CandidateScore]:
            out = fan_out(genomes, split, refresh=refresh)
            executors.update(r.executor for r in out)
            return out

        out = evomerge_phase.run(
            evomerge_phase.EvoMergeInputs(space=space, model_paths=paths, seed=config.seed), cfg, ctx,
            fan_out=scored, discard=lambda k: store.delete(store.uri_join(prefix, k)),
        )
        d = out.details
        result, fit_split = d["result"], cfg.fitness.split
        # The winner's folder survives the clean-up unless it had left the population and come back.
        best_uri = store.uri_join(prefix, d["winner_key"])
        if not store.exists(store.uri_join(best_uri, "manifest.json")):
            scored([d["winner"]], fit_split, refresh=True)
        store.download(best_uri, out_dir / "winner")
        (out_dir / "winner" / MERGED).rename(out_dir / MERGED)
        shutil.rmtree(out_dir / "winner")  # its manifest and genome.json describe the candidate, not this output
        (out_dir / "recipe.yaml").write_text(d["recipe_text"])
        (out_dir / MERGED / "mergekit_config.yml").write_text(d["recipe_text"])
        lineage, population, history, table = d["lineage"], d["population"], d["history"], d["comparison"]
        (out_dir / "search.json").write_text(json.dumps({
            "space": {"models": list(space.models), "base": space.base, "layer_groups": space.layer_groups},
            "strategy": cfg.strategy, "stopped_by": result.stopped_by, "history": history, "lineage": lineage,
            "population": population, "comparison": table, "winner": d["winner"].to_dict(),
        }, indent=1, default=str))
        _fitness_png(history, out_dir / "fitness.png", cfg.strategy)
        prefect_artifact("create_table_artifact", key="evomerge-population", table=population,
                         description=f"EvoMerge final population ({cfg.strategy}, {len(history)} generations)")
        report = _report(config, previous, space, result, table, d["scores"], fit_split, d["discarded"])
        return PhaseWritten(
            metrics=out.metrics, report_md=report, steps_run=0, curves=out.curves,
            details={"stopped_by": result.stopped_by, "winner": d["winner"].describe(space), "comparison": table,
                     "history": history, "executors": sorted(executors)},
            tables={"lineage.json": lineage, "population.json": population, "comparison.json": table},
        )

    return body


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
        f"Candidates deleted from the store when they left the population: {deleted}. "
        "The winner's recipe is `recipe.yaml` (mergekit format).",
    ]
    return "\n".join(lines) + "\n"
