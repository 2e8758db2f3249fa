"""Phase 6 — prompt baking: the model behaves, without a prompt, as it behaved with it.

    out = run(BakingInputs(model, tokenizer, train_inputs, heldout_inputs, out_dir=Path("out/model")), cfg, ctx)
    out.metrics["baking/tools/kl_ratio"]      # held-out KL(prompted input || stored baked) / KL(prompted input || input)

Per prompt u, in ``cfg.prompts`` order (sequential baking):

1. A peft LoRA adapter is put on the current model. Every step samples fresh trajectories from the teacher
   for random train inputs x, and minimises the forward KL of the adapted model *without* any prompt (exactly
   the inference template) to it at every generated position (:mod:`forge_models.baking.kl`). The teacher of
   the first bake is the current model *with* u (the PeftModel inside ``disable_adapter()``, no gradient). Of
   a later bake: with ``cfg.sequence`` "chained" (the paper's B(B(theta, u1), u2)) the same, the model after
   the previous bakes with u alone; with "cumulative" (default) the *input* model with every prompt so far.
2. Half-baking is early stopping: at ``cfg.half_bake_steps`` the adapter is saved and its held-out KL measured.
3. The adapter is merged (``merge_and_unload``). For a BitNet model (BitLinear layers) the adapter trained on
   top of the quantised forward pass, and the merge adds its delta to the *latent* weights, which are
   re-ternarised; the phase counts the ternary codes the merge changed and measures the merged model's KL
   against the adapter model's on the same trajectories. No code changed, or less than
   ``cfg.min_merge_kept`` of the reduction kept, fails the phase (QualityGateFailed): the quantisation
   trap must never pass as success.

Then the model is stored (``out_dir``: a Hugging Face folder, or a BitNet packed folder + ``latent/``),
**reloaded**, and the headline KL is measured on the reloaded model, per prompt, against the *input* model
prompted with that prompt, on held-out inputs with a bootstrap interval. Re-prompting (the baked model with
u again) is measured too. When the prompts, joined in order, form a checkable system prompt (a persona and a
tool sentence of the corpus's family), the behaviour is checked too (:mod:`forge_models.baking.behaviour`):
persona rules, tool-loop answers and tool policy of the stored model without the prompt against the input with
it, on held-out system-dialogue questions, with paired intervals. Held-out text (``inputs.retention_texts``:
real text held out from training, and the held-out corpus) is scored per window on the input before baking and
on the stored model after; the rise's paired interval is checked against ``cfg.max_text_loss_rise``.

Deviations: fp32 throughout (no autocast: KLs of 1e-3 and the reload-equality check need it); the default
"cumulative" sequence (chained baking, the paper's, missed the headline target on the tiny model: each prompt
alone is not what the model does with all of them); not resumable mid-bake (a bake of the tiny preset takes
minutes).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from forge_models.baking.behaviour import Case, baked_spec, behaviour_cases, compare, run_cases
from forge_models.baking.config import BakingConfig, BakePrompt, resolve_targets
from forge_models.data.system_prompts import SystemSpec, dialogue_turn
from forge_models.baking.kl import (
    Contexts,
    LogitFn,
    context_ids,
    eos_mask,
    model_logits,
    sample_trajectories,
    teacher_logits,
    trajectory_kl,
    trajectory_logprob,
)
from forge_models.eval.real_text import document_windows, window_losses
from forge_models.eval.stats import bootstrap_interval, paired_difference
from forge_models.generation import eos_ids
from forge_models.runtime import (
    ArtifactIntegrityError,
    ConfigError,
    PhaseContext,
    PhaseOutput,
    QualityGateFailed,
    check_finite,
)

__all__ = ["BakingInputs", "run", "bake_prompt", "measure", "merge_adapter", "save_baked", "load_baked",
           "is_bitnet", "text_retention", "GOAL_RATIO"]

GOAL_RATIO = 0.4
"""The issue's goal: held-out KL of the stored baked model at most 40% of the unbaked model's."""


@dataclass
class BakingInputs:
    """What the phase bakes, and where it stores the result.

    Attributes:
        model: the input causal LM (full precision, or BitLinear layers rebuilt from latent weights).
        tokenizer: its tokenizer (its chat template, if any, is the inference template).
        train_inputs / heldout_inputs: inputs x used for prompts that name none (disjoint).
        out_dir: where the baked model is written and reloaded from (what is stored is what is measured).
        bitnet_meta: for a BitNet input, how to store it: ``packing``, ``kept_dtype``, ``keep_patterns``,
            ``act_norm`` (those of its input folder).
        halfbake_dir: where the half-baked adapters are written (None: not written).
        behaviour_examples: held-out corpus examples whose system dialogues give the behaviour checks'
            questions (:mod:`forge_models.baking.behaviour`; empty: no behaviour checks).
        retention_texts: named held-out documents (real text such as an eval source, or the held-out corpus)
            whose per-window loss is measured on the input before baking and on the stored model after, paired
            (goal: the upper end of the rise <= ``cfg.max_text_loss_rise``); empty: not measured.
        retention_seq_len / retention_max_tokens: window length and token budget per text.
    """

    model: Any
    tokenizer: Any
    train_inputs: Sequence[str]
    heldout_inputs: Sequence[str]
    out_dir: Path
    bitnet_meta: dict[str, Any] | None = None
    halfbake_dir: Path | None = None
    behaviour_examples: Sequence[Any] = ()
    retention_texts: dict[str, Sequence[str]] = field(default_factory=dict)
    retention_seq_len: int = 256
    retention_max_tokens: int = 4096


def is_bitnet(model: Any) -> bool:
    from forge_models.bitnet.layers import BitLinear

    return any(isinstance(m, BitLinear) for m in model.modules())


# ------------------------------------------------------------------------------------------ measuring


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


@torch.no_grad()
def measure(
    teacher: LogitFn, students: dict[str, tuple[LogitFn, bool]], ctxs: Sequence[Contexts], cfg: BakingConfig,
    seed: int, device: torch.device, eos: set[int],
) -> dict[str, np.ndarray]:
    """Per held-out input, the KL per generated token of each student to the prompted teacher.

    The teacher samples ``cfg.eval_samples_per_input`` trajectories per input from a generator seeded by
    (seed, input index), so every call with the same teacher scores the same trajectories: comparisons
    between students, and between calls, are paired. ``students`` maps a name to (logits, sees the prompt).
    Also returns ``lp:<name>`` (mean log-probability per generated token of the teacher's trajectories
    under the student) and ``lp:teacher``.
    """
    out: dict[str, list[float]] = {k: [] for name in students for k in (name, f"lp:{name}")}
    out["lp:teacher"] = []
    for i, c in enumerate(ctxs):
        y = sample_trajectories(teacher, c.prompted, cfg.eval_samples_per_input, cfg.trajectory_tokens,
                                cfg.temperature, _generator(device, seed * 1_000_003 + i), device)
        mask = eos_mask(y, eos)
        tokens = float(mask.sum())
        out["lp:teacher"].append(float(trajectory_logprob(teacher, c.prompted, y, mask).sum()) / tokens)
        for name, (fn, prompted) in students.items():
            out[name].append(float(trajectory_kl(teacher, fn, c, y, mask, student_prompted=prompted).sum()) / tokens)
            ctx_ids = c.prompted if prompted else c.plain
            out[f"lp:{name}"].append(float(trajectory_logprob(fn, ctx_ids, y, mask).sum()) / tokens)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ baking


@dataclass
class Baked:
    """One prompt's bake: the adapted PeftModel (not merged yet) and what was measured along the way."""

    peft_model: Any
    curve: list[tuple[int, float]]
    half_baked: list[tuple[int, float]]  # (step, held-out KL per token), step 0 = before training
    seconds: float


