"""Prefect task for phase 4, BitNet b1.58: ternarise the previous phase's model, fine-tune, store packed.

Output prefix: ``model/`` — the packed model as a Hugging Face folder (2-bit weights in transformers'
BitNet layout plus ``quantization_config``, so ``AutoModelForCausalLM.from_pretrained`` loads it; or the
denser base-3 packing, loadable with ``forge_models.bitnet.load_packed``) with ``model/latent/``, the
latent fp32 weights the training phase continues from (``forge_models.bitnet.load_latent``), ``qat_curve.png``,
``phase.json``, ``report.md`` and ``manifest.json`` (last). An input carrying Quiet-STaR's files
(``quietstar.json``, ``quietstar_head.safetensors``) gets them copied into ``model/`` and re-measured with vs
without thoughts on the stored packed model (``tasks.thoughts``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from forge_models.runtime import PhaseContext
from tasks import runtime as rt
from tasks.cache import phase_key
from tasks.inputs import input_model_folder
from forge_models.eval import difference_lines
from tasks.config import ForgeConfig
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, loss_curve_png, metrics_table, phase_task
from tasks.store import ArtifactRef
from tasks import thoughts

BITNET_VERSION = "3"  # 2: the latent weights are stored too; 3: Quiet-STaR files carried and re-measured
EVAL_COLUMNS = list(HEADLINE_METRICS)


def bitnet_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"bitnet": config.bitnet.model_dump(mode="json"), "eval": config.eval.model_dump(mode="json"),
                          "seed": config.seed, "precision": config.device.precision,
                          "thoughts": thoughts.key_section(config)}, sort_keys=True)
    return phase_key("bitnet", BITNET_VERSION, section, [previous.digest], dataset.digest)


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)
        from transformers import AutoModelForCausalLM

        from forge_models import bitnet
        from forge_models.data import Corpus
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, config.bitnet.input_model, previous.uri, "bitnet.input_model")
        with rt.MODEL_LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = load_tokenizer(folder)
        thought_meta = thoughts.input_thoughts(folder, tokenizer, model)  # refused here, before any compute
        corpus = Corpus.load(dataset_dir / "corpus")
        out = bitnet.run(
            bitnet.BitNetInputs(model=model, tokenizer=tokenizer, corpus=corpus, eval_cfg=config.eval,
                                export_dir=out_dir / "model"),
            config.bitnet, ctx,
        )
        # What later training phases continue from: the latent weights behind the packed ternary ones.
        bitnet.save_latent(out.models["model"], out_dir / "model" / bitnet.LATENT_DIR,
                           keep_patterns=config.bitnet.keep_patterns, act_norm=config.bitnet.act_norm)
        metrics, thought_lines = dict(out.metrics), []
        if thought_meta is not None:
            from forge_models.quietstar import copy_thoughts

            copy_thoughts(folder, out_dir / "model")
            stored = thoughts.reload_stored(out_dir / "model", ctx.device)  # the packed folder: what is measured
            found, thought_lines = thoughts.remeasure(out_dir / "model", stored, tokenizer,
                                                      corpus.split(config.eval.split), config, ctx, "BitNet (packed)")
            metrics.update(found)
        if out.curves.get("qat/loss"):
            loss_curve_png({"qat/loss": out.curves["qat/loss"]}, out_dir / "qat_curve.png", f"BitNet QAT of {name}")
        size = out.details.get("size", {})
        conv = out.details.get("conversion", {})
        lines = [
            "# Phase 4: BitNet b1.58",
            "",
            f"Input: `{previous.uri}/{name}`. Held-out split: **{config.eval.split}**. "
            f"Packing: {config.bitnet.packing}; activation norm: {config.bitnet.act_norm}; "
            f"{config.bitnet.steps} QAT steps, lambda warm-up {config.bitnet.warmup_steps}.",
            "",
            metrics_table(out.evaluations, EVAL_COLUMNS),
            "", *difference_lines(out.evaluations["after"]["bitnet"], "bitnet - input"),
            f"Gain over the unigram baseline kept: {out.metrics.get('bitnet/gain_kept', float('nan')):.1%} "
            f"(gate: >= {config.bitnet.min_gain_kept:.0%}).", "",
            "| bytes on disk (measured from the files) | value |",
            "|---|---|",
            *[f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in size.items()],
            "",
            f"Converted to ternary: {len(conv.get('converted', []))} linear layers; kept in high precision: "
            f"{sorted(conv.get('kept_linear', conv.get('kept', {})))}.",
            f"Export check: max relative logit difference after reloading the packed folder "
            f"{out.metrics.get('export/max_rel_logit_diff', float('nan')):.2e}.",
            *thought_lines,
        ]
        return PhaseWritten(
            metrics=metrics, report_md="\n".join(lines) + "\n", params=int(out.details.get("params", 0)) or None,
            steps_run=int(out.details.get("steps_run", 0)), curves=out.curves, details=out.details,
        )

    return body


bitnet_task = phase_task(
    "bitnet", kind="model", key=bitnet_key, body=_body, section="bitnet",
    doc="Ternarise (or reuse) the previous phase's model.",
)
