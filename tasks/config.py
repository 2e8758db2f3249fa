"""The pipeline-level configuration: `ForgeConfig` and its non-phase sections (store, tracking, device, runner).

It lives in ``tasks/`` so that both the phase tasks and ``flows/`` use it (tasks never import flows).
Its phase sections (``cognate``, ``evomerge``, ...) are not written out here: they come from the phase
table (`tasks.phases`), one field per phase with a config section, in pipeline order. Validation reads the
same table: known and implemented phases, their order, what each phase takes from the one before it.
Loading presets and ``--set`` overrides is ``flows.config``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, create_model, model_validator

from forge_models.config import DataConfig, EvalConfig, Frozen
from tasks import phases as table

__all__ = ["DeviceConfig", "ForgeConfig", "RunnerConfig", "StoreConfig", "TrackingConfig"]


class StoreConfig(Frozen):
    """Where artifacts, checkpoints and Prefect results go."""

    url: str = Field(
        default_factory=lambda: os.environ.get("FORGE_STORE", "file://./forge-store"),
        description="fsspec URL of the store root: file://PATH or s3://BUCKET/PREFIX (endpoint and keys "
        "from the standard AWS environment variables). Default: $FORGE_STORE or file://./forge-store.",
    )

    @model_validator(mode="after")
    def _scheme(self) -> "StoreConfig":
        scheme = self.url.split("://", 1)[0] if "://" in self.url else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"store.url scheme {scheme!r} is not supported; use file:// or s3://")
        if scheme == "s3" and len(self.url[5:].split("/", 1)[0]) < 3:
            raise ValueError("store.url: an S3 bucket name needs at least 3 characters")
        return self


class TrackingConfig(Frozen):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log runs, metrics and artifacts to MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else a SQLite file under the local "
        "store (or ./forge-mlflow/mlflow.db when the store is remote).",
    )
    experiment: str | None = Field(None, description="Experiment name; None: the pipeline name.")
    register_final: bool = Field(
        True, description="At the end of a successful run, log the final artifact as an MLflow model, register it "
        "under the pipeline name and point the alias 'candidate' at it (needs a final artifact with one model).",
    )


class DeviceConfig(Frozen):
    """Explicit device and precision."""

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$", description="auto (cuda when present), cpu, cuda, cuda:N."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it (AVX-512 BF16 CPUs, CUDA), else fp32."
    )
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads (None: torch's default).")


class RunnerConfig(Frozen):
    """Where fanned-out work (mapped Prefect tasks: model evaluations, EvoMerge populations) runs."""

    kind: Literal["threads", "dask", "ray"] = Field(
        "threads", description="threads (one process), dask (prefect-dask) or ray (prefect-ray, install it yourself)."
    )
    max_workers: int = Field(2, ge=1, le=1024, description="Parallel tasks for the threads runner.")
    address: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786) or Ray cluster; None starts a local one."
    )
    n_workers: int = Field(2, ge=1, le=1024, description="Workers of the local Dask cluster started when address is None.")
    processes: bool = Field(
        False, description="Local Dask cluster: worker processes (True) or threads in this process (False)."
    )
    gpus_per_task: float = Field(
        0.0, ge=0, le=64,
        description="GPU resource annotation per mapped task (Dask resources {'GPU': n}, Ray num_gpus); 0 = none.",
    )


class _Pipeline(Frozen):
    """The whole Agent Forge pipeline: which phases run, on what data, where results go."""

    name: str = Field(
        "agent-forge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Pipeline name (MLflow experiment)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Run seed; every phase derives its generators from it.")
    phases: list[str] = Field(
        default_factory=lambda: ["cognate"],
        description=f"Phases to run, in pipeline order, from {[s.name for s in table.ordered()]}.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus, splits and tokenizer.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="The held-out evaluation harness.")
    input: str | None = Field(
        None,
        description="Hugging Face model folder fed to the first phase when the pipeline does not start with "
        "cognate (e.g. phases [bitnet]); its tokenizer must be the data tokenizer.",
    )
    # Then one section per phase with a config (from the table, in pipeline order), then _AFTER_PHASES.

    @model_validator(mode="after")
    def _check(self):
        problems = _order_problems(self.phases)
        first = self.phases[0] if self.phases else None
        if first in table.PHASES:
            spec = table.PHASES[first]
            if spec.input_kind != "dataset" and not self.input:
                problems.append(
                    f"input: the pipeline starts at {first!r}, so it needs an input model folder "
                    f"(set input, or use: forge phase {first} --input DIR)"
                )
            if self.input and spec.input_kind == "dataset":
                problems.append(f"input: only used when the pipeline does not start with {first} (use cognate.base_models)")
        if self.input and self.data.tokenizer.kind != "pretrained":
            problems.append(
                "data.tokenizer: an input model brings its own vocabulary; set data.tokenizer.kind=pretrained and "
                "data.tokenizer.path to the input folder"
            )
        known = not problems or all(p in table.PHASES and table.PHASES[p].implemented for p in self.phases)
        for spec in table.ordered():
            if not spec.implemented:
                continue
            runs = known and spec.name in self.phases
            inputs = table.previous_outputs(self, spec.name) if runs else None
            if runs and (inputs is not None or spec.input_kind != "dataset"):
                fits = _input_problems(self, spec, inputs)
                problems += fits
                if fits:
                    inputs = None
            if spec.check is not None:
                problems += spec.check(self, inputs)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _order_problems(phases: list[str]) -> list[str]:
    names = [s.name for s in table.ordered()]
    done = table.implemented()
    problems = []
    unknown = [p for p in phases if p not in table.PHASES]
    if unknown:
        problems.append(f"phases: unknown phase(s) {unknown}; known: {names}")
    missing = [p for p in phases if p in table.PHASES and p not in done]
    if missing:
        problems.append(f"phases: {missing} not implemented in this version (implemented: {done})")
    if not phases:
        problems.append("phases: at least one phase must run")
    if len(set(phases)) != len(phases):
        problems.append("phases: a phase is listed twice")
    known = [p for p in phases if p in table.PHASES]
    if known != sorted(known, key=lambda p: table.PHASES[p].order):
        problems.append(f"phases: must be in pipeline order {names}")
    return problems


def _input_problems(cfg, spec: table.PhaseSpec, inputs: list[str] | None) -> list[str]:
    """Does what the phase before ``spec`` produces (``inputs``: its model names; None: ``spec`` runs first,
    on the one imported ``input`` model) fit what ``spec`` takes?"""
    i = cfg.phases.index(spec.name)
    before, made = (cfg.phases[i - 1], table.PHASES[cfg.phases[i - 1]].output_kind) if i > 0 else ("input", "model")
    if inputs is None:
        if spec.input_kind == "model-set":
            inputs = ["model"]
        else:
            return []  # one imported model: nothing to choose (the task checks a named choice against it)
    if spec.input_kind == "model-set":
        if made != "model-set":
            producers = [s.name for s in table.ordered() if s.implemented and s.output_kind == "model-set"]
            who = " or ".join(producers)
            return [f"phases: {spec.name} {spec.verb}s the models {who} makes, so {who} must run right before it "
                    "(existing Hugging Face models: cognate.source=pretrained with cognate.base_models)"]
        return []
    if spec.takes:
        wanted = getattr(getattr(cfg, spec.section), spec.takes)
        if len(inputs) > 1 and wanted not in inputs:
            return [f"{spec.section}.{spec.takes}: {before} produces {inputs}; name the one to {spec.verb} "
                    f"(got {wanted!r})"]
        if len(inputs) == 1 and wanted not in (None, inputs[0]):
            return [f"{spec.section}.{spec.takes}: {before} produces one model, {inputs[0]!r}; leave "
                    f"{spec.takes} unset (got {wanted!r})"]
        return []
    if len(inputs) > 1:
        mergers = [s.name for s in table.ordered() if s.implemented and s.input_kind == "model-set"]
        choosers = [f"{s.name} with {s.section}.{s.takes}" for s in table.ordered() if s.implemented and s.takes]
        return [f"phases: {spec.name} {spec.verb}s one model, but {before} produces {inputs}; run "
                f"{' or '.join(mergers)} (or {' or '.join(choosers)}) between them"]
    return []


_AFTER_PHASES = {
    "store": (StoreConfig, Field(default_factory=StoreConfig, description="Artifact store.")),
    "tracking": (TrackingConfig, Field(default_factory=TrackingConfig, description="MLflow tracking.")),
    "device": (DeviceConfig, Field(default_factory=DeviceConfig, description="Device and precision.")),
    "runner": (RunnerConfig, Field(default_factory=RunnerConfig, description="Task runner for mapped work.")),
    "final_test_eval": (bool, Field(
        True, description="After the last phase, evaluate each of its models on the test split (mapped tasks).")),
}


def _sections() -> dict:
    """The phase sections of the table, in pipeline order, then the sections that follow them."""
    fields = {}
    for spec in table.ordered():
        if spec.section and spec.config is not None:
            fields[spec.section] = (spec.config, Field(default_factory=spec.config,
                                                       description=f"Phase {spec.order}: {spec.title}."))
    return {**fields, **_AFTER_PHASES}


ForgeConfig = create_model("ForgeConfig", __base__=_Pipeline, __module__=__name__, **_sections())
ForgeConfig.__doc__ = _Pipeline.__doc__