def bake_prompt(
    model: Any, prompt: str, train: Sequence[Contexts], heldout: Sequence[Contexts], cfg: BakingConfig,
    ctx: PhaseContext, *, seed: int, eos: set[int], name: str = "prompt", halfbake_dir: Path | None = None,
    teacher: LogitFn | None = None,
) -> Baked:
    """Train a LoRA adapter on ``model`` so that, without ``prompt``, it matches ``model`` with it (see the
    module docstring). ``model`` becomes the PeftModel's base (not copied). ``teacher``: another frozen model
    to match instead (the cumulative sequence: the input model with every prompt so far, in the contexts)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    targets = resolve_targets(cfg.lora.targets, getattr(model.config, "model_type", ""))
    torch.manual_seed(seed)  # LoRA A initialisation (peft draws from the global generator)
    pm = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                          target_modules=list(targets), bias="none"))
    pm.eval()  # no dropout; Cognate's refiner behaves as at inference. Gradients still flow.
    teacher, student = (teacher if teacher is not None else teacher_logits(pm)), model_logits(pm)
    params = [p for p in pm.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"baking.lora.targets {targets} matched no module of {type(model).__name__}")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(seed)
    gen = _generator(ctx.device, seed)
    eval_seed = seed + 1
    half = [(0, float(measure(teacher, {"s": (student, False)}, heldout, cfg, eval_seed, ctx.device, eos)["s"].mean()))]
    curve: list[tuple[int, float]] = []
    n_traj = cfg.inputs_per_step * cfg.samples_per_input
    t0 = time.monotonic()
    for step in range(1, cfg.steps + 1):
        total, tokens = 0.0, 0.0
        for c in (train[rng.randrange(len(train))] for _ in range(cfg.inputs_per_step)):
            y = sample_trajectories(teacher, c.prompted, cfg.samples_per_input, cfg.trajectory_tokens,
                                    cfg.temperature, gen, ctx.device)
            mask = eos_mask(y, eos)
            loss = trajectory_kl(teacher, student, c, y, mask).sum() / n_traj  # the authors' normalisation
            loss.backward()
            total += float(loss.detach())
            tokens += float(mask.sum())
        check_finite(total, step, "baking KL")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        per_token = total * n_traj / max(tokens, 1.0)
        curve.append((step, per_token))
        ctx.tracker.log_metrics({f"baking/{name}/train_kl_per_token": per_token}, step=step)
        ctx.tracker.progress(step, cfg.steps, f"{name}: train KL/token {per_token:.4f}")
        if step in cfg.half_bake_steps or step == cfg.steps:
            kl = float(measure(teacher, {"s": (student, False)}, heldout, cfg, eval_seed, ctx.device, eos)["s"].mean())
            half.append((step, kl))
            ctx.tracker.log_metrics({f"baking/{name}/heldout_kl": kl}, step=step)
            if halfbake_dir is not None and step != cfg.steps:
                import safetensors.torch

                folder = Path(halfbake_dir) / name
                folder.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(pm).items()}
                safetensors.torch.save_file(state, str(folder / f"step-{step:06d}.safetensors"))
    return Baked(pm, curve, half, time.monotonic() - t0)


def merge_adapter(pm: Any) -> tuple[Any, dict[str, float]]:
    """Merge the adapter into the weights (``merge_and_unload``); for BitLinear layers count the ternary codes
    the merge changed and the merged delta's size in quantisation steps (mean|W|, the absmean step)."""
    from forge_models.bitnet.layers import BitLinear
    from forge_models.bitnet.quant import weight_quant

    bases = {n: m for n, m in pm.named_modules() if isinstance(m, BitLinear)}
    before = {n: (m.weight.detach().clone(), weight_quant(m.weight)[0]) for n, m in bases.items()}
    merged = pm.merge_and_unload()
    if not before:
        return merged, {}
    changed = total = 0
    ratios = []
    for n, m in bases.items():  # the same module objects, now with merged latent weights
        w0, q0 = before[n]
        q1 = weight_quant(m.weight)[0]
        changed += int((q1 != q0).sum())
        total += q0.numel()
        delta = (m.weight.detach() - w0).float()
        ratios.append(float(delta.pow(2).mean().sqrt() / w0.abs().mean().clamp(min=1e-12)))
    return merged, {"codes_changed": float(changed), "codes_total": float(total),
                    "codes_changed_share": changed / max(total, 1), "delta_rms_over_step": float(np.mean(ratios))}


