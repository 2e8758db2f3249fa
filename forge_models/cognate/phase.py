"""Phase 1 — Cognate: pretrain a shared trunk from scratch, branch N measured variants, evaluate them all.

Route "scratch" (the default):

1. Build a Cognate model (``torch.manual_seed(ctx.seed)``, CPU init, then ``ctx.device``) sized by
   ``cfg.arch`` with the tokenizer's vocabulary; evaluate it as the "before" model ("init").
2. Train the trunk for ``cfg.trunk.steps`` on batches from :class:`TokenSampler` (a pure function of
   (seed, step), so a resumed run sees exactly the batches it would have seen).
3. For each variant: copy the trained trunk, set its halting threshold / refinement budget, and train it
   ``variant.train.steps`` more with the variant's data mix and seed ``ctx.seed + 1 + i``.
4. Evaluate trunk and variants with the shared harness on the held-out split, against the unigram
   baseline of the same held-out data; fail the quality gate if any model did not clearly beat it.

Route "pretrained": load existing Hugging Face causal LMs from local folders, evaluate, pass them on.

Checkpoints (when ``ctx.checkpoint_dir`` is set) live in ``<checkpoint_dir>/<stage>/step-XXXXXX/``:
``model.safetensors``, ``optimizer.pt`` (optimizer + RNG state, loaded with ``weights_only=True``),
``state.json``, and a ``COMPLETE`` marker written last. Only the newest complete checkpoint of a stage is
kept. A stage whose newest checkpoint is final is loaded instead of retrained.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from forge_models.checkpoint import digest, latest_checkpoint, load_checkpoint, save_checkpoint, tokenizer_fingerprint
from forge_models.cognate.model import (
    CognateCausalLMOutput,
    CognateForCausalLM,
    CognateModelConfig,
    CognateRMSNorm,
    count_parameters,
)
from forge_models.config import HEADLINE_METRICS, CognateConfig, EvalConfig, TrainConfig
from forge_models.data import Corpus, Example, without_eval_units
from forge_models.data.stream import TokenSampler, trains_in_chat
from forge_models.eval import evaluate, unigram_loss
from forge_models.optim import make_adamw
from forge_models.runtime import (
    ConfigError,
    PhaseContext,
    PhaseOutput,
    QualityGateFailed,
    check_finite,
    refuse_pickles,
    translate_oom,
)

__all__ = ["CognateInputs", "run"]

# Tokens used to measure the mean number of refinement steps at inference (enough for a stable mean).
REFINE_MEASURE_TOKENS = 4096
# Progress events per phase: frequent enough for a live bar, rare enough not to flood a tracker.
PROGRESS_EVENTS = 100
# Per-model values copied into the flat metrics as "<model>/<key>" (when measured for that model).
HEADLINE_KEYS = (*HEADLINE_METRICS[:2], "unigram_gain", *HEADLINE_METRICS[2:], "refine_steps", "tokens_per_s", "params")


@dataclass
class CognateInputs:
    """What the Cognate phase consumes.

    Attributes:
        corpus: training and held-out examples.
        tokenizer: the tokenizer all models use (trained BPE on the scratch route, the base models' own on
            the pretrained route).
        eval_cfg: settings of the shared evaluation harness.
    """

    corpus: Corpus
    tokenizer: PreTrainedTokenizerBase
    eval_cfg: EvalConfig


def run(inputs: CognateInputs, cfg: CognateConfig, ctx: PhaseContext) -> PhaseOutput:
    """Run the Cognate phase; see the module docstring. Raises ForgeError subclasses on failure."""
    try:
        if cfg.source == "pretrained":
            return _run_pretrained(inputs, cfg, ctx)
        return _run_scratch(inputs, cfg, ctx)
    except RuntimeError as exc:
        translated = translate_oom(exc)
        if translated is exc:
            raise
        raise translated from exc


# ------------------------------------------------------------------------------------ scratch route


@dataclass(frozen=True)
class _Stage:
    """One training stage: the trunk, or one variant branched from it."""

    name: str
    train: TrainConfig
    seed: int
    act_threshold: float
    max_refine_steps: int
    step_offset: int  # optimizer steps of all earlier stages (global step = offset + local step)
    digest: str  # what a checkpoint of this stage must have been written for
    chat: bool = False  # answer-checked kinds rendered with the tokenizer's chat template (pretrained route)


@dataclass
class _StageResult:
    steps_run: int  # optimizer steps actually executed in this call
    tokens_per_s: float  # measured training throughput of the whole stage (across resumes)
    curve: list[tuple[int, float]]
    resumed_from: int | None  # local step of the checkpoint the stage started from, if any


@dataclass
class _Progress:
    """Reports progress over the steps of all stages to the tracker, every few steps."""

    ctx: PhaseContext
    total: int
    done: int = 0
    _last_reported: int = field(default=-1, repr=False)

    def advance_to(self, done: int, message: str, force: bool = False) -> None:
        self.done = done
        every = max(1, self.total // PROGRESS_EVENTS)
        if force or done - self._last_reported >= every or done == self.total:
            self.ctx.tracker.progress(done, self.total, message)
            self._last_reported = done


def _run_scratch(inputs: CognateInputs, cfg: CognateConfig, ctx: PhaseContext) -> PhaseOutput:
    tokenizer = inputs.tokenizer
    train_examples = inputs.corpus.split("train")
    held_out = inputs.corpus.split(inputs.eval_cfg.split)
    if not train_examples:
        raise ConfigError("the corpus has no training examples; the Cognate phase has nothing to learn from")
    if not held_out:
        raise ConfigError(f"the corpus has no {inputs.eval_cfg.split!r} examples to evaluate on")

    model_config = _model_config(cfg, tokenizer)
    stages = _plan_stages(cfg, ctx, tokenizer, inputs.corpus)
    progress = _Progress(ctx, total=sum(s.train.steps for s in stages))

    # Random init, seeded and on CPU so the same seed gives the same weights on any device.
    torch.manual_seed(ctx.seed)
    trunk = CognateForCausalLM(model_config).to(ctx.device)
    unigram = unigram_loss(train_examples, held_out, tokenizer, inputs.eval_cfg.ppl_max_tokens)
    before = _evaluate(trunk, inputs, held_out, unigram, ctx)

    results: dict[str, _StageResult] = {}
    models: dict[str, CognateForCausalLM] = {}
    for stage in stages:
        # Variants branch from the trained trunk; each trains its own copy (weights and config).
        model = trunk if stage.name == "trunk" else copy.deepcopy(trunk)
        model.config.act_threshold = stage.act_threshold
        model.config.max_refine_steps = stage.max_refine_steps
        results[stage.name] = _train_stage(stage, model, train_examples, tokenizer, cfg, ctx, progress)
        models[stage.name] = model

    after = {
        name: _evaluate(model, inputs, held_out, unigram, ctx, tokens_per_s=results[name].tokens_per_s)
        for name, model in models.items()
    }
    _quality_gate(after, unigram, cfg.min_unigram_gain)

    metrics = {"unigram_loss": unigram, "init/loss": before["loss"], **_headline(after)}

    details: dict[str, Any] = {
        "params": {name: count_parameters(m) for name, m in models.items()},
        "settings": {
            s.name: {
                "act_threshold": s.act_threshold,
                "max_refine_steps": s.max_refine_steps,
                "data_mix": dict(s.train.data_mix),
                "steps": s.train.steps,
                "seed": s.seed,
            }
            for s in stages
        },
        "steps_run": sum(r.steps_run for r in results.values()),
        "steps_run_by_stage": {name: r.steps_run for name, r in results.items()},
        "resumed_from": {name: r.resumed_from for name, r in results.items()},
        "unigram_loss": unigram,
        "vocab_size": model_config.vocab_size,
        "precision": str(ctx.autocast_dtype() or torch.float32),
    }
    return PhaseOutput(
        models=dict(models),
        tokenizer=tokenizer,
        metrics=metrics,
        evaluations={"before": {"init": before}, "after": after},
        details=details,
        curves={f"{name}/loss": r.curve for name, r in results.items()},
    )


def _model_config(cfg: CognateConfig, tokenizer: PreTrainedTokenizerBase) -> CognateModelConfig:
    """The HF config for the tokenizer's vocabulary and special tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token; Cognate training separates documents with it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return CognateModelConfig.from_arch(
        cfg.arch, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad
    )


