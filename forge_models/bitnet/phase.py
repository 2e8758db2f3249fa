"""Phase 4 — BitNet b1.58: ternary weights that are really stored, trained and run as ternary.

1. Copy the input model (any Hugging Face causal LM, Cognate included) to float32 on ``ctx.device`` and
   evaluate it with the shared harness ("input").
2. Convert every linear layer except the kept ones to :class:`BitLinear` (embeddings, ``lm_head``, norms
   and ``cfg.keep_patterns`` stay in high precision). With ``act_norm="rms"`` each layer's norm gain is
   set to the mean RMS of its input on the first training batch (:func:`calibrate_act_norms`): a unit
   gain would rescale every token and change what the pretrained model computes (pilot on the tiny-preset
   trunk: held-out loss before fine-tuning 3.81 with unit gains, 1.88 calibrated). Evaluate at lambda = 1
   without any training ("ternary_no_ft": post-training quantisation, the baseline QAT has to beat).
3. Quantisation-aware fine-tuning for ``cfg.steps`` steps on :class:`TokenSampler` batches (a pure
   function of (seed, step)) with lambda = min(step / warmup_steps, 1): the latent fp32 weights train
   through the quantised forward pass via the straight-through estimator.
4. Evaluate at lambda = 1 ("bitnet"); fail the quality gate if the held-out loss rose by more than
   ``cfg.max_loss_increase`` over the input model.
5. Export the packed folder (``inputs.export_dir``, or a temporary one that is measured and deleted),
   reload it with the integer-inference loader and check its logits equal the in-memory model's, and
   report bytes on disk of ternary linear weights, high-precision tensors and the whole file against the
   bf16 model of the same shape — all read from the files written.

The output model is the BitLinear model at lambda = 1 with its latent weights, so later phases keep
training through the quantised forward pass; :func:`forge_models.bitnet.export_packed` stores it.

Checkpoints (when ``ctx.checkpoint_dir`` is set) live in ``<checkpoint_dir>/qat/step-XXXXXX/``:
``model.safetensors`` (latent weights of the converted model), ``optimizer.pt`` (optimizer + RNG state,
loaded with ``weights_only=True``), ``state.json`` and a ``COMPLETE`` marker written last. Only the newest
complete checkpoint is kept; a final one is loaded instead of retraining. A checkpoint written for another
input model, config, data or tokenizer is refused.

Training runs under ``ctx.autocast()`` (bf16 where supported); evaluation and the export check of
the fully quantised model use the exact integer product, so the evaluated model is the stored one.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from forge_models.bitnet.config import BitNetConfig
from forge_models.checkpoint import digest as checkpoint_digest
from forge_models.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, state_digest, tokenizer_fingerprint
from forge_models.bitnet.convert import (
    Conversion,
    bit_linears,
    calibrate_act_norms,
    convert_to_bitnet,
    set_quant_strength,
)
from forge_models.bitnet.export import (
    WEIGHTS_FILE,
    export_packed,
    folder_bytes,
    load_packed,
    safetensors_bytes,
    write_bf16_reference,
)
from forge_models.bitnet.packing import PACKINGS
from forge_models.bitnet.quant import quant_strength_at
from forge_models.config import HEADLINE_METRICS, EvalConfig
from forge_models.data import Corpus, Example
from forge_models.data.stream import TokenSampler, trains_in_chat
from forge_models.eval import evaluate, paired_metrics, unigram_loss
from forge_models.optim import make_adamw
from forge_models.runtime import (
    ArtifactIntegrityError,
    ConfigError,
    PhaseContext,
    PhaseOutput,
    QualityGateFailed,
    check_finite,
    translate_oom,
)

__all__ = ["BitNetInputs", "run"]

STAGE = "qat"
PROGRESS_EVENTS = 100
# The exported folder must reproduce the in-memory logits: both compute the same integer products in
# float32, so anything beyond float noise means the export is wrong.
EXPORT_LOGIT_TOLERANCE = 1e-5
PROBE_TOKENS = 64


@dataclass
class BitNetInputs:
    """What the BitNet phase consumes.

    Attributes:
        model: the causal LM to ternarise (not modified: the phase works on a float32 copy).
        tokenizer: its tokenizer.
        corpus: training examples for fine-tuning and the held-out split for evaluation.
        eval_cfg: settings of the shared evaluation harness.
        export_dir: where to write the packed folder; None = a temporary folder, measured then deleted
            (the caller then stores the output model with ``export_packed``, which writes the same bytes).
    """

    model: nn.Module
    tokenizer: Any
    corpus: Corpus
    eval_cfg: EvalConfig
    export_dir: Path | None = None


def run(inputs: BitNetInputs, cfg: BitNetConfig, ctx: PhaseContext) -> PhaseOutput:
    """Run the BitNet phase; see the module docstring. Raises ForgeError subclasses on failure."""
    try:
        return _run(inputs, cfg, ctx)
    except RuntimeError as exc:
        translated = translate_oom(exc)
        if translated is exc:
            raise
        raise translated from exc


def _run(inputs: BitNetInputs, cfg: BitNetConfig, ctx: PhaseContext) -> PhaseOutput:
    train_examples = inputs.corpus.split("train")
    held_out = inputs.corpus.split(inputs.eval_cfg.split)
    if not train_examples:
        raise ConfigError("the corpus has no training examples; BitNet fine-tuning has nothing to train on")
    if not held_out:
        raise ConfigError(f"the corpus has no {inputs.eval_cfg.split!r} examples to evaluate on")
    if getattr(inputs.tokenizer, "eos_token_id", None) is None:
        raise ConfigError("the tokenizer has no eos token; training streams separate documents with it")

    model = copy.deepcopy(inputs.model).float().to(ctx.device)
    input_digest = state_digest(model)
    before_outcomes: dict[str, list[float]] = {}
    before = _evaluate(model, inputs, held_out, ctx, before_outcomes)
    unigram = unigram_loss(train_examples, held_out, inputs.tokenizer, inputs.eval_cfg.ppl_max_tokens)

    sampler = TokenSampler(train_examples, inputs.tokenizer, cfg.data_mix, cfg.seq_len, cfg.batch_size, ctx.seed,
                           chat=trains_in_chat(inputs.tokenizer))
    conversion = convert_to_bitnet(model, cfg.keep_patterns, cfg.act_norm)
    norm_gains = calibrate_act_norms(model, sampler.batch(0).to(ctx.device)) if cfg.act_norm == "rms" else {}
    set_quant_strength(model, 1.0)
    no_ft = _evaluate(model, inputs, held_out, ctx)

    digest = checkpoint_digest({
        "config": cfg.model_dump(mode="json", exclude={"checkpoint_every", "packing", "kept_dtype", "max_loss_increase", "min_gain_kept"}),
        "seed": ctx.seed,
        "tokenizer": tokenizer_fingerprint(inputs.tokenizer),
        "data": inputs.corpus.digest(),
        "input_model": input_digest,
        "converted": conversion.converted,
    })
    result = _train(model, sampler, cfg, ctx, digest)
    set_quant_strength(model, 1.0)
    model.eval()
    after_outcomes: dict[str, list[float]] = {}
    after = _evaluate(model, inputs, held_out, ctx, after_outcomes)
    after.update(paired_metrics(after_outcomes, before_outcomes, inputs.eval_cfg.bootstrap_samples,
                                inputs.eval_cfg.bootstrap_seed))  # bitnet - input on the same examples
    after["tokens_per_s"] = result.tokens_per_s
    _quality_gate(before, after, cfg.max_loss_increase)
    _gain_gate(before, after, unigram, cfg.min_gain_kept)

    size, export_check = _export_and_measure(model, conversion, inputs, held_out, cfg)
    evaluations = {"before": {"input": before}, "after": {"ternary_no_ft": no_ft, "bitnet": after}}
    metrics: dict[str, float] = {
        f"{name}/{key}": float(values[key])
        for name, values in (("input", before), ("ternary_no_ft", no_ft), ("bitnet", after))
        for key in HEADLINE_METRICS
        if key in values
    }
    metrics["bitnet/loss_increase"] = after["loss"] - before["loss"]
    metrics["unigram_loss"] = unigram
    metrics["bitnet/gain_kept"] = _gain_kept(before["loss"], after["loss"], unigram)
    metrics.update({f"bitnet/{k}": v for k, v in after.items() if k.startswith("d_")})
    metrics["bitnet/qat_tokens_per_s"] = result.tokens_per_s
    metrics.update({f"size/{k}": float(v) for k, v in size.items()})
    metrics["export/max_rel_logit_diff"] = export_check

    details: dict[str, Any] = {
        "conversion": conversion.as_dict(),
        "act_norm_gains": norm_gains,
        "ternary_params": sum(m.weight.numel() for _, m in bit_linears(model)),
        "params": sum(p.numel() for p in model.parameters()),
        "size": size,
        "export_check": {"max_rel_logit_diff": export_check, "tolerance": EXPORT_LOGIT_TOLERANCE},
        "steps_run": result.steps_run,
        "resumed_from": result.resumed_from,
        "settings": {
            "steps": cfg.steps,
            "warmup_steps": cfg.warmup_steps,
            "lr": cfg.lr,
            "act_norm": cfg.act_norm,
            "packing": cfg.packing,
            "kept_dtype": cfg.kept_dtype,
            "seed": ctx.seed,
        },
        "export_dir": str(inputs.export_dir) if inputs.export_dir is not None else None,
        "precision": str(ctx.autocast_dtype() or torch.float32),
    }
    return PhaseOutput(
        models={"model": model},
        tokenizer=inputs.tokenizer,
        metrics=metrics,
        evaluations=evaluations,
        details=details,
        curves={"qat/loss": result.curve, "qat/lambda": result.lambdas},
    )


# ----------------------------------------------------------------------------------------- training


@dataclass
class _TrainResult:
    steps_run: int
    tokens_per_s: float
    curve: list[tuple[int, float]]
    lambdas: list[tuple[int, float]]
    resumed_from: int | None


@dataclass
class _Progress:
    ctx: PhaseContext
    total: int
    _last: int = field(default=-1, repr=False)

    def report(self, done: int, message: str, force: bool = False) -> None:
        every = max(1, self.total // PROGRESS_EVENTS)
        if force or done - self._last >= every or done == self.total:
            self.ctx.tracker.progress(done, self.total, message)
            self._last = done


def _train(
    model: nn.Module,
    sampler: TokenSampler,
    cfg: BitNetConfig,
    ctx: PhaseContext,
    digest: str,
) -> _TrainResult:
    """Quantisation-aware fine-tuning in place, resuming from (or loading) the newest checkpoint."""
    optimizer = make_adamw(model, cfg.lr, cfg.weight_decay)
    stage_dir = ctx.checkpoint_dir / STAGE if ctx.checkpoint_dir is not None else None
    progress = _Progress(ctx, cfg.steps)
    torch.manual_seed(ctx.seed)  # dropout, if the model has any, draws from here

    start, curve, lambdas, tokens, seconds, resumed_from = 0, [], [], 0, 0.0, None
    latest = latest_checkpoint(stage_dir) if stage_dir is not None else None
    if latest is not None:
        state = load_checkpoint(latest, config_digest=digest, model=model, optimizer=optimizer, device=ctx.device,
                                what="input model, configuration, data or tokenizer")
        resumed_from = int(state["step"])
        curve = [(int(s), float(v)) for s, v in state["curve"]]
        lambdas = [(int(s), float(v)) for s, v in state["lambdas"]]
        if state["final"]:
            progress.report(cfg.steps, "qat: loaded finished run", force=True)
            return _TrainResult(0, float(state["tokens_per_s"]), curve, lambdas, resumed_from)
        start, tokens, seconds = resumed_from, int(state["tokens"]), float(state["seconds"])
        progress.report(start, f"qat: resumed at step {start}", force=True)

    config = getattr(model, "config", None)
    pad_id, eos_id = getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)
    model.train()
    steps_run = 0
    for step in range(start, cfg.steps):
        lam = quant_strength_at(step, cfg.warmup_steps)
        set_quant_strength(model, lam)
        t0 = time.perf_counter()
        batch = sampler.batch(step).to(ctx.device)
        labels, attention_mask = sampler.labels(step).to(ctx.device), None  # tool output lines: -100
        if pad_id is not None and pad_id != eos_id and bool((batch == pad_id).any()):
            attention_mask = (batch != pad_id).long()
            labels = labels.masked_fill(batch == pad_id, -100)
        with ctx.autocast():
            out = model(input_ids=batch, attention_mask=attention_mask, labels=labels)
        check_finite(out.loss, step + 1, "bitnet QAT loss")
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - t0

        done = step + 1
        steps_run += 1
        tokens += batch.numel()
        seconds += step_seconds
        loss_value = float(out.loss.detach())
        curve.append((done, loss_value))
        lambdas.append((done, lam))
        if stage_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(stage_dir, stage=STAGE, step=done, total=cfg.steps, config_digest=digest, model=model,
                            optimizer=optimizer, ctx=ctx, extra={
                "curve": curve, "lambdas": lambdas, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            })
        ctx.tracker.log_metrics(
            {"qat/loss": loss_value, "qat/lambda": lam, "qat/grad_norm": float(grad_norm),
             "qat/tokens_per_s": batch.numel() / step_seconds},
            step=done,
        )
        progress.report(done, f"qat: step {done}/{cfg.steps} lambda {lam:.2f} loss {loss_value:.3f}")
    model.eval()
    return _TrainResult(steps_run, tokens / seconds if seconds > 0 else 0.0, curve, lambdas, resumed_from)


# -------------------------------------------------------------------------------------- checkpoints


# ------------------------------------------------------------------------------- evaluation, export


def _evaluate(
    model: nn.Module, inputs: BitNetInputs, held_out: Sequence[Example], ctx: PhaseContext,
    outcomes: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    return {k: float(v) for k, v in evaluate(model, inputs.tokenizer, held_out, inputs.eval_cfg, ctx, outcomes).items()}


def _gain_kept(before_loss: float, after_loss: float, unigram: float) -> float:
    """Fraction of the input's gain over the unigram baseline the output keeps (nan if the input has none)."""
    gain = unigram - before_loss
    return (unigram - after_loss) / gain if gain > 0 else float("nan")


