"""Phase 3 run: Quiet-STaR training of one causal LM on the **train** split, measured on the held-out split.

1. Evaluate the input with the shared harness (``eval_cfg.split``, validation).
2. Add the thought tokens and the mixing head; train ``cfg.steps`` AdamW steps of :func:`quietstar_loss` on
   token windows of the train split only (the test split is never read).
3. Evaluate the trained LM without thoughts with the harness (paired differences against the input), and
   measure with vs without thoughts on held-out examples: per-example next-token NLL on text, and the
   paper's metric on arithmetic — the teacher-forced probability of the answer tokens after "prompt"
   (not generation accuracy; stated as such) — each with a paired bootstrap interval.
4. The mixing weight statistics (|w| on held-out text) are the learning signal: w starts at exactly 0.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from forge_models.config import EvalConfig
from forge_models.data import Corpus
from forge_models.data.stream import TokenSampler
from forge_models.data.synthetic import Example, without_eval_units
from forge_models.eval import evaluate, paired_difference, paired_metrics
from forge_models.eval.harness import ARITH_STOPS, extract_answer
from forge_models.generation import GenerationConfig, eos_ids, prompt_ids
from forge_models.quietstar.config import QuietStarConfig
from forge_models.quietstar.thoughts import QuietStar, Streams, generate_ids, quietstar_loss, thought_logits
from forge_models.runtime import ConfigError, PhaseContext, PhaseOutput, check_finite


@dataclass
class QuietStarInputs:
    """model: the causal LM (copied, not modified); tokenizer: its tokenizer (copied); corpus: train split for
    training, ``eval_cfg.split`` for every measurement; eval_cfg: the shared harness settings."""

    model: Any
    tokenizer: Any
    corpus: Corpus
    eval_cfg: EvalConfig


def run(inputs: QuietStarInputs, cfg: QuietStarConfig, ctx: PhaseContext) -> PhaseOutput:
    """Train and measure; returns models {"model": QuietStar} and its tokenizer (with the thought tokens)."""
    train = inputs.corpus.split("train")
    held = inputs.corpus.split(inputs.eval_cfg.split)
    if not train:
        raise ConfigError("the corpus has no training examples; Quiet-STaR has nothing to train on")
    if not held:
        raise ConfigError(f"the corpus has no {inputs.eval_cfg.split!r} examples to evaluate on")
    if not hasattr(inputs.model, "model") or not hasattr(inputs.model.model, "embed_tokens"):
        raise ConfigError(f"Quiet-STaR supports Llama-family and Cognate causal LMs (a .model trunk with "
                          f"embed_tokens); got {type(inputs.model).__name__}")
    max_pos = getattr(inputs.model.config, "max_position_embeddings", None)
    span = cfg.seq_len + cfg.thought_tokens + 1 + cfg.n_ahead_talk
    if max_pos is not None and span > max_pos:
        raise ConfigError(f"seq_len + thought_tokens + 1 + n_ahead_talk = {span} exceeds the model's "
                          f"max_position_embeddings ({max_pos})")

    model = copy.deepcopy(inputs.model).float().to(ctx.device)
    tokenizer = copy.deepcopy(inputs.tokenizer)
    before_out: dict[str, list[float]] = {}
    before = {k: float(v) for k, v in evaluate(model, tokenizer, held, inputs.eval_cfg, ctx, before_out).items()}
    sampler = TokenSampler(train, tokenizer, cfg.data_mix, cfg.seq_len, cfg.batch_size, ctx.seed)
    texts = _held_texts(tokenizer, held, cfg)
    plain_before = [_plain_nll(model, ids, ctx.device) for ids in texts]

    qs = QuietStar.wrap(model, tokenizer, cfg).to(ctx.device)
    curves, tokens_per_s, w_first = _train(qs, sampler, cfg, ctx)
    qs.eval()
    # The learning signal's other half: the no-thought model's held-out NLL must not rise (paired, same texts).
    plain = {}
    if texts:
        plain_after = [_plain_nll(qs.model, ids, ctx.device) for ids in texts]
        d, lo, hi = paired_difference(plain_after, plain_before, inputs.eval_cfg.bootstrap_samples,
                                      inputs.eval_cfg.bootstrap_seed)
        plain = {"plain_nll_before": sum(plain_before) / len(texts), "plain_nll_after": sum(plain_after) / len(texts),
                 "plain_nll_change": d, "plain_nll_change_lo": lo, "plain_nll_change_hi": hi}

    after_out: dict[str, list[float]] = {}
    after = {k: float(v) for k, v in evaluate(qs.model, tokenizer, held, inputs.eval_cfg, ctx, after_out).items()}
    after.update(paired_metrics(after_out, before_out, inputs.eval_cfg.bootstrap_samples,
                                inputs.eval_cfg.bootstrap_seed))
    thoughts = measure_thoughts(qs, tokenizer, held, cfg, ctx, inputs.eval_cfg)
    metrics = {"quietstar/train_tokens_per_s": tokens_per_s, "quietstar/w_abs_step0": w_first,
               **{f"quietstar/{k}": v for k, v in {**thoughts, **plain}.items()}}
    for name in ("loss", "ppl"):
        if name in before and name in after:
            metrics[f"input/{name}"], metrics[f"quietstar/{name}"] = before[name], after[name]
    return PhaseOutput(
        models={"model": qs}, tokenizer=tokenizer, metrics=metrics,
        evaluations={"before": {"input": before}, "after": {"quietstar": after}},
        details={"params": sum(p.numel() for p in qs.parameters()), "steps_run": cfg.steps,
                 "thoughts": thoughts, "start_id": qs.start_id, "end_id": qs.end_id},
        curves=curves,
    )


def _train(qs: QuietStar, sampler: TokenSampler, cfg: QuietStarConfig, ctx: PhaseContext):
    # The thinking parameters (thought embeddings, mixing head) train at lr; the base model's weights at
    # lr * trunk_lr_scale (0: frozen). Both groups share the warm-up.
    trunk = list(qs.model.parameters())
    flags = [p.requires_grad for p in trunk]
    thinking = [p for n, p in qs.named_parameters() if not n.startswith("model.")]
    groups = [{"params": thinking, "lr": cfg.lr}]
    if cfg.trunk_lr_scale > 0:
        groups.append({"params": trunk, "lr": cfg.lr * cfg.trunk_lr_scale})
    else:
        for p in trunk:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    qs.train()
    try:
        return _steps(qs, sampler, cfg, ctx, opt, sched, groups)
    finally:
        for p, flag in zip(trunk, flags):
            p.requires_grad_(flag)


def _steps(qs: QuietStar, sampler: TokenSampler, cfg: QuietStarConfig, ctx: PhaseContext, opt: torch.optim.Optimizer,
           sched: Any, groups: list[dict]):
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + cfg.seed)
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in ("loss", "plain_nll", "talk_nll", "w_abs", "reward")}
    tokens, elapsed, w_first = 0, 0.0, float("nan")
    for step in range(cfg.steps):
        x = sampler.batch(step).to(ctx.device)
        t0 = time.perf_counter()
        with ctx.autocast():
            out = quietstar_loss(qs, x, gen)
        check_finite(out["loss"], step, "quietstar loss")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        tokens += x.numel()
        if step == 0:
            w_first = float(out["w_abs"])
        for k in curves:
            curves[k].append((step, float(out[k].detach())))
        ctx.tracker.log_metrics({f"quietstar/{k}": float(out[k].detach()) for k in curves}, step)
        loss, w_abs = float(out["loss"].detach()), float(out["w_abs"].detach())
        ctx.tracker.progress(step + 1, cfg.steps, f"loss {loss:.4f} |w| {w_abs:.4f} ({elapsed / (step + 1):.1f} s/step)")
    return curves, tokens / elapsed if elapsed else float("nan"), w_first


def _held_texts(tokenizer: Any, held: Sequence[Example], cfg: QuietStarConfig) -> list[list[int]]:
    """The held-out text examples every NLL comparison uses: their first ``seq_len`` tokens (>= 2 tokens)."""
    held = without_eval_units(held)  # eval sources are reported per source by the harness, not mixed in here
    texts = [ex for ex in held if not ex.prompt][: cfg.eval_examples] or list(held[: cfg.eval_examples])
    ids = [tokenizer.encode(ex.text, add_special_tokens=False)[: cfg.seq_len] for ex in texts]
    return [i for i in ids if len(i) >= 2]


@torch.no_grad()
def _plain_nll(model: Any, ids: list[int], device: torch.device) -> float:
    """Mean next-token NLL of ``ids`` under the plain LM (no thoughts, no mixing)."""
    x = torch.tensor([ids], device=device)
    return F.cross_entropy(model(input_ids=x).logits[0, :-1].float(), x[0, 1:]).item()


@torch.no_grad()
def _example_nll(qs: QuietStar, ids: list[int], budget: int, device: torch.device) -> tuple[float, float]:
    """Mean next-token NLL of ``ids`` thinking ``budget`` tokens at every position, and mean |w| there."""
    x = torch.tensor([ids], device=device)
    logits = thought_logits(qs, x, budget, torch.Generator(device=device).manual_seed(0))
    nll = F.cross_entropy(logits[0, :-1], x[0, 1:]).item()
    w = float("nan")
    if budget:
        st = Streams(qs, x)
        h = st.step(torch.full_like(x, qs.start_id))
        # |w| at the thought-conditioned prediction (thoughts greedy at eval temperature, as in thought_logits)
        for _ in range(budget):
            lg = qs.logits(h)
            lg[..., [qs.start_id, qs.end_id]] = -1e10
            h = st.step(lg.argmax(-1))
        h = st.step(torch.full_like(x, qs.end_id))
        w = qs.head(st.base, h).abs().mean().item()
    return nll, w


@torch.no_grad()
def _answer_logprob(qs: QuietStar, prompt: list[int], answer: list[int], budget: int, device: torch.device) -> float:
    """Teacher-forced log p(answer tokens | prompt) — the paper's metric, not generation accuracy."""
    x = torch.tensor([prompt + answer], device=device)
    logp = torch.log_softmax(thought_logits(qs, x, budget, torch.Generator(device=device).manual_seed(0))[0], -1)
    n = len(prompt)
    return float(sum(logp[n - 1 + i, a] for i, a in enumerate(answer)))