def _plan_stages(
    cfg: CognateConfig, ctx: PhaseContext, tokenizer: PreTrainedTokenizerBase, corpus: Corpus
) -> list[_Stage]:
    """Trunk first, then the variants in order, each with its seed, settings and checkpoint digest."""
    common = {
        "arch": cfg.arch.model_dump(mode="json"),
        "trunk": cfg.trunk.model_dump(mode="json"),
        "seed": ctx.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": corpus.digest(),
    }
    stages = [
        _Stage(
            name="trunk",
            train=cfg.trunk,
            seed=ctx.seed,
            act_threshold=cfg.arch.act_threshold,
            max_refine_steps=cfg.arch.max_refine_steps,
            step_offset=0,
            digest=digest({**common, "stage": "trunk"}),
        )
    ]
    offset = cfg.trunk.steps
    for i, variant in enumerate(cfg.variants):
        stages.append(
            _Stage(
                name=variant.name,
                train=variant.train,
                seed=ctx.seed + 1 + i,
                act_threshold=variant.act_threshold,
                max_refine_steps=variant.max_refine_steps,
                step_offset=offset,
                # The variant starts from the trunk, so the trunk's settings are part of its identity too.
                digest=digest({**common, "stage": variant.name, "index": i,
                                "variant": variant.model_dump(mode="json")}),
            )
        )
        offset += variant.train.steps
    return stages


