"""Prefect task for phase 8, final compression: every tensor in its chosen encoding, one loadable folder.

Input: the one model of the previous phase's artifact. A BitNet artifact (``model/`` with ``model/latent/``)
is rebuilt from its latent weights (`tasks.inputs.load_input_model`), so its BitLinear weights are stored
exactly as the ternary codes the layer computes with; anything else is loaded as a Hugging Face causal LM.

Output prefix: ``model/`` — the compressed folder (``config.json``, tokenizer, ``recipe.json``,
``shard-*.safetensors``; loads with ``forge_models.compression.artifact.load_compressed``), ``phase.json``,
``report.md`` and ``manifest.json`` (last).
"""

from __future__ import annotations

import json
from pathlib import Path

from forge_models.eval import difference_lines
from forge_models.runtime import PhaseContext
from tasks.cache import phase_key
from tasks.inputs import input_model_folder, load_input_model
from tasks.config import ForgeConfig
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, metrics_table, phase_task
from tasks.store import ArtifactRef

COMPRESSION_VERSION = "1"
EVAL_COLUMNS = list(HEADLINE_METRICS)


def compression_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"compression": config.compression.model_dump(mode="json"),
                          "eval": config.eval.model_dump(mode="json"), "seed": config.seed,
                          "precision": config.device.precision}, sort_keys=True)
    return phase_key("compression", COMPRESSION_VERSION, section, [previous.digest], dataset.digest)


def folder_bytes(folder: Path, exclude: str | None = None) -> int:
    """Bytes of the files under ``folder`` (``exclude``: a sub-folder left out), read from the disk."""
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and (exclude is None or exclude not in p.relative_to(folder).parts))


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)

        from forge_models import bitnet
        from forge_models.bitnet.layers import BitLinear
        from forge_models.compression.phase import CompressionConfig, CompressionInputs, run, token_blocks
        from forge_models.data import Corpus
        from forge_models.eval import evaluate, paired_metrics
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, None, previous.uri, None)
        model, latent_meta = load_input_model(folder)
        tokenizer = load_tokenizer(folder)
        corpus = Corpus.load(dataset_dir / "corpus")
        cfg = config.compression
        is_bitnet = any(isinstance(m, BitLinear) for m in model.modules())
        added = []
        if is_bitnet and not any(c.get("name") == "ternary" for c in cfg.candidates):
            # BitLinear weights only take the ternary encoding (exact for the layer); add it, in the
            # packing the BitNet phase used, rather than refusing the pipeline's default candidates.
            added = [{"name": "ternary", "packing": config.bitnet.packing}]
            cfg = CompressionConfig(**{**cfg.model_dump(), "candidates": (*added, *cfg.candidates)})
        train_texts = [e.text for e in corpus.split("train")]
        calib = token_blocks(tokenizer, train_texts, cfg.seq_len, cfg.calib_sequences)
        val = token_blocks(tokenizer, train_texts, cfg.seq_len, cfg.val_sequences, skip=cfg.calib_sequences)
        held_out = corpus.split(config.eval.split)
        # The pooled held-out text (eval sources are scored per source by the harness below).
        test = token_blocks(tokenizer, [e.text for e in held_out if not e.source], cfg.seq_len, cfg.test_sequences)

        out = run(CompressionInputs(model=model, tokenizer=tokenizer, calib_ids=calib, val_ids=val, test_ids=test,
                                    out_dir=out_dir / "model"), cfg, ctx)
        compressed = out.models["model"]  # reloaded from the written folder: what is stored is what is measured

        # The harness on the held-out split, input vs the reloaded artifact, paired on the same examples.
        before_o: dict[str, list[float]] = {}
        after_o: dict[str, list[float]] = {}
        before = evaluate(model.to(ctx.device), tokenizer, held_out, config.eval, ctx, before_o)
        after = evaluate(compressed, tokenizer, held_out, config.eval, ctx, after_o)
        after.update(paired_metrics(after_o, before_o, config.eval.bootstrap_samples, config.eval.bootstrap_seed))
        in_bytes = folder_bytes(folder, exclude=bitnet.LATENT_DIR)
        m = out.metrics
        metrics = {f"compression/{k}": float(v) for k, v in m.items()}
        metrics["compression/input_bytes"] = float(in_bytes)
        metrics["compression/ratio"] = in_bytes / m["bytes_total"]
        for k, v in before.items():
            metrics[f"input/{k}"] = float(v)
        for k, v in after.items():
            metrics[f"compressed/{k}"] = float(v)

        recipe = json.loads((out_dir / "model" / "recipe.json").read_text())["tensors"]
        by_enc = out.details.get("weights_by_encoding", {})
        total_w = sum(by_enc.values()) or 1
        lines = [
            "# Phase 8: final compression",
            "",
            f"Input: `{previous.uri}/{name}`" + (" (BitNet: rebuilt from its latent weights; BitLinear weights "
                                                   "stored as their ternary codes)" if latent_meta else "")
            + f". Budget: " + (f"{cfg.target_bytes:,} bytes" if cfg.target_bytes else f"{cfg.target_bpw} bits "
                               "per encoded weight") + f"; retention bound {cfg.max_loss_increase} nats "
            f"(validation loss, train side). Held-out split: **{config.eval.split}**."
            + (f" Added candidate {added} (BitLinear weights)." if added else ""),
            "",
            metrics_table({"before": {"input": before}, "after": {"compressed": after}}, EVAL_COLUMNS),
            "", *difference_lines(after, "compressed - input"), "",
            "| measured | input | compressed |",
            "|---|---|---|",
            f"| bytes on disk (from the files) | {in_bytes:,}"
            + (" (packed folder, latent/ excluded)" if latent_meta else "") + f" | {int(m['bytes_total']):,} |",
            f"| loss on {cfg.test_sequences} x {cfg.seq_len} {config.eval.split} tokens (nats) | "
            f"{m['input_test_loss']:.4f} | {m['test_loss']:.4f} (ppl ratio {m['test_ppl_ratio']:.3f}) |",
            f"| validation loss, train side (nats) | {m['input_val_loss']:.4f} | {m['val_loss']:.4f} |",
            "",
            f"Ratio (input bytes / compressed bytes): {in_bytes / m['bytes_total']:.2f}x; encoded weights at "
            f"{m['bits_per_weight_encoded']:.2f} bits per weight; weights shards {int(m['bytes_weights']):,} bytes. "
            f"Reloaded-vs-working logits differ by at most {m['reload_max_logit_diff']:.1e}. Groups rolled back: "
            f"{out.details.get('rolled_back', [])}. Wall time {m['wall_s_total']:.1f} s.",
            "",
            "Recipe summary (share of encoded weights per encoding):",
            "",
            "| encoding | weights | share |",
            "|---|---|---|",
            *[f"| {k} | {v:,} | {v / total_w:.1%} |" for k, v in sorted(by_enc.items(), key=lambda kv: -kv[1])],
            "",
            f"{len(recipe)} tensors encoded; the full per-tensor recipe is `model/recipe.json`.",
        ]
        return PhaseWritten(
            metrics=metrics, report_md="\n".join(lines) + "\n",
            params=sum(p.numel() for p in model.parameters()), curves=out.curves,
            details={k: v for k, v in out.details.items() if k != "recipe"},
        )

    return body


compression_task = phase_task(
    "compression", kind="model", key=compression_key, body=_body, section="compression",
    doc="Compress (or reuse) the previous phase's model into its final artifact.",
)