def measure_thoughts(qs: QuietStar, tokenizer: Any, held: Sequence[Example], cfg: QuietStarConfig,
                     ctx: PhaseContext, eval_cfg: EvalConfig) -> dict[str, float]:
    """With vs without thoughts on held-out examples: means, and paired bootstrap intervals of the gain."""
    out: dict[str, float] = {}
    held = without_eval_units(held)
    with_t, without, ws = [], [], []
    for ids in _held_texts(tokenizer, held, cfg):
        n0, _ = _example_nll(qs, ids, 0, ctx.device)
        n1, w = _example_nll(qs, ids, cfg.thought_tokens, ctx.device)
        without.append(n0), with_t.append(n1), ws.append(w)
    if without:
        d, lo, hi = paired_difference(without, with_t, eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed)
        out.update({"nll_without": sum(without) / len(without), "nll_with": sum(with_t) / len(with_t),
                    "nll_gain": d, "nll_gain_lo": lo, "nll_gain_hi": hi, "w_abs_heldout": sum(ws) / len(ws),
                    "n_text": float(len(without))})
    arith = [ex for ex in held if ex.kind == "arithmetic" and ex.prompt and ex.answer][: cfg.eval_examples]
    p_with, p_without = [], []
    for ex in arith:
        # Teacher-forced: the worked solution up to "The answer is", then the answer tokens (full-vocabulary
        # probability, not renormalised over digits as eval_helpers does: deviation, stated in the docs).
        cut = ex.text.rfind(" " + ex.answer + ".")
        if cut <= 0:
            continue
        prompt = tokenizer.encode(ex.text[:cut], add_special_tokens=False)
        answer = tokenizer.encode(" " + ex.answer, add_special_tokens=False)
        prompt = prompt[-max(1, cfg.seq_len - len(answer)):]
        if not prompt or not answer:
            continue
        p_without.append(math.exp(_answer_logprob(qs, prompt, answer, 0, ctx.device)))
        p_with.append(math.exp(_answer_logprob(qs, prompt, answer, cfg.thought_tokens, ctx.device)))
    if p_with:
        d, lo, hi = paired_difference(p_with, p_without, eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed)
        out.update({"answer_prob_without": sum(p_without) / len(p_without),
                    "answer_prob_with": sum(p_with) / len(p_with), "answer_prob_gain": d,
                    "answer_prob_gain_lo": lo, "answer_prob_gain_hi": hi, "n_arith": float(len(p_with))})
    out.update(generated_exact_match(qs, tokenizer, held, cfg, eval_cfg))
    return out


