"""`ForgeConfig`: the whole pipeline's configuration, presets and command-line overrides.

The same frozen pydantic class is the `forge` CLI schema, the Prefect UI form (the flow's single
parameter) and, section by section, part of every phase's cache key. Presets are YAML files shipped in
`flows/presets/`; `--config FILE` and repeated `--set section.field=value` override them.

    from flows.config import load_config
    cfg = load_config(preset="tiny", overrides=["cognate.trunk.steps=50"])
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forge_models.bitnet.config import BitNetConfig
from forge_models.config import CognateConfig, DataConfig, EvalConfig
from forge_models.evomerge.config import EvoMergeConfig
from forge_models.training.config import TrainingConfig

PHASE_ORDER = ("cognate", "evomerge", "quietstar", "bitnet", "training", "baking", "experts", "compression")
"""The eight phases, in pipeline order."""

IMPLEMENTED_PHASES = ("cognate", "evomerge", "bitnet", "training")
"""Phases this version can run; the others are refused by validation with a pointer to their issue."""

PRESETS = ("tiny", "small", "full")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class StoreConfig(_Frozen):
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


class TrackingConfig(_Frozen):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log runs, metrics and artifacts to MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else a SQLite file under the local "
        "store (or ./forge-mlflow/mlflow.db when the store is remote).",
    )
    experiment: str | None = Field(None, description="Experiment name; None: the pipeline name.")


class DeviceConfig(_Frozen):
    """Explicit device and precision."""

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$", description="auto (cuda when present), cpu, cuda, cuda:N."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it (AVX-512 BF16 CPUs, CUDA), else fp32."
    )
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads (None: torch's default).")


class RunnerConfig(_Frozen):
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


class ForgeConfig(_Frozen):
    """The whole Agent Forge pipeline: which phases run, on what data, where results go."""

    name: str = Field(
        "agent-forge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Pipeline name (MLflow experiment)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Run seed; every phase derives its generators from it.")
    phases: list[str] = Field(
        default_factory=lambda: ["cognate"],
        description=f"Phases to run, in pipeline order, from {list(PHASE_ORDER)}.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus, splits and tokenizer.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="The held-out evaluation harness.")
    input: str | None = Field(
        None,
        description="Hugging Face model folder fed to the first phase when the pipeline does not start with "
        "cognate (e.g. phases [bitnet]); its tokenizer must be the data tokenizer.",
    )
    cognate: CognateConfig = Field(default_factory=CognateConfig, description="Phase 1: Cognate pretraining.")
    evomerge: EvoMergeConfig = Field(default_factory=EvoMergeConfig, description="Phase 2: evolutionary model merging.")
    bitnet: BitNetConfig = Field(default_factory=BitNetConfig, description="Phase 4: BitNet b1.58 ternarisation.")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Phase 5: the Forge training loop (ten stages, curriculum, dreams)."
    )
    store: StoreConfig = Field(default_factory=StoreConfig, description="Artifact store.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    device: DeviceConfig = Field(default_factory=DeviceConfig, description="Device and precision.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Task runner for mapped work.")
    final_test_eval: bool = Field(
        True, description="After the last phase, evaluate each of its models on the test split (mapped tasks)."
    )

    @model_validator(mode="after")
    def _check(self) -> "ForgeConfig":
        problems = []
        unknown = [p for p in self.phases if p not in PHASE_ORDER]
        if unknown:
            problems.append(f"phases: unknown phase(s) {unknown}; known: {list(PHASE_ORDER)}")
        missing = [p for p in self.phases if p in PHASE_ORDER and p not in IMPLEMENTED_PHASES]
        if missing:
            problems.append(
                f"phases: {missing} not implemented in this version (implemented: {list(IMPLEMENTED_PHASES)})"
            )
        if not self.phases:
            problems.append("phases: at least one phase must run")
        if len(set(self.phases)) != len(self.phases):
            problems.append("phases: a phase is listed twice")
        known = [p for p in self.phases if p in PHASE_ORDER]
        if known != sorted(known, key=PHASE_ORDER.index):
            problems.append(f"phases: must be in pipeline order {list(PHASE_ORDER)}")
        if self.cognate.source == "pretrained" and self.data.tokenizer.kind != "pretrained":
            problems.append(
                "cognate.source 'pretrained' needs data.tokenizer.kind 'pretrained' with data.tokenizer.path "
                "set to the base model's folder (the models must share the base model's vocabulary)"
            )
        if self.cognate.source == "scratch" and self.cognate.arch.max_position_embeddings < self.eval.seq_len:
            problems.append(
                f"eval.seq_len ({self.eval.seq_len}) exceeds cognate.arch.max_position_embeddings "
                f"({self.cognate.arch.max_position_embeddings})"
            )
        first = self.phases[0] if self.phases else None
        if first and first != "cognate" and not self.input:
            problems.append(
                f"input: the pipeline starts at {first!r}, so it needs an input model folder "
                f"(set input, or use: forge phase {first} --input DIR)"
            )
        if self.input and first == "cognate":
            problems.append("input: only used when the pipeline does not start with cognate (use cognate.base_models)")
        if self.input and self.data.tokenizer.kind != "pretrained":
            problems.append(
                "data.tokenizer: an input model brings its own vocabulary; set data.tokenizer.kind=pretrained and "
                "data.tokenizer.path to the input folder"
            )
        cognate_names = (["trunk"] + [v.name for v in self.cognate.variants]) if self.cognate.source == "scratch" else (
            [f"model-{i}" for i in range(len(self.cognate.base_models))] + (["base"] if self.cognate.common_base else []))
        if "evomerge" in self.phases:
            if self.phases[0] == "evomerge" or self.phases[self.phases.index("evomerge") - 1] != "cognate":
                problems.append("phases: evomerge merges the models cognate makes, so cognate must run right before it "
                                "(existing Hugging Face models: cognate.source=pretrained with cognate.base_models)")
            else:
                em = self.evomerge
                if em.base_model is not None and em.base_model not in cognate_names:
                    problems.append(f"evomerge.base_model: cognate produces {cognate_names}; {em.base_model!r} is not one "
                                    f"of them (the scratch route's base is 'trunk', the pretrained route's 'base')")
                merged = em.models if em.models is not None else [n for n in cognate_names if n != em.base_model]
                unknown = [m for m in merged if m not in cognate_names]
                if unknown:
                    problems.append(f"evomerge.models: {unknown} are not produced by cognate ({cognate_names})")
                elif em.base_model in merged:
                    problems.append(f"evomerge.models: the base model {em.base_model!r} cannot also be merged")
                elif len(merged) < 2:
                    problems.append(f"evomerge: needs at least two models to merge besides the base; cognate produces "
                                    f"{cognate_names} (add variants)")
                if em.strategy == "cmaes" and em.cmaes_method == "slerp" and len(merged) != 2:
                    problems.append("evomerge.cmaes_method: slerp merges exactly two models")
        if "bitnet" in self.phases and self.phases.index("bitnet") > 0:
            before = self.phases[self.phases.index("bitnet") - 1]
            if before == "cognate" and len(cognate_names) > 1 and self.bitnet.input_model not in cognate_names:
                problems.append(
                    f"bitnet.input_model: cognate produces {cognate_names}; name the one to ternarise "
                    f"(got {self.bitnet.input_model!r})"
                )
            if before == "evomerge" and self.bitnet.input_model not in (None, "merged"):
                problems.append(f"bitnet.input_model: evomerge produces one model, 'merged'; leave input_model unset "
                                f"(got {self.bitnet.input_model!r})")
        if "training" in self.phases and self.phases.index("training") > 0:
            before = self.phases[self.phases.index("training") - 1]
            if before == "cognate" and len(cognate_names) > 1:
                problems.append(f"phases: training trains one model, but cognate produces {cognate_names}; run "
                                f"evomerge (or bitnet with bitnet.input_model) between them")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def section_json(self, name: str) -> str:
        """Canonical JSON of one section (part of cache keys)."""
        return getattr(self, name).model_dump_json()


class ConfigProblems(Exception):
    """Every problem of a config at once, each naming its field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        if "input" in e and e["type"] not in ("extra_forbidden", "missing") and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        out.append(f"{loc}: {msg}")
    return out


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset."""
    if name not in PRESETS:
        raise ConfigProblems([f"preset: unknown preset {name!r}; choose from {list(PRESETS)}"])
    text = resources.files("flows").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``a.b.c=value`` strings into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    problems = []
    for item in items:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected section.field=value")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(f"--set {item!r}: empty key")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"--set {key}: cannot parse value {raw!r}: {exc}")
            continue
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"--set {key}: {p} is set both as a value and as a section")
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def load_config(
    preset: str | None = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    store: str | None = None,
) -> ForgeConfig:
    """Preset, then config file, then ``--set`` overrides, then ``--store``; every problem reported at once.

    Raises:
        ConfigProblems: listing each bad field (unknown key, wrong type, out of range, contradiction).
    """
    problems: list[str] = []
    raw: dict[str, Any] = preset_dict(preset) if preset else {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigProblems([f"--config: no such file {str(path)!r}"])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigProblems([f"--config {path}: not valid YAML: {exc}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigProblems([f"--config {path}: the top level must be a mapping"])
        raw = deep_merge(raw, loaded)
    tree, set_problems = parse_set(overrides or [])
    problems += set_problems
    raw = deep_merge(raw, tree)
    if store:
        raw = deep_merge(raw, {"store": {"url": store}})
    try:
        cfg = ForgeConfig.model_validate(raw)
    except ValidationError as err:
        problems += format_validation_error(err)
        cfg = None
    if problems:
        raise ConfigProblems(problems)
    return cfg