def _gain_gate(before: dict[str, float], after: dict[str, float], unigram: float, min_kept: float) -> None:
    """The relative gate: keep ``min_kept`` of the input's gain over unigram (an input without gain: no loss)."""
    gain = unigram - before["loss"]
    allowed = before["loss"] + (1.0 - min_kept) * max(0.0, gain)
    if after["loss"] > allowed:
        kept = _gain_kept(before["loss"], after["loss"], unigram)
        raise QualityGateFailed(
            f"the ternary model lost too much of what its input had learned: held-out loss {before['loss']:.4f} -> "
            f"{after['loss']:.4f} nats/token against a unigram baseline of {unigram:.4f}, so it keeps "
            f"{kept:.1%} of the input's gain, but bitnet.min_gain_kept is {min_kept:.0%}. Fine-tune longer "
            f"(bitnet.steps), lengthen the warm-up, keep more layers in high precision; nothing was stored."
        )


def _quality_gate(before: dict[str, float], after: dict[str, float], max_increase: float) -> None:
    increase = after["loss"] - before["loss"]
    if increase > max_increase:
        raise QualityGateFailed(
            f"the ternary model lost too much: held-out loss {before['loss']:.4f} -> {after['loss']:.4f} nats/token "
            f"(+{increase:.4f}), but bitnet.max_loss_increase is {max_increase}. Fine-tune longer (bitnet.steps), "
            f"lengthen the warm-up, keep more layers in high precision, or start from a larger model; nothing was stored."
        )