# ------------------------------------------------------------------------------------------ storing


def save_baked(model: Any, tokenizer: Any, folder: Path, bitnet_meta: dict[str, Any] | None) -> None:
    """Write the baked model as its input was stored: a Hugging Face folder, or packed BitNet + ``latent/``."""
    folder = Path(folder)
    if bitnet_meta is None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return
    from forge_models.bitnet import LATENT_DIR, export_packed, save_latent

    export_packed(model, folder, tokenizer=tokenizer, packing=bitnet_meta["packing"],
                  kept_dtype=bitnet_meta["kept_dtype"])
    save_latent(model, folder / LATENT_DIR, keep_patterns=bitnet_meta["keep_patterns"],
                act_norm=bitnet_meta["act_norm"])


def load_baked(folder: Path, bitnet_meta: dict[str, Any] | None, device: torch.device) -> Any:
    """Reload what :func:`save_baked` wrote (BitNet: the BitLinear model from the latent weights, which at full
    strength and without gradients computes the packed model's integer product bit for bit)."""
    from transformers import AutoModelForCausalLM

    if bitnet_meta is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    from forge_models.bitnet import LATENT_DIR, load_latent

    return load_latent(Path(folder) / LATENT_DIR).to(device).eval()


# ------------------------------------------------------------------------------------------ the phase


