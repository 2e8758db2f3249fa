"""Prefect task for phase 5, the Forge training loop: train the previous phase's model through ten stages.

Input: the one model of the previous phase's artifact. A BitNet artifact (``model/`` with ``model/latent/``)
is rebuilt from its latent weights (``forge_models.bitnet.load_latent``), so training goes through the
quantised forward pass and keeps the model ternary; anything else is loaded as a Hugging Face causal LM.

Output prefix: ``model/`` (a BitNet input is stored packed again, with its new latent weights in
``model/latent/``; a full-precision input as a plain Hugging Face folder), ``loss_curve.png``,
``curriculum.png``, ``phase.json``, ``report.md`` and ``manifest.json`` (last). An input carrying Quiet-STaR's
files (``quietstar.json``, ``quietstar_head.safetensors``) gets them copied into ``model/`` and re-measured with
vs without thoughts on the stored model, reloaded (``tasks.thoughts``); the loop does not train the thoughts.
"""

from __future__ import annotations

import json
from pathlib import Path

from forge_models.runtime import PhaseContext
from tasks.cache import phase_key
from tasks.inputs import input_model_folder, load_input_model
from forge_models.eval import difference_lines
from tasks.config import ForgeConfig
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, loss_curve_png, metrics_table, phase_task
from tasks.store import ArtifactRef
from tasks import thoughts

TRAINING_VERSION = "2"  # 2: Quiet-STaR files carried and re-measured
EVAL_COLUMNS = list(HEADLINE_METRICS)


def training_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"training": config.training.model_dump(mode="json"), "eval": config.eval.model_dump(mode="json"),
                          "packing": config.bitnet.packing, "seed": config.seed, "precision": config.device.precision,
                          "thoughts": thoughts.key_section(config)}, sort_keys=True)
    return phase_key("training", TRAINING_VERSION, section, [previous.digest], dataset.digest)


def _curriculum_png(curves: dict, path: Path, band: tuple[float, float]) -> bool:
    success, difficulty = curves.get("curriculum/success") or [], curves.get("curriculum/difficulty") or []
    if not success:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhspan(*band, color="tab:green", alpha=0.15, label=f"target band {band[0]:.2f}-{band[1]:.2f}")
    ax.plot(*zip(*success), marker=".", label="held-out success (fresh tasks)")
    if difficulty:
        ax.plot(*zip(*difficulty), label="difficulty")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1.05)
    ax.set_title("Edge-of-chaos curriculum")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)

        from forge_models import bitnet, training
        from forge_models.data import Corpus
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, None, previous.uri, None)
        model, latent_meta = load_input_model(folder)
        tokenizer = load_tokenizer(folder)
        thought_meta = thoughts.input_thoughts(folder, tokenizer, model)  # refused here, before any compute
        corpus = Corpus.load(dataset_dir / "corpus")
        out = training.run(training.TrainingInputs(model=model, tokenizer=tokenizer, corpus=corpus, eval_cfg=config.eval),
                           config.training, ctx)
        trained = out.models["model"]
        if latent_meta is not None:
            bitnet.export_packed(trained, out_dir / "model", tokenizer=tokenizer, packing=config.bitnet.packing)
            bitnet.save_latent(trained, out_dir / "model" / bitnet.LATENT_DIR,
                               keep_patterns=latent_meta["keep_patterns"], act_norm=latent_meta["act_norm"])
        else:
            trained.save_pretrained(out_dir / "model")
            tokenizer.save_pretrained(out_dir / "model")
        metrics, thought_lines = dict(out.metrics), []
        if thought_meta is not None:
            from forge_models.quietstar import copy_thoughts

            copy_thoughts(folder, out_dir / "model")
            stored = thoughts.reload_stored(out_dir / "model", ctx.device)  # what is stored is what is measured
            found, thought_lines = thoughts.remeasure(
                out_dir / "model", stored, tokenizer, corpus.split(config.eval.split), config, ctx,
                "trained (packed BitNet)" if latent_meta is not None else "trained")
            metrics.update(found)
        if out.curves.get("train/loss"):
            loss_curve_png({"train/loss": out.curves["train/loss"], "check/val_loss": out.curves.get("check/val_loss", [])},
                           out_dir / "loss_curve.png", f"Forge training loop on {name}")
        _curriculum_png(out.curves, out_dir / "curriculum.png",
                        (config.training.curriculum.band_low, config.training.curriculum.band_high))
        stages = out.details.get("stages", [])
        rows = [
            f"| {s['index']} | {s['name']} | {s['group']} | {s['steps']}/{s['budget']} | {s['exit_criterion']} | "
            f"**{s['ended_by']}** | {s.get('exit_reason', '')} | {s['seconds']:.1f} |"
            for s in stages
        ]
        m = out.metrics
        lines = [
            "# Phase 5: the Forge training loop",
            "",
            f"Input: `{previous.uri}/{name}`" + (" (BitNet: trained through the quantised forward pass, latent "
                                                   "weights updated, stored packed)" if latent_meta else "")
            + f". Held-out split: **{config.eval.split}**. Grokfast: "
            + (f"{config.training.grokfast.kind} (alpha {config.training.grokfast.alpha}, lambda "
               f"{config.training.grokfast.lamb})" if config.training.grokfast.enabled else "off") + ".",
            "",
            metrics_table(out.evaluations, EVAL_COLUMNS),
            "", *difference_lines(out.evaluations["after"]["model"], "after - before"), "",
            "| # | stage | group | steps / budget | exit criterion | ended by | why | seconds |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Dreams: {int(m.get('dream/cycles', 0))} cycles, {int(m.get('dream/kept', 0))} of "
            f"{int(m.get('dream/generated', 0))} samples kept and replayed. Curriculum: in the band "
            f"{m.get('curriculum/in_band_fraction', float('nan')):.0%} of checks, final difficulty "
            f"{m.get('curriculum/final_difficulty', float('nan')):.3f}. Self-model head loss "
            f"{m.get('self_model/loss', float('nan')):.3f} vs {m.get('self_model/copy_loss', float('nan')):.3f} for "
            f"copying its input (the head is not exported). Rollbacks: {int(m.get('rollbacks', 0))}.",
        ]
        for rb in out.details.get("rollbacks", []):
            lines.append(f"- rollback: {rb}")
        lines += thought_lines
        return PhaseWritten(
            metrics=metrics, report_md="\n".join(lines) + "\n", steps_run=int(out.details.get("steps_run", 0)),
            curves=out.curves, details={k: v for k, v in out.details.items() if k in ("stages", "rollbacks", "dreams")},
            tables={"stages.json": [{k: v for k, v in s.items() if not isinstance(v, dict)} for s in stages]},
        )

    return body


training_task = phase_task(
    "training", kind="model", key=training_key, body=_body, section="training",
    doc="Train (or reuse) the previous phase's model with the Forge loop.",
)