def _export_and_measure(
    model: nn.Module,
    conversion: Conversion,
    inputs: BitNetInputs,
    held_out: Sequence[Example],
    cfg: BitNetConfig,
) -> tuple[dict[str, float], float]:
    """Write the packed folder, measure it and a bf16 reference on disk, check the reload's logits."""
    with tempfile.TemporaryDirectory(prefix="bitnet-") as tmp:
        folder = Path(inputs.export_dir) if inputs.export_dir is not None else Path(tmp) / "packed"
        export_packed(model, folder, tokenizer=inputs.tokenizer, packing=cfg.packing, kept_dtype=cfg.kept_dtype)
        packed = safetensors_bytes(folder / WEIGHTS_FILE, conversion.converted)
        reference = safetensors_bytes(write_bf16_reference(model, Path(tmp) / "bf16.safetensors"), conversion.converted)
        check = _export_logit_diff(model, folder, inputs.tokenizer, held_out, cfg.kept_dtype)
        total = folder_bytes(folder)

    layers = [m for _, m in bit_linears(model)]
    n_weights = sum(m.weight.numel() for m in layers)
    fmt = PACKINGS[cfg.packing]
    expected = sum(fmt.packed_bytes(m.out_features, m.in_features) + 4 for m in layers)  # + float32 scale
    if packed["linear"] != expected:
        raise ArtifactIntegrityError(
            f"the packed file holds {packed['linear']} bytes of ternary layers, but {cfg.packing} packing of "
            f"these shapes takes exactly {expected}; the export is wrong"
        )
    size = {
        "ternary_linear": packed["linear"],
        "high_precision": packed["other"],
        "weights_file": packed["file"],
        "folder_total": total,
        "bf16_linear": reference["linear"],
        "bf16_high_precision": reference["other"],
        "bf16_weights_file": reference["file"],
        "ternary_weights": n_weights,
        "bits_per_ternary_weight": 8.0 * (packed["linear"] - 4 * len(layers)) / n_weights,
        "linear_ratio_vs_bf16": reference["linear"] / packed["linear"],
        "file_ratio_vs_bf16": reference["file"] / packed["file"],
    }
    return size, check