# ----------------------------------------------------------------------------------------- training


def _train_stage(
    stage: _Stage,
    model: nn.Module,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    cfg: CognateConfig,
    ctx: PhaseContext,
    progress: _Progress,
) -> _StageResult:
    """Train one stage in place, resuming from (or loading) its newest checkpoint when there is one.

    ``model`` is a Cognate model (scratch route) or any Hugging Face causal LM, possibly wrapped by peft
    (pretrained route): only its trainable parameters are optimised."""
    tcfg = stage.train
    optimizer = make_adamw(model, tcfg.lr, tcfg.weight_decay, no_decay_modules=(nn.Embedding, CognateRMSNorm))
    stage_dir = ctx.checkpoint_dir / stage.name if ctx.checkpoint_dir is not None else None
    torch.manual_seed(stage.seed)  # nothing in the model is random today; this keeps it so if that changes

    start, curve, tokens, seconds, resumed_from = 0, [], 0, 0.0, None
    latest = latest_checkpoint(stage_dir) if stage_dir is not None else None
    if latest is not None:
        state = load_checkpoint(latest, config_digest=stage.digest, model=model, optimizer=optimizer, device=ctx.device,
                                what=f"configuration, data or tokenizer than stage {stage.name!r} has now")
        resumed_from = int(state["step"])
        curve = [(int(s), float(v)) for s, v in state["curve"]]
        if state["final"]:
            progress.advance_to(stage.step_offset + tcfg.steps, f"{stage.name}: loaded finished stage", force=True)
            return _StageResult(0, float(state["tokens_per_s"]), curve, resumed_from)
        start, tokens, seconds = resumed_from, int(state["tokens"]), float(state["seconds"])
        progress.advance_to(stage.step_offset + start, f"{stage.name}: resumed at step {start}", force=True)

    sampler = TokenSampler(examples, tokenizer, tcfg.data_mix, tcfg.seq_len, tcfg.batch_size, stage.seed,
                           chat=stage.chat)
    pad_id, eos_id = model.config.pad_token_id, model.config.eos_token_id
    model.train()
    steps_run = 0
    for step in range(start, tcfg.steps):
        global_step = stage.step_offset + step + 1
        lr = _lr_at(step, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        t0 = time.perf_counter()
        batch = sampler.batch(step).to(ctx.device)
        labels, attention_mask = sampler.labels(step).to(ctx.device), None  # tool output lines: -100
        if pad_id is not None and pad_id != eos_id and bool((batch == pad_id).any()):
            # Padding (if the sampler produced any) is neither attended to nor predicted.
            attention_mask = (batch != pad_id).long()
            labels = labels.masked_fill(batch == pad_id, -100)
        with ctx.autocast():
            out = model(input_ids=batch, attention_mask=attention_mask, labels=labels)
        check_finite(out.loss, global_step, f"{stage.name} loss")
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - t0

        steps_run += 1
        tokens += batch.numel()
        seconds += step_seconds
        loss_value = float(out.loss.detach())
        curve.append((global_step, loss_value))
        done = step + 1
        if stage_dir is not None and (done % cfg.checkpoint_every == 0 or done == tcfg.steps):
            save_checkpoint(
                stage_dir, stage=stage.name, step=done, total=tcfg.steps, config_digest=stage.digest, model=model,
                optimizer=optimizer, ctx=ctx,
                extra={"curve": curve, "tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / seconds if seconds > 0 else 0.0},
            )
        logged = {
            f"{stage.name}/loss": loss_value,
            f"{stage.name}/lr": lr,
            f"{stage.name}/grad_norm": float(grad_norm),
            f"{stage.name}/tokens_per_s": batch.numel() / step_seconds,
        }
        if isinstance(out, CognateCausalLMOutput):  # the refiner's own terms (a plain causal LM has none)
            logged.update({f"{stage.name}/lm_loss": float(out.lm_loss.detach()),
                           f"{stage.name}/ponder": float(out.ponder_cost.detach()),
                           f"{stage.name}/refine_steps": float(out.refine_steps)})
        ctx.tracker.log_metrics(logged, step=global_step)
        progress.advance_to(global_step, f"{stage.name}: step {done}/{tcfg.steps} loss {loss_value:.3f}")

    model.eval()
    return _StageResult(steps_run, tokens / seconds if seconds > 0 else 0.0, curve, resumed_from)


def _lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to 10% of it at the last step."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(1, tcfg.steps - 1 - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps) / span)
    floor = 0.1 * tcfg.lr
    return floor + (tcfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------------------- evaluation


def _evaluate(
    model: nn.Module,
    inputs: CognateInputs,
    held_out: Sequence[Example],
    unigram: float,
    ctx: PhaseContext,
    tokens_per_s: float | None = None,
) -> dict[str, float]:
    """Harness metrics plus unigram gain, inference refinement steps, parameter count (and throughput)."""
    model.eval()
    result = {k: float(v) for k, v in evaluate(model, inputs.tokenizer, held_out, inputs.eval_cfg, ctx).items()}
    result["unigram_gain"] = unigram - result["loss"]
    if isinstance(model, CognateForCausalLM):
        result["refine_steps"] = _measure_refine_steps(model, inputs.tokenizer, held_out, inputs.eval_cfg, ctx)
    result["params"] = float(count_parameters(model))
    if tokens_per_s is not None:
        result["tokens_per_s"] = tokens_per_s
    return result


@torch.no_grad()
def _measure_refine_steps(
    model: CognateForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    eval_cfg: EvalConfig,
    ctx: PhaseContext,
) -> float:
    """Token-weighted mean number of refinement steps the model takes on held-out text, in eval mode."""
    budget = min(eval_cfg.ppl_max_tokens, REFINE_MEASURE_TOKENS)
    ids: list[int] = []
    for ex in without_eval_units(examples):  # the pooled held-out text, as the harness' pooled loss reads it
        ids.extend(tokenizer(ex.text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= budget:
            break
    ids = ids[:budget]
    window = min(eval_cfg.seq_len, model.config.max_position_embeddings)
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    total_steps, total_tokens = 0.0, 0
    for i in range(0, len(windows), eval_cfg.batch_size):
        group = windows[i : i + eval_cfg.batch_size]
        length = max(len(w) for w in group)
        batch = torch.full((len(group), length), model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, w in enumerate(group):
            batch[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        with ctx.autocast():
            out = model(input_ids=batch.to(ctx.device), attention_mask=mask.to(ctx.device), logits_to_keep=1)
        n = int(mask.sum())
        total_steps += float(out.refine_steps) * n
        total_tokens += n
    if total_tokens == 0:
        raise ConfigError("the held-out split has no text to measure refinement steps on")
    return total_steps / total_tokens


def _headline(evaluations: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat "<model>/<key>" metrics from per-model evaluations."""
    return {
        f"{name}/{key}": float(values[key])
        for name, values in evaluations.items()
        for key in HEADLINE_KEYS
        if key in values
    }


def _quality_gate(after: dict[str, dict[str, float]], unigram: float, min_gain: float) -> None:
    """Raise QualityGateFailed unless every trained model beats the unigram baseline by ``min_gain``."""
    failing = {name: m for name, m in after.items() if m["unigram_gain"] < min_gain}
    if failing:
        lines = ", ".join(
            f"{name}: loss {m['loss']:.4f} (gain {m['unigram_gain']:.4f})" for name, m in failing.items()
        )
        raise QualityGateFailed(
            f"Cognate models did not learn enough: held-out unigram loss is {unigram:.4f} nats/token and "
            f"min_unigram_gain is {min_gain}, but {lines}. Train longer (trunk.steps), raise the learning rate, "
            f"or use a larger model; nothing was stored."
        )


# --------------------------------------------------------------------------------- pretrained route


def _run_pretrained(inputs: CognateInputs, cfg: CognateConfig, ctx: PhaseContext) -> PhaseOutput:
    """Load the given HF causal LMs and evaluate each; fine-tune the configured siblings of the common base."""
    for path in ([cfg.common_base] if cfg.common_base else []) + list(cfg.base_models):
        if Path(path).is_dir():  # every folder checked before the first one is loaded or evaluated
            refuse_pickles(path, "cognate.base_models" if path in cfg.base_models else "cognate.common_base")
    held_out = inputs.corpus.split(inputs.eval_cfg.split)
    if not held_out:
        raise ConfigError(f"the corpus has no {inputs.eval_cfg.split!r} examples to evaluate on")
    train_examples = inputs.corpus.split("train")
    if cfg.siblings and not train_examples:
        raise ConfigError("the corpus has no training examples; cognate.siblings have nothing to fine-tune on")
    unigram = unigram_loss(train_examples, held_out, inputs.tokenizer, inputs.eval_cfg.ppl_max_tokens)

    named = [("base", cfg.common_base)] if cfg.common_base else []
    named += [(f"model-{i}", path) for i, path in enumerate(cfg.base_models)]
    models: dict[str, nn.Module] = {}
    evaluations: dict[str, dict[str, float]] = {}
    for name, path in named:
        model = _load_pretrained(path, inputs.tokenizer, ctx.device)
        models[name] = model
        evaluations[name] = _evaluate(model, inputs, held_out, unigram, ctx)

    results: dict[str, _StageResult] = {}
    if cfg.siblings:
        stages = _sibling_stages(cfg, ctx, inputs.tokenizer, inputs.corpus, models["base"])
        progress = _Progress(ctx, total=sum(s.train.steps for s in stages))
        for stage, sibling in zip(stages, cfg.siblings):
            model, result = _fine_tune_sibling(models["base"], stage, sibling, train_examples, inputs.tokenizer,
                                               cfg, ctx, progress)
            models[sibling.name], results[sibling.name] = model, result
            evaluations[sibling.name] = _evaluate(model, inputs, held_out, unigram, ctx, tokens_per_s=result.tokens_per_s)

    before = {"base": evaluations["base"]} if cfg.siblings else {}
    after = {name: m for name, m in evaluations.items() if name not in before}
    metrics = {"unigram_loss": unigram, **_headline(evaluations)}
    return PhaseOutput(
        models=models,
        tokenizer=inputs.tokenizer,
        metrics=metrics,
        evaluations={"before": before, "after": after},
        details={
            "params": {name: count_parameters(m) for name, m in models.items()},
            "paths": dict(named),
            "settings": {s.name: {"method": s.method, "data_mix": dict(s.train.data_mix), "steps": s.train.steps,
                                  **({"lora_rank": s.lora.rank} if s.method == "lora" else {})}
                         for s in cfg.siblings},
            "steps_run": sum(r.steps_run for r in results.values()),
            "steps_run_by_stage": {name: r.steps_run for name, r in results.items()},
            "resumed_from": {name: r.resumed_from for name, r in results.items()},
            "unigram_loss": unigram,
            "precision": str(ctx.autocast_dtype() or torch.float32),
        },
        curves={f"{name}/loss": r.curve for name, r in results.items()},
    )


def _sibling_stages(
    cfg: CognateConfig, ctx: PhaseContext, tokenizer: PreTrainedTokenizerBase, corpus: Corpus, base: nn.Module
) -> list[_Stage]:
    """One stage per sibling, each with its seed and a checkpoint digest that names the base's weights."""
    from forge_models.checkpoint import state_digest

    common = {"base": state_digest(base), "seed": ctx.seed, "tokenizer": tokenizer_fingerprint(tokenizer),
              "data": corpus.digest()}
    chat = trains_in_chat(tokenizer)
    stages, offset = [], 0
    for i, sibling in enumerate(cfg.siblings):
        stages.append(_Stage(
            name=sibling.name, train=sibling.train, seed=ctx.seed + 1 + i, act_threshold=1.0, max_refine_steps=1,
            step_offset=offset, chat=chat,
            digest=digest({**common, "stage": sibling.name, "index": i, "sibling": sibling.model_dump(mode="json")}),
        ))
        offset += sibling.train.steps
    return stages


def _fine_tune_sibling(
    base: nn.Module,
    stage: _Stage,
    sibling: Any,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    cfg: CognateConfig,
    ctx: PhaseContext,
    progress: _Progress,
) -> tuple[nn.Module, _StageResult]:
    """A copy of ``base`` fine-tuned by ``sibling`` (full, or LoRA merged back); ``base`` is left untouched."""
    model = copy.deepcopy(base)
    if sibling.method == "lora":
        from peft import LoraConfig, get_peft_model

        from forge_models.baking.config import resolve_targets

        targets = resolve_targets(sibling.lora.targets, getattr(model.config, "model_type", ""),
                                  f"cognate.siblings[{sibling.name}].lora.targets")
        torch.manual_seed(stage.seed)  # peft draws the LoRA A matrices from the global generator
        model = get_peft_model(model, LoraConfig(r=sibling.lora.rank, lora_alpha=sibling.lora.alpha,
                                                 lora_dropout=sibling.lora.dropout, target_modules=list(targets),
                                                 bias="none"))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"cognate.siblings[{sibling.name}].lora.targets {targets} matched no module")
    result = _train_stage(stage, model, examples, tokenizer, cfg, ctx, progress)
    if sibling.method == "lora":
        model = model.merge_and_unload()
    return model.eval(), result


def _load_pretrained(path: str, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> nn.Module:
    """A float32 causal LM from a local folder; ConfigError with the reason if that is impossible."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"cognate.base_models: {path} is not a folder (give local Hugging Face model folders)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"cognate.base_models: {path} has no config.json; it is not a Hugging Face model folder")
    refuse_pickles(folder, "cognate.base_models")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ConfigError(f"cognate.base_models: {path} cannot be loaded as a causal LM: {exc}") from exc
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but {path} embeds only {vocab}; use that model's tokenizer"
        )
    return model.to(device).eval()
