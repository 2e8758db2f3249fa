"""The phase table: one declaration per phase, the single place that says what the pipeline is made of.

Config validation (`tasks.config.ForgeConfig`), the flow (`flows.agent_forge`), the CLI (`forge phase NAME`,
`forge phase --help`, `forge config`), the deployments and the docs read this table; none of them names a
phase. Adding a phase is: a package in ``forge_models/``, a task module in ``tasks/`` (use
``tasks.runtime.phase_task``), one :class:`PhaseSpec` in :data:`PHASES` (or :func:`register` it), and a line
in the presets. A phase without ``task`` is declared but not implemented: validation refuses it by name.

Kinds of what flows between phases: ``dataset`` (corpus + tokenizer, made by the data step), ``model-set``
(several named model folders) and ``model`` (one model folder).
"""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel

from forge_models.baking.config import BakingConfig
from forge_models.bitnet.config import BitNetConfig
from forge_models.compression.phase import CompressionConfig
from forge_models.config import CognateConfig
from forge_models.evomerge.config import EvoMergeConfig
from forge_models.experts.config import ExpertsConfig
from forge_models.quietstar.config import QuietStarConfig
from forge_models.training.config import TrainingConfig

Kind = Literal["dataset", "model-set", "model"]

__all__ = ["Kind", "PhaseSpec", "PHASES", "register", "phase", "ordered", "implemented", "phase_help",
           "pipeline_line", "previous_outputs"]


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of the pipeline.

    Attributes:
        name: the name used in ``phases: [...]``, store prefixes and ``forge phase NAME``.
        order: position in the fixed pipeline order (phases run in increasing order).
        title: one line for help texts and reports.
        verb: what it does to its input, for messages ("ternarise").
        section: the ForgeConfig field holding its config (None: it has no config).
        config: the frozen pydantic class of that section.
        input_kind / output_kind: what it takes and what it stores (see the module docstring).
        task: ``"module:attribute"`` of the Prefect task (or sub-flow) that runs it; None: not implemented.
            A task is called ``task(config, dataset=..., [previous=...,] parent_run_id=...)`` and returns a
            `PhaseResult`; a sub-flow gets the same arguments and runs on ``config.runner``.
        outputs: the names of its output models, given the ForgeConfig.
        takes: for a one-model phase, the field of its section naming which model of a multi-model input it
            takes (None: it cannot choose, so a multi-model input is refused).
        check: phase-specific consistency problems, given the config and the output names of the phase
            before it (None when it runs first or not at all).
        standalone: the ``--set`` overrides of ``forge phase NAME --input ...`` (input folders, base folders).
    """

    name: str
    order: int
    title: str
    verb: str
    input_kind: Kind
    output_kind: Kind
    section: str | None = None
    config: type[BaseModel] | None = None
    task: str | None = None
    outputs: Callable[[Any], list[str]] = lambda cfg: ["model"]
    takes: str | None = None
    check: Callable[[Any, list[str] | None], list[str]] | None = None
    standalone: Callable[[list[str], list[str]], list[str]] | None = None

    @property
    def implemented(self) -> bool:
        return self.task is not None

    def load(self):
        """The Prefect task or sub-flow object named by ``task`` (imported on first use)."""
        if self.task is None:
            raise LookupError(f"phase {self.name!r} is not implemented in this version")
        module, attr = self.task.split(":", 1)
        return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------------ per-phase rules


def cognate_outputs(cfg) -> list[str]:
    c = cfg.cognate
    if c.source == "scratch":
        return ["trunk"] + [v.name for v in c.variants]
    return ([f"model-{i}" for i in range(len(c.base_models))] + (["base"] if c.common_base else [])
            + [s.name for s in c.siblings])


def _cognate_check(cfg, _inputs: list[str] | None) -> list[str]:
    problems = []
    if cfg.cognate.source == "pretrained" and cfg.data.tokenizer.kind != "pretrained":
        problems.append(
            "cognate.source 'pretrained' needs data.tokenizer.kind 'pretrained' with data.tokenizer.path "
            "set to the base model's folder (the models must share the base model's vocabulary)"
        )
    if cfg.cognate.source == "scratch" and cfg.cognate.arch.max_position_embeddings < cfg.eval.seq_len:
        problems.append(
            f"eval.seq_len ({cfg.eval.seq_len}) exceeds cognate.arch.max_position_embeddings "
            f"({cfg.cognate.arch.max_position_embeddings})"
        )
    return problems


def _evomerge_check(cfg, inputs: list[str] | None) -> list[str]:
    if inputs is None:
        return []
    problems = []
    em = cfg.evomerge
    if em.base_model is not None and em.base_model not in inputs:
        problems.append(f"evomerge.base_model: cognate produces {inputs}; {em.base_model!r} is not one "
                        f"of them (the scratch route's base is 'trunk', the pretrained route's 'base')")
    merged = em.models if em.models is not None else [n for n in inputs if n != em.base_model]
    unknown = [m for m in merged if m not in inputs]
    if unknown:
        problems.append(f"evomerge.models: {unknown} are not produced by cognate ({inputs})")
    elif em.base_model in merged:
        problems.append(f"evomerge.models: the base model {em.base_model!r} cannot also be merged")
    elif len(merged) < 2:
        problems.append(f"evomerge: needs at least two models to merge besides the base; cognate produces "
                        f"{inputs} (add variants, or siblings on the pretrained route)")
    if em.strategy == "cmaes" and em.cmaes_method == "slerp" and len(merged) != 2:
        problems.append("evomerge.cmaes_method: slerp merges exactly two models")
    return problems


def _baking_check(cfg, _inputs: list[str] | None) -> list[str]:
    if "baking" in cfg.phases and not cfg.baking.prompts:
        return ["baking.prompts: name at least one prompt to bake (forge phase baking --prompt FILE, or "
                "baking.prompts=[{name: ..., text: ...}])"]
    return []


def _pretrained_route(folders: list[str]) -> list[str]:
    return [
        "cognate.source=pretrained",
        "cognate.base_models=" + json.dumps(folders),
        "cognate.variants=[]",
        "data.tokenizer.kind=pretrained",
        f"data.tokenizer.path={json.dumps(folders[0])}",
    ]


def _cognate_standalone(folders: list[str], _base: list[str]) -> list[str]:
    # No input: train from scratch; inputs: the pretrained route evaluates and passes them on.
    return ["phases=[cognate]"] + (_pretrained_route(folders) if folders else [])


def _evomerge_standalone(folders: list[str], base: list[str]) -> list[str]:
    # The pretrained Cognate route imports and evaluates the inputs, then the search runs: exactly what a
    # pipeline with cognate.source=pretrained does.
    sets = ["phases=[cognate, evomerge]", *_pretrained_route(folders), "evomerge.models=null"]
    if base:
        return sets + [f"cognate.common_base={json.dumps(base[0])}", "evomerge.base_model=base"]
    return sets + ["evomerge.base_model=null"]


def one_model_standalone(name: str, takes: str | None = None):
    """``forge phase NAME --input DIR`` for a phase that takes one model: import DIR, then run NAME."""

    def sets(folders: list[str], _base: list[str]) -> list[str]:
        out = [f"phases=[{name}]", f"input={json.dumps(folders[0])}", "data.tokenizer.kind=pretrained",
               f"data.tokenizer.path={json.dumps(folders[0])}"]
        return out + ([f"{takes}=null"] if takes else [])  # the imported folder is the only model

    return sets


# ------------------------------------------------------------------------------ the table


PHASES: dict[str, PhaseSpec] = {
    s.name: s
    for s in (
        PhaseSpec(
            name="cognate", order=1, title="Cognate: pretrain a trunk and variants (or import pretrained models)",
            verb="pretrain", input_kind="dataset", output_kind="model-set", section="cognate", config=CognateConfig,
            task="tasks.cognate:cognate_task", outputs=cognate_outputs, check=_cognate_check,
            standalone=_cognate_standalone,
        ),
        PhaseSpec(
            name="evomerge", order=2, title="EvoMerge: evolve merge recipes of several models, keep the best",
            verb="merge", input_kind="model-set", output_kind="model", section="evomerge", config=EvoMergeConfig,
            task="flows.evomerge:evomerge_flow", outputs=lambda cfg: ["merged"], check=_evomerge_check,
            standalone=_evomerge_standalone,
        ),
        PhaseSpec(
            name="quietstar", order=3, title="Quiet-STaR: learn to think before each token", verb="train",
            input_kind="model", output_kind="model", section="quietstar", config=QuietStarConfig,
            task="tasks.quietstar:quietstar_task", takes="input_model",
            standalone=one_model_standalone("quietstar", "quietstar.input_model"),
        ),
        PhaseSpec(
            name="bitnet", order=4, title="BitNet b1.58: ternarise one model, fine-tune, store packed",
            verb="ternarise", input_kind="model", output_kind="model", section="bitnet", config=BitNetConfig,
            task="tasks.bitnet:bitnet_task", takes="input_model",
            standalone=one_model_standalone("bitnet", "bitnet.input_model"),
        ),
        PhaseSpec(
            name="training", order=5, title="Forge training loop: Grokfast, curriculum, dreams, self-model",
            verb="train", input_kind="model", output_kind="model", section="training", config=TrainingConfig,
            task="tasks.training:training_task", standalone=one_model_standalone("training"),
        ),
        PhaseSpec(
            name="baking", order=6, title="Prompt baking: tools and persona into the weights", verb="bake",
            input_kind="model", output_kind="model", section="baking", config=BakingConfig,
            task="tasks.baking:baking_task", takes="input_model", check=_baking_check,
            standalone=one_model_standalone("baking", "baking.input_model"),
        ),
        PhaseSpec(
            name="experts", order=7, title="SVF expert vectors (Transformer^2) and ADAS", verb="specialise",
            input_kind="model", output_kind="model", section="experts", config=ExpertsConfig,
            task="tasks.experts:experts_task", takes="input_model",
            standalone=one_model_standalone("experts", "experts.input_model"),
        ),
        PhaseSpec(
            name="compression", order=8,
            title="Final compression: each tensor in its best encoding under a byte budget, one loadable folder",
            verb="compress", input_kind="model", output_kind="model", section="compression",
            config=CompressionConfig, task="tasks.compression:compression_task",
            standalone=one_model_standalone("compression"),
        ),
    )
}
"""Every phase, implemented or not, by name."""


def register(spec: PhaseSpec) -> None:
    """Add (or replace) a phase. ForgeConfig sections are built from the table at import, so a phase with a
    config section must be in the table before ``tasks.config`` is imported; one without can come later."""
    if spec.order in {s.order for s in PHASES.values() if s.name != spec.name}:
        raise ValueError(f"phase {spec.name!r}: order {spec.order} is taken")
    PHASES[spec.name] = spec


@contextmanager
def registered(spec: PhaseSpec) -> Iterator[PhaseSpec]:
    """Register ``spec`` for the duration of a block (tests, plug-ins)."""
    saved = PHASES.get(spec.name)
    register(spec)
    try:
        yield spec
    finally:
        if saved is None:
            PHASES.pop(spec.name, None)
        else:
            PHASES[spec.name] = saved


def ordered() -> list[PhaseSpec]:
    """All phases in pipeline order."""
    return sorted(PHASES.values(), key=lambda s: s.order)


def implemented() -> list[str]:
    return [s.name for s in ordered() if s.implemented]


def phase(name: str) -> PhaseSpec:
    try:
        return PHASES[name]
    except KeyError:
        raise LookupError(f"unknown phase {name!r}; known: {[s.name for s in ordered()]}") from None


def previous_outputs(cfg, name: str) -> list[str] | None:
    """Output model names of the phase that runs right before ``name`` in ``cfg.phases`` (None if first)."""
    i = cfg.phases.index(name)
    return PHASES[cfg.phases[i - 1]].outputs(cfg) if i > 0 else None


def phase_help() -> str:
    """One line per phase, in order, with its state: the epilog of ``forge phase --help``."""
    lines = ["phases (in pipeline order):"]
    for s in ordered():
        state = "implemented" if s.implemented else "not implemented yet"
        lines.append(f"  {s.order}. {s.name:<12} {s.input_kind:>9} -> {s.output_kind:<9}  {state}: {s.title}")
    return "\n".join(lines)


def pipeline_line(phases: list[str]) -> str:
    return " -> ".join(phases)


def docs_index() -> str:
    """``docs/phases/README.md``: the table as the docs show it (a test keeps the file equal to this)."""
    rows = [
        f"| {s.order} | {f'[{s.name}]({s.name}.md)' if s.implemented else s.name} | {s.title} | {s.input_kind} | "
        f"{s.output_kind} | {f'`{s.section}`' if s.section else '-'} | {'implemented' if s.implemented else 'not yet'} |"
        for s in ordered()
    ]
    return "\n".join([
        "# Phases",
        "",
        "Generated from the phase table (`tasks/phases.py`; regenerate with "
        "`python -c \"from tasks.phases import write_docs_index; write_docs_index()\"`). Each implemented phase's "
        "page gives its method, its deviations from the paper and its measured figures.",
        "",
        "| # | phase | what it does | takes | makes | config section | state |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def write_docs_index(path: str = "docs/phases/README.md") -> None:
    from pathlib import Path

    Path(path).write_text(docs_index())
