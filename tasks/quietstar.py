"""Prefect task for phase 3, Quiet-STaR: train the previous phase's model to think before each token.

Output prefix: ``model/`` — a Hugging Face folder (safetensors; the two thought tokens in the tokenizer and the
embeddings) plus ``quietstar_head.safetensors`` (the mixing head) and ``quietstar.json``:
``AutoModelForCausalLM.from_pretrained`` gives the plain LM (generation without thoughts);
``forge_models.quietstar.load_quietstar`` gives the model with its thoughts and mixing head. Also
``quietstar_curve.png``, ``phase.json``, ``report.md`` and ``manifest.json`` (last).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from forge_models.eval import difference_lines
from forge_models.runtime import PhaseContext
from tasks import runtime as rt
from tasks.cache import phase_key
from tasks.inputs import input_model_folder
from tasks.config import ForgeConfig
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, loss_curve_png, metrics_table, phase_task
from tasks.store import ArtifactRef
from tasks.thoughts import fmt_value, thought_table

QUIETSTAR_VERSION = "2"  # 2: trunk_lr_scale, no-thought NLL change measured


def quietstar_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"quietstar": config.quietstar.model_dump(mode="json"),
                          "eval": config.eval.model_dump(mode="json"), "seed": config.seed,
                          "precision": config.device.precision}, sort_keys=True)
    return phase_key("quietstar", QUIETSTAR_VERSION, section, [previous.digest], dataset.digest)


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)
        from transformers import AutoModelForCausalLM

        from forge_models import quietstar
        from forge_models.data import Corpus
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, config.quietstar.input_model, previous.uri,
                                             "quietstar.input_model")
        with rt.MODEL_LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = load_tokenizer(folder)
        corpus = Corpus.load(dataset_dir / "corpus")
        out = quietstar.run(quietstar.QuietStarInputs(model, tokenizer, corpus, config.eval), config.quietstar, ctx)
        quietstar.save_quietstar(out.models["model"], out.tokenizer, out_dir / "model")
        loss_curve_png({k: out.curves[k] for k in ("loss", "plain_nll", "talk_nll") if out.curves.get(k)},
                       out_dir / "quietstar_curve.png", f"Quiet-STaR training of {name}")
        m, c = out.metrics, config.quietstar
        lines = [
            "# Phase 3: Quiet-STaR", "",
            f"Input: `{previous.uri}/{name}`. Trained on the train split only; held-out split: "
            f"**{config.eval.split}**. {c.steps} steps, {c.thought_tokens} thought tokens, n_ahead_talk "
            f"{c.n_ahead_talk}, n_passes {c.n_passes}.", "",
            "Harness, input vs trained model **without** thoughts:", "",
            metrics_table(out.evaluations, list(HEADLINE_METRICS)), "",
            *difference_lines(out.evaluations["after"]["quietstar"], "quietstar - input"), "",
            "With vs without thoughts (held-out, paired bootstrap 95%):", "",
            *thought_table(m, "quietstar"),
            "", f"Learning signal: mean |w| of the mixing head {m.get('quietstar/w_abs_step0', 0.0):.4f} at step 0 "
            f"(zero-initialised), {fmt_value(m.get('quietstar/w_abs_heldout'))} on held-out text after training. "
            f"No-thought held-out NLL, input -> trained: {fmt_value(m.get('quietstar/plain_nll_before'))} -> "
            f"{fmt_value(m.get('quietstar/plain_nll_after'))}, change {fmt_value(m.get('quietstar/plain_nll_change'))} "
            f"[{fmt_value(m.get('quietstar/plain_nll_change_lo'))}, {fmt_value(m.get('quietstar/plain_nll_change_hi'))}] "
            f"(must not rise).",
            f"Training throughput: {m.get('quietstar/train_tokens_per_s', float('nan')):.1f} tokens/s.",
        ]
        return PhaseWritten(metrics=m, report_md="\n".join(lines) + "\n", params=int(out.details["params"]),
                            steps_run=c.steps, curves=out.curves,
                            details={k: v for k, v in out.details.items() if k != "params"})

    return body


quietstar_task = phase_task(
    "quietstar", kind="model", key=quietstar_key, body=_body, section="quietstar",
    doc="Train (or reuse) Quiet-STaR on the previous phase's model.",
)