def generated_exact_match(qs: QuietStar, tokenizer: Any, held: Sequence[Example], cfg: QuietStarConfig,
                          eval_cfg: EvalConfig) -> dict[str, float]:
    """Arithmetic answered by greedy generation with ``cfg.thought_tokens`` thoughts before every token and
    without (budget 0), on the same held-out prompts, formatted and checked as the harness does (chat template
    where there is one, one line, "The answer is N"). Also the generation speed of both, timed in the same
    loop (the thought overhead)."""
    tasks = [ex for ex in held if ex.kind == "arithmetic" and ex.prompt and ex.answer][: cfg.gen_examples]
    if not tasks:
        return {}
    gcfg = GenerationConfig(max_new_tokens=eval_cfg.max_new_tokens)
    eos = eos_ids(qs.model, tokenizer)

    def stop(new: list[int]) -> bool:
        return any(s in tokenizer.decode(new, skip_special_tokens=True) for s in ARITH_STOPS)

    hits: dict[int, list[float]] = {0: [], cfg.thought_tokens: []}
    tokens = {b: 0 for b in hits}
    seconds = {b: 0.0 for b in hits}
    for i, ex in enumerate(tasks):
        prompt = prompt_ids(tokenizer, ex.prompt, gcfg)
        for budget in hits:
            t0 = time.perf_counter()
            new = generate_ids(qs, prompt, gcfg.max_new_tokens, budget, eos, seed=i, should_stop=stop)
            seconds[budget] += time.perf_counter() - t0
            tokens[budget] += len(new)
            text = tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]
            hits[budget].append(float(extract_answer(text) == ex.answer))
    off, on = hits[0], hits[cfg.thought_tokens]
    d, lo, hi = paired_difference(on, off, eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed)
    tps_off, tps_on = tokens[0] / seconds[0], tokens[cfg.thought_tokens] / seconds[cfg.thought_tokens]
    return {"gen_em_without": sum(off) / len(off), "gen_em_with": sum(on) / len(on), "gen_em_gain": d,
            "gen_em_gain_lo": lo, "gen_em_gain_hi": hi, "n_gen": float(len(tasks)),
            "gen_tokens_per_s_without": tps_off, "gen_tokens_per_s_with": tps_on,
            "gen_slowdown": tps_off / tps_on}