def _contexts(tokenizer: Any, prompt: str, xs: Sequence[str], limit: int, tokens: int) -> tuple[list[Contexts], list[str]]:
    """Contexts of the inputs whose prompted context plus a trajectory fits the model, and those inputs."""
    pairs = [(context_ids(tokenizer, prompt, x), x) for x in xs]
    kept = [(c, x) for c, x in pairs if len(c.prompted) + tokens <= limit]
    return [c for c, _ in kept], [x for _, x in kept]


def _interval_metrics(prefix: str, values: np.ndarray, cfg_seed: int) -> dict[str, float]:
    lo, hi = bootstrap_interval(values, seed=cfg_seed)
    return {prefix: float(values.mean()), f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def text_retention(prefix: str, before: Sequence[float], after: Sequence[float], bound: float,
                   seed: int) -> dict[str, float]:
    """Loss per window before and after baking (same windows), the paired rise with its 95% interval, and the
    goal: met when the interval's upper end is <= ``bound`` nats/token."""
    if len(before) != len(after):
        raise ArtifactIntegrityError(f"{prefix}: {len(before)} windows before baking, {len(after)} after; the "
                                     "stored model must see the same windows as its input")
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    d, lo, hi = paired_difference(a, b, seed=seed)
    return {f"{prefix}/loss_before": float(b.mean()), f"{prefix}/loss_after": float(a.mean()),
            f"{prefix}/ppl_before": float(np.exp(b.mean())), f"{prefix}/ppl_after": float(np.exp(a.mean())),
            f"{prefix}/loss_rise": d, f"{prefix}/loss_rise_lo": lo, f"{prefix}/loss_rise_hi": hi,
            f"{prefix}/windows": float(len(b)), f"{prefix}/bound": float(bound), f"{prefix}/goal_met": float(hi <= bound)}


def _behaviour(input_model: Any, stored: Any, tok: Any, cases: Sequence[Case], spec: SystemSpec, cfg: BakingConfig,
               ctx: PhaseContext, limit: int, seed: int) -> dict[str, float]:
    """Persona rules, tool-loop answers and tool policy: input with the prompt, input and stored model without."""
    kw = dict(ctx=ctx, max_new_tokens=cfg.behaviour_max_new_tokens, max_positions=limit)
    runs = {"input_prompted": run_cases(input_model, tok, cases, spec, prompted=True, **kw),
            "input_plain": run_cases(input_model, tok, cases, spec, prompted=False, **kw),
            "baked_plain": run_cases(stored, tok, cases, spec, prompted=False, **kw)}
    return compare(runs, "baked_plain", "baking/behaviour", seed)


def run(inputs: BakingInputs, cfg: BakingConfig, ctx: PhaseContext) -> PhaseOutput:
    """Bake every prompt of ``cfg.prompts`` in order; store, reload and measure (module docstring).

    Raises:
        ConfigError: no prompts, no usable inputs, or LoRA targets that match nothing (before any training).
        QualityGateFailed: a merge erased the bake (BitNet: no ternary code changed, or less than
            ``cfg.min_merge_kept`` of the KL reduction survived the merge).
        ArtifactIntegrityError: the reloaded model's KL differs from the in-memory model's.
    """
    if not cfg.prompts:
        raise ConfigError("baking.prompts is empty: name at least one prompt to bake (forge phase baking --prompt FILE)")
    seed = ctx.seed if cfg.seed is None else cfg.seed
    device = ctx.device
    model = inputs.model.to(device).float().eval()
    tok = inputs.tokenizer
    eos = eos_ids(model, tok)
    limit = int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    bitnet = is_bitnet(model)
    if bitnet and inputs.bitnet_meta is None:
        raise ConfigError("a BitNet model (BitLinear layers) needs bitnet_meta to be stored as packed + latent")

    # Every prompt's contexts are built, and refused if unusable, before any training.
    plans: list[tuple[BakePrompt, str, list[Contexts], list[Contexts]]] = []
    details: dict[str, Any] = {"prompts": {}, "bitnet": bitnet}
    held_text: dict[str, list[str]] = {}
    train_text: dict[str, list[str]] = {}
    for p in cfg.prompts:
        text = p.prompt_text()
        train_x = list(p.train_inputs or inputs.train_inputs)
        held_x = list(p.heldout_inputs or inputs.heldout_inputs)[: cfg.max_heldout_inputs]
        if set(train_x) & set(held_x):
            held_x = [x for x in held_x if x not in set(train_x)]  # never measure on an input trained on
        train, train_text[p.name] = _contexts(tok, text, train_x, limit, cfg.trajectory_tokens)
        held, held_text[p.name] = _contexts(tok, text, held_x, limit, cfg.trajectory_tokens)
        if not train or len(held) < 2:
            raise ConfigError(f"baking prompt {p.name!r}: {len(train)} train and {len(held)} held-out inputs fit "
                              f"{limit} positions with {cfg.trajectory_tokens} trajectory tokens (need >= 1 and >= 2); "
                              "shorten the prompt or trajectory_tokens, or give inputs")
        plans.append((p, text, train, held))
        details["prompts"][p.name] = {"prompt_tokens": len(held[0].prompted) - len(held[0].plain),
                                      "train_inputs": len(train), "heldout_inputs": len(held),
                                      "dropped_too_long": len(train_x) + len(held_x) - len(train) - len(held)}
    for name, docs in inputs.retention_texts.items():  # refused here, not after the bake
        if not document_windows(docs, tok, min(inputs.retention_seq_len, limit), inputs.retention_max_tokens):
            raise ConfigError(f"baking: held-out text {name!r} yields no window of 2 or more tokens; its loss "
                              "before and after baking is undefined (give it text, or leave it out)")
    # The final model carries every baked prompt, so its target is the input with all of them in the system
    # slot (in baking order, joined by a space: one system message); with one prompt this is just that prompt.
    combined = " ".join(text.strip() for _p, text, _t, _h in plans)
    spec = baked_spec([text for _p, text, _t, _h in plans])
    trained_on = {x for p in cfg.prompts for x in (p.train_inputs or inputs.train_inputs)}
    cases = [] if spec is None or not cfg.max_behaviour_inputs else [
        c for c in behaviour_cases(inputs.behaviour_examples, spec, cfg.max_behaviour_inputs)
        if dialogue_turn(c.question) not in trained_on]
    details["behaviour"] = {"spec": None if spec is None else {"persona": spec.persona, "tools": list(spec.tools)},
                            "cases": len(cases)}
    finals = []
    for p, _text, _train, held in plans:
        held_all, _ = _contexts(tok, combined, held_text[p.name], limit, cfg.trajectory_tokens)
        if len(held_all) < 2:
            raise ConfigError(f"baking prompt {p.name!r}: with all {len(plans)} prompts together fewer than 2 held-out "
                              f"inputs fit {limit} positions; shorten the prompts or trajectory_tokens")
        finals.append(held_all)
    # Cumulative sequence: bake k > 1 distils the input with prompts 1..k (its contexts carry them all).
    bakes: list[tuple[list[Contexts], list[Contexts]]] = []
    for i, (p, _text, train, held) in enumerate(plans):
        if cfg.sequence == "cumulative" and i > 0:
            joint = " ".join(t.strip() for _p, t, _t, _h in plans[: i + 1])
            train, _ = _contexts(tok, joint, train_text[p.name], limit, cfg.trajectory_tokens)
            held, _ = _contexts(tok, joint, held_text[p.name], limit, cfg.trajectory_tokens)
            if not train or len(held) < 2:
                raise ConfigError(f"baking prompt {p.name!r}: with prompts 1..{i + 1} together {len(train)} train and "
                                  f"{len(held)} held-out inputs fit {limit} positions; shorten the prompts or "
                                  "trajectory_tokens, or bake with sequence 'chained'")
        bakes.append((train, held))

    # Held-out text before any bake (the bake changes ``model`` in place); after, on the stored model.
    retention = {name: window_losses(model, tok, docs, inputs.retention_seq_len, inputs.retention_max_tokens, device)
                 for name, docs in inputs.retention_texts.items()}
    input_model = copy.deepcopy(model).eval()
    for q in input_model.parameters():
        q.requires_grad_(False)
    metrics: dict[str, float] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    current = model
    for i, ((p, text, _train, _held), (train, held)) in enumerate(zip(plans, bakes)):
        base = copy.deepcopy(current).eval()  # the model before this bake, kept to check the merge against
        # Chained (and any first bake): the teacher is the model before this bake, prompted with this prompt.
        # Cumulative: the input model, prompted with every prompt so far (in the contexts).
        teach = model_logits(input_model) if cfg.sequence == "cumulative" and i > 0 else None
        baked = bake_prompt(current, text, train, held, cfg, ctx, seed=seed + 7919 * i, eos=eos, name=p.name,
                            halfbake_dir=inputs.halfbake_dir, teacher=teach)
        teach = teach or model_logits(base)
        curves[f"{p.name}/train_kl"] = baked.curve
        curves[f"{p.name}/heldout_kl"] = baked.half_baked
        adapter_fn = model_logits(baked.peft_model)
        m_seed = seed + 104729 * (i + 1)
        pre = measure(teach, {"adapter": (adapter_fn, False), "base": (model_logits(base), False)},
                      held, cfg, m_seed, device, eos)
        current, merge_facts = merge_adapter(baked.peft_model)
        post = measure(teach, {"merged": (model_logits(current), False)}, held, cfg, m_seed, device, eos)
        gained = float(pre["base"].mean() - pre["adapter"].mean())
        kept = float(pre["base"].mean() - post["merged"].mean()) / gained if gained > 0 else float("nan")
        d = details["prompts"][p.name]
        d.update({"half_baked": baked.half_baked, "seconds": baked.seconds, "merge": merge_facts,
                  "kl_base": float(pre["base"].mean()), "kl_adapter": float(pre["adapter"].mean()),
                  "kl_merged": float(post["merged"].mean()), "merge_kept": kept})
        metrics.update({f"baking/{p.name}/kl_adapter": float(pre["adapter"].mean()),
                        f"baking/{p.name}/kl_merged": float(post["merged"].mean()),
                        f"baking/{p.name}/merge_kept": kept, f"baking/{p.name}/bake_seconds": baked.seconds,
                        **{f"baking/{p.name}/{k}": v for k, v in merge_facts.items()}})
        if bitnet and merge_facts.get("codes_changed", 0) == 0:
            raise QualityGateFailed(
                f"baking prompt {p.name!r}: merging the adapter into the latent weights changed no ternary code "
                f"(delta RMS = {merge_facts['delta_rms_over_step']:.3g} quantisation steps): the bake vanished "
                f"in re-ternarisation (adapter KL {pre['adapter'].mean():.4f}, merged {post['merged'].mean():.4f}, "
                f"unbaked {pre['base'].mean():.4f}). Raise baking.lr or baking.steps.")
        if gained > 0 and kept < cfg.min_merge_kept:
            raise QualityGateFailed(
                f"baking prompt {p.name!r}: the merged model keeps {kept:.1%} of the adapter's KL reduction "
                f"(unbaked {pre['base'].mean():.4f}, adapter {pre['adapter'].mean():.4f}, merged "
                f"{post['merged'].mean():.4f}; baking.min_merge_kept {cfg.min_merge_kept})"
                + (f"; {merge_facts['codes_changed_share']:.2%} of ternary codes changed" if bitnet else ""))
        del base

    # Store, reload, and measure the reloaded model: what is stored is what is measured.
    current.eval()
    save_baked(current, tok, inputs.out_dir, inputs.bitnet_meta)
    stored = load_baked(inputs.out_dir, inputs.bitnet_meta, device)
    details["combined_prompt_tokens"] = len(finals[0][0].prompted) - len(finals[0][0].plain)
    for i, ((p, _text, _train, _held), held) in enumerate(zip(plans, finals)):
        r = measure(model_logits(input_model), {
            "input": (model_logits(input_model), False), "stored": (model_logits(stored), False),
            "memory": (model_logits(current), False), "stored_reprompted": (model_logits(stored), True),
        }, held, cfg, seed + 15485863 * (i + 1), device, eos)
        reload_diff = float(np.abs(r["stored"] - r["memory"]).max())
        if reload_diff > 1e-4 * max(1.0, float(r["memory"].max())):
            raise ArtifactIntegrityError(f"baking prompt {p.name!r}: the reloaded model's held-out KL differs from "
                                         f"the in-memory model's by {reload_diff:.3g} nats/token")
        pre_ = f"baking/{p.name}"
        half = details["prompts"][p.name]["half_baked"]
        metrics.update(_interval_metrics(f"{pre_}/kl_input", r["input"], seed))
        metrics.update(_interval_metrics(f"{pre_}/kl_baked", r["stored"], seed))
        metrics.update(_interval_metrics(f"{pre_}/kl_reprompted", r["stored_reprompted"], seed))
        ratio = float(r["stored"].mean() / r["input"].mean()) if r["input"].mean() > 0 else float("nan")
        # The goal KL_baked <= 0.4 KL_input as a paired difference over held-out inputs: met when hi < 0.
        diff, lo, hi = paired_difference(r["stored"], GOAL_RATIO * r["input"], seed=seed)
        amp, alo, ahi = paired_difference(r["lp:stored_reprompted"], r["lp:teacher"], seed=seed)
        metrics.update({f"{pre_}/kl_ratio": ratio, f"{pre_}/goal_margin": diff, f"{pre_}/goal_margin_lo": lo,
                        f"{pre_}/goal_margin_hi": hi, f"{pre_}/goal_met": float(hi < 0),
                        f"{pre_}/reload_kl_diff": reload_diff, f"{pre_}/n_heldout": float(len(held)),
                        f"{pre_}/reprompt_logprob_gain": amp, f"{pre_}/reprompt_logprob_gain_lo": alo,
                        f"{pre_}/reprompt_logprob_gain_hi": ahi,
                        f"{pre_}/halfbake_decreasing": float(all(b[1] < a[1] for a, b in zip(half, half[1:])))})
    if len(cases) >= 2:
        metrics.update(_behaviour(input_model, stored, tok, cases, spec, cfg, ctx, limit, seed))
    for name, before in retention.items():
        after = window_losses(stored, tok, inputs.retention_texts[name], inputs.retention_seq_len,
                              inputs.retention_max_tokens, device)
        metrics.update(text_retention(f"baking/text/{name}", before, after, cfg.max_text_loss_rise, seed))
    details["params"] = sum(q.numel() for q in stored.parameters())
    del input_model
    return PhaseOutput(models={"model": stored}, tokenizer=tok, metrics=metrics, details=details, curves=curves)

