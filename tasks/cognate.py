"""Prefect task for phase 1, Cognate: trunk + N variants (or pretrained models), stored as a `model-set`.

Output prefix: one Hugging Face model folder per model (``trunk/``, ``<variant>/`` or ``base/``,
``model-0/``...; safetensors weights, config.json, tokenizer), ``loss_curve.png``, ``phase.json``,
``report.md`` and ``manifest.json`` (last).
"""

from __future__ import annotations

from pathlib import Path

from forge_models import cognate
from forge_models.data import Corpus
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer
from tasks.cache import folder_digest, phase_key
from tasks.config import ForgeConfig
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, loss_curve_png, metrics_table, phase_task
from tasks.store import ArtifactRef

COGNATE_VERSION = "1"
EVAL_COLUMNS = [*HEADLINE_METRICS[:2], "unigram_gain", *HEADLINE_METRICS[2:], "refine_steps"]


def cognate_key(config: ForgeConfig, dataset: ArtifactRef, _previous: ArtifactRef | None = None) -> str:
    section = {
        "cognate": config.cognate.model_dump(mode="json"),
        "eval": config.eval.model_dump(mode="json"),
        "seed": config.seed,
        "precision": config.device.precision,
    }
    import json

    extra = [dataset.digest]
    if config.cognate.source == "pretrained":
        extra += [folder_digest(p) for p in config.cognate.base_models]
        if config.cognate.common_base:
            extra.append(folder_digest(config.cognate.common_base))
    return phase_key("cognate", COGNATE_VERSION, json.dumps(section, sort_keys=True), extra, dataset.digest)


def _body(config: ForgeConfig, _previous: ArtifactRef | None = None):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        dataset = inputs[0]
        corpus = Corpus.load(dataset / "corpus")
        tokenizer = load_tokenizer(dataset / "tokenizer")
        out = cognate.run(cognate.CognateInputs(corpus=corpus, tokenizer=tokenizer, eval_cfg=config.eval), config.cognate, ctx)
        for name, model in out.models.items():
            model.save_pretrained(out_dir / name)
            tokenizer.save_pretrained(out_dir / name)
        if out.curves:
            loss_curve_png(out.curves, out_dir / "loss_curve.png", "Cognate training loss")
        params = out.details.get("params", {})
        report = _report(config, out, params)
        return PhaseWritten(
            metrics=out.metrics,
            report_md=report,
            params=max(params.values()) if params else None,
            steps_run=int(out.details.get("steps_run", 0)),
            curves=out.curves,
            details=out.details,
        )

    return body


def _report(config: ForgeConfig, out, params: dict) -> str:
    lines = [
        "# Phase 1: Cognate",
        "",
        f"Route: **{config.cognate.source}**. Held-out split: **{config.eval.split}** "
        f"(never trained on). Unigram baseline loss: {out.details.get('unigram_loss', float('nan')):.4f} nats/token.",
        "",
        metrics_table(out.evaluations, EVAL_COLUMNS),
        "",
    ]
    if params:
        lines += ["| model | parameters (exact) | tokens/s (training) | settings |", "|---|---|---|---|"]
        settings = out.details.get("settings", {})
        for name, n in params.items():
            tps = out.metrics.get(f"{name}/tokens_per_s")
            lines.append(f"| {name} | {n:,} | {tps:,.0f} | {settings.get(name, '')} |" if tps else f"| {name} | {n:,} | - | {settings.get(name, '')} |")
    return "\n".join(lines) + "\n"


cognate_task = phase_task(
    "cognate", kind="model-set", key=cognate_key, body=_body, section="cognate", takes_previous=False,
    doc="Train (or reuse) the Cognate trunk and variants, or evaluate and pass on pretrained models.",
)