@torch.no_grad()
def _export_logit_diff(
    model: nn.Module, folder: Path, tokenizer: Any, held_out: Sequence[Example], kept_dtype: str
) -> float:
    """Max |logit difference| between the reloaded packed folder and the in-memory model (CPU, fp32),
    relative to the largest |logit| (at least 1)."""
    ids: list[int] = []
    for ex in held_out:
        ids.extend(tokenizer(ex.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= PROBE_TOKENS:
            break
    probe = torch.tensor([ids[:PROBE_TOKENS]], dtype=torch.long)
    reference = copy.deepcopy(model).cpu().eval()
    if kept_dtype != "float32":
        # The stored kept tensors are rounded; compare against the model with the same rounding.
        dtype = getattr(torch, kept_dtype)
        converted = {n for n, _ in bit_linears(reference)}
        for name, p in reference.named_parameters():
            if not (name.endswith(".weight") and name[: -len(".weight")] in converted):  # latent weights: ternary
                p.data = p.data.to(dtype).float()
    expected = reference(input_ids=probe).logits.float()
    got = load_packed(folder, device="cpu")(input_ids=probe).logits.float()
    value = float((got - expected).abs().max() / expected.abs().max().clamp(min=1.0))
    if not value <= EXPORT_LOGIT_TOLERANCE:
        raise ArtifactIntegrityError(
            f"the exported folder {folder} does not reproduce the model: relative max logit difference {value:.3g} "
            f"> {EXPORT_LOGIT_TOLERANCE}; the export is broken (this is a bug, not a config problem)"
        )
    return value
