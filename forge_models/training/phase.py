"""Phase 5 — the Forge training loop: ten stages, Grokfast, an edge-of-chaos curriculum, dreams, self-modelling.

1. Copy the input model (any Hugging Face causal LM: Cognate, or a BitNet-converted model whose
   BitLinear layers train their latent fp32 weights through the quantised forward pass) to float32 on
   ``ctx.device``; evaluate it with the shared harness ("before", key "input").
2. Run the stages of ``cfg.stages`` in order (default ten: 1-3 base adaptation, 4-6 ramp to the edge of
   chaos, 7-8 dream consolidation, 9-10 self-modelling and stabilisation). Each step:
   - the batch is a pure function of (seed, step, difficulty, dream buffer): real corpus rows from
     :class:`TokenSampler`, plus in curriculum stages ``curriculum.batch_fraction`` of the rows packed
     with generated tasks at the controller's difficulty, plus in replay stages ``dreams.replay_ratio``
     of the rows packed with kept dreams;
   - loss = LM loss (+ the self-model head's loss; the trunk gets ``weight x stage multiplier`` of its
     gradient, see :mod:`forge_models.training.selfmodel`); NaN/inf, or a loss above 4 x ln(vocab),
     raises :class:`TrainingDiverged`;
   - ``backward()`` -> Grokfast filter (if enabled) -> gradient noise ``chaos x RMS(g) x N(0, 1)`` per
     tensor (stage chaos <= ``chaos_max`` <= 0.3, halved while the loss is too noisy) -> gradient clip ->
     AdamW step. Learning rate: linear warm-up, constant, linear decay in ``lr_decay`` stages.
3. Every ``eval_every`` steps of a stage (and at its budget) a *check* measures the held-out loss on
   ``check_tokens`` tokens of the corpus' **validation** split, the self-model loss against its copy
   baseline, and in curriculum stages the answer-checked success on ``curriculum.window`` fresh tasks
   (see :mod:`forge_models.training.curriculum`), which moves the difficulty. A check loss more than
   ``max_regression`` above the best so far rolls the model (and head) back to the best state, resets the
   optimizer and Grokfast state and halves the chaos; the rollback is listed in ``details["rollbacks"]``.
4. A stage ends at the first check where its exit criterion holds ("criterion") or at its step budget
   ("budget"): an unmet criterion never ends a stage early. Criteria:
   ``warmed_up`` (warm-up over and check loss <= entry loss), ``val_improved`` (<= entry - min_improvement),
   ``val_plateau`` (relative change between two checks of the stage <= plateau_tol), ``in_band``
   (``band_checks`` consecutive in-band measurements in the stage), ``dreams_kept`` (>= min_cycles dream
   cycles and >= 1 kept dream in the stage, check loss <= entry + stable_tol), ``self_model_fit`` (head
   loss <= fit_ratio x copy baseline), ``stable`` (``stable_checks`` consecutive checks within stable_tol
   of the best). Each stage also states an entry criterion (its feature is enabled, the model is within
   max_regression of the best); one that is unmet is recorded and the stage runs as plain training.
5. Dream stages run a dream cycle every ``dreams.every`` steps (:mod:`forge_models.training.dreams`).
6. Evaluate the trained model with the harness ("after", key "model"); fail the quality gate if its
   held-out loss rose by more than ``max_loss_increase`` over the input's.

The output model is the trained LM alone (the self-model head is not part of it). Checkpoints (when
``ctx.checkpoint_dir`` is set) live in ``<checkpoint_dir>/forge/step-XXXXXX/`` in the shared format of
:mod:`forge_models.checkpoint`: ``model.safetensors`` holds the model, the self-model head, the best
state kept for rollbacks and the Grokfast buffers; ``optimizer.pt`` the optimizer and RNG; ``state.json``
the stage, step, curriculum, dream buffer, records and curves. Resuming reproduces the uninterrupted run
exactly (same batches, same dreams, same probes); a finished run is loaded instead of retrained; a
checkpoint written for another input, config, data or tokenizer is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from forge_models.checkpoint import digest as checkpoint_digest
from forge_models.checkpoint import state_digest, tokenizer_fingerprint
from forge_models.config import HEADLINE_METRICS, EvalConfig
from forge_models.data import Corpus
from forge_models.eval import evaluate, paired_metrics
from forge_models.runtime import ConfigError, PhaseContext, PhaseOutput, QualityGateFailed, translate_oom
from forge_models.training.config import TrainingConfig
from forge_models.training.curriculum import difficulty_knobs
from forge_models.training.loop import Loop
from forge_models.training.loop import quant_lambda as loop_quant_lambda

__all__ = ["TrainingInputs", "run"]

@dataclass
class TrainingInputs:
    """What the Forge loop consumes.

    Attributes:
        model: the causal LM to train (not modified: the phase trains a float32 copy).
        tokenizer: its tokenizer (a fast tokenizer: answer positions use offset mappings).
        corpus: training rows come from its train split, checks from its validation split; curriculum
            and dream tasks whose prompt is in its validation or test split are never generated.
        eval_cfg: settings of the shared harness (before/after evaluation on ``eval_cfg.split``).
    """

    model: nn.Module
    tokenizer: Any
    corpus: Corpus
    eval_cfg: EvalConfig


def run(inputs: TrainingInputs, cfg: TrainingConfig, ctx: PhaseContext) -> PhaseOutput:
    """Run the Forge training loop; see the module docstring. Raises ForgeError subclasses on failure."""
    try:
        return _run(inputs, cfg, ctx)
    except RuntimeError as exc:
        translated = translate_oom(exc)
        if translated is exc:
            raise
        raise translated from exc


def _run(inputs: TrainingInputs, cfg: TrainingConfig, ctx: PhaseContext) -> PhaseOutput:
    corpus, tokenizer = inputs.corpus, inputs.tokenizer
    if not corpus.split("train"):
        raise ConfigError("the corpus has no training examples; the Forge loop has nothing to train on")
    if not corpus.split("validation"):
        raise ConfigError("the corpus has no validation examples; the loop's checks and rollbacks need them")
    held_out = corpus.split(inputs.eval_cfg.split)
    if not held_out:
        raise ConfigError(f"the corpus has no {inputs.eval_cfg.split!r} examples to evaluate on")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError("the tokenizer has no eos token; training rows separate documents with it")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("the Forge loop needs a fast tokenizer (answer positions use offset mappings)")

    model = copy.deepcopy(inputs.model).float().to(ctx.device)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise ConfigError(f"training.seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {limit}")
    quant_lambda = loop_quant_lambda(model)
    outcomes: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}  # per-example, for paired diffs
    before = _evaluate(model, inputs, held_out, ctx, outcomes)
    digest = checkpoint_digest({
        "config": cfg.model_dump(mode="json", exclude={"checkpoint_every", "max_loss_increase"}),
        "seed": ctx.seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": corpus.digest(),
        "input_model": state_digest(model),
    })

    loop = Loop(model, tokenizer, corpus, cfg, ctx, digest)
    try:
        loop.train()
        self_model = loop.measure_self_model()
    finally:
        loop.close()
    model.eval()
    after = _evaluate(model, inputs, held_out, ctx, outcomes)
    increase = after["loss"] - before["loss"]
    if increase > cfg.max_loss_increase:
        raise QualityGateFailed(
            f"the Forge loop made the model worse: held-out loss {before['loss']:.4f} -> {after['loss']:.4f} "
            f"(+{increase:.4f}) but training.max_loss_increase is {cfg.max_loss_increase}. Lower lr or chaos, raise "
            f"the real-data share (curriculum.batch_fraction, dreams.replay_ratio), or tighten max_regression; "
            f"nothing was stored."
        )

    s = loop.s
    records = s.records
    cycles = s.dream_cycles
    history = loop.controller.history
    metrics: dict[str, float] = {
        f"{name}/{key}": float(values[key])
        for name, values in (("input", before), ("model", after))
        for key in HEADLINE_METRICS
        if key in values
    }
    metrics.update({
        "model/loss_change": increase,
        "steps": float(s.step),
        "stages/by_criterion": float(sum(r["ended_by"] == "criterion" for r in records)),
        "stages/by_budget": float(sum(r["ended_by"] == "budget" for r in records)),
        "rollbacks": float(len(s.rollbacks)),
        "best_check_loss": float(s.best_val),
        "dream/cycles": float(len(cycles)),
        "dream/generated": float(sum(c["generated"] for c in cycles)),
        "dream/kept": float(sum(c["kept"] for c in cycles)),
        "train_seconds": float(sum(r["seconds"] for r in records)),
    })
    if history:
        metrics["curriculum/final_difficulty"] = loop.controller.difficulty
        metrics["curriculum/final_success"] = history[-1]["success"]
        metrics["curriculum/in_band_fraction"] = sum(h["in_band"] for h in history) / len(history)
    metrics.update({f"self_model/{k}": float(v) for k, v in self_model.items() if isinstance(v, (int, float))})
    if quant_lambda is not None:
        metrics["lambda"] = quant_lambda

    details: dict[str, Any] = {
        "stages": records,
        "rollbacks": s.rollbacks,
        "events": s.events,
        "dreams": {
            "cycles": cycles,
            "generated": sum(c["generated"] for c in cycles),
            "kept": sum(c["kept"] for c in cycles),
            "buffer_size": len(s.dream_buffer),
            "examples": s.dream_buffer[:3],
        },
        "curriculum": {
            "band": [cfg.curriculum.band_low, cfg.curriculum.band_high],
            "history": history,
            "final_difficulty": loop.controller.difficulty,
            "final_knobs": difficulty_knobs(loop.controller.difficulty, cfg.curriculum.min_operand,
                                            cfg.curriculum.max_operand),
            "probe_stream": "sha256('forge-curriculum:probe:<seed>:<check>'), validation/test prompts excluded",
        },
        "self_model": self_model,
        "grokfast": cfg.grokfast.model_dump() if cfg.grokfast.enabled else None,
        "lambda": quant_lambda,
        "steps_run": loop.steps_run,
        "resumed_from": loop.resumed_from,
        "check_split": "validation",
        "precision": str(ctx.autocast_dtype() or torch.float32),
    }
    return PhaseOutput(
        models={"model": model},
        tokenizer=tokenizer,
        metrics=metrics,
        evaluations={"before": {"input": before}, "after": {"model": after}},
        details=details,
        curves={k: [(int(a), float(b)) for a, b in v] for k, v in s.curves.items()},
    )


def _evaluate(model: nn.Module, inputs: TrainingInputs, held_out: Sequence[Any], ctx: PhaseContext,
              outcomes: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Harness metrics; the second call (after) adds paired differences to the first (before), same examples."""
    when = "after" if outcomes["before"] else "before"
    cfg = inputs.eval_cfg
    values = {k: float(v) for k, v in evaluate(model, inputs.tokenizer, held_out, cfg, ctx, outcomes[when]).items()}
    if when == "after":
        values.update(paired_metrics(outcomes["after"], outcomes["before"], cfg.bootstrap_samples, cfg.bootstrap_seed))
    return values
