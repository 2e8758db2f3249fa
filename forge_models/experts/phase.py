"""Phase 7 (experts part): one SVF expert per skill on a frozen model, stored as a library, measured.

``run(inputs, cfg, ctx)``:

1. SVD (fp32, once) of every target matrix (MLP only by default, as released);
2. per skill, train z on the **train** split (:mod:`forge_models.experts.train`);
3. write the library to ``inputs.out_dir`` and **reload it** (:func:`load_experts`): everything below is
   measured with the stored experts;
4. on the held-out split (``eval.split``, validation in phases): each expert vs the base on its own skill,
   with the paired-difference bootstrap interval; every expert on every skill (the mixed set); two-pass
   dispatch on the mixed set (the model itself classifies each prompt; unknown -> base) vs the base and
   the best single expert, paired on the same examples;
5. parameter overhead: z entries per expert / base parameters;
6. with ``fewshot_shots`` > 0, few-shot mixing: per skill alpha over the experts by CEM on train-split shots
   (ties broken by the log-likelihood of the correct answers), the mixture measured on the same held-out
   examples against the base and the skill's own expert (:func:`fewshot_mixtures`).

The model's weights are never changed: the phase's output model is its input, bit for bit.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from forge_models.config import EvalConfig
from forge_models.data.synthetic import Corpus, Example
from forge_models.eval import evaluate, paired_difference
from forge_models.eval.stats import bootstrap_interval
from forge_models.experts.dispatch import DISPATCHERS, UNKNOWN, run_grouped
from forge_models.experts.config import ExpertsConfig
from forge_models.experts.library import ExpertLibrary, load_experts, save_experts
from forge_models.experts.svf import decompose, find_targets, z_count
from forge_models.experts.train import SKILLS, Skill, reference_reply, skill_examples, skill_with, train_expert
from forge_models.runtime import ConfigError, PhaseContext, PhaseOutput

__all__ = ["ExpertsConfig", "ExpertsInputs", "run", "skill_outcomes", "skill_effects", "fewshot_alpha",
           "fewshot_mixtures", "answer_loglik"]


@dataclass
class ExpertsInputs:
    model: Any
    tokenizer: Any
    corpus: Corpus
    eval: EvalConfig
    out_dir: Path  # where the library is written (must not exist yet or be empty)


def skill_outcomes(model: Any, tokenizer: Any, skill: Skill, examples: Sequence[Example], eval_cfg: EvalConfig,
                   ctx: PhaseContext) -> list[float]:
    """Per-example 0/1 outcomes of ``skill``'s harness metric on ``examples`` (all of them one skill)."""
    if not examples:
        return []
    cfg = eval_cfg.model_copy(update={"max_examples": len(examples), "ppl_max_tokens": 64})
    outcomes: dict[str, list[float]] = {}
    evaluate(model, tokenizer, list(examples), cfg, ctx, outcomes)
    if len(outcomes.get(skill.metric, [])) != len(examples):
        raise ConfigError(f"harness returned no {skill.metric} outcome for every {skill.name} example")
    return outcomes[skill.metric]


def skill_effects(model: Any, tokenizer: Any, lib: ExpertLibrary, held_out: Sequence[Example], eval_cfg: EvalConfig,
                  ctx: PhaseContext, per_skill: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per skill of ``lib`` with examples in ``held_out`` (at most ``per_skill`` each): the per-example outcomes
    of its harness metric with the base weights and with that skill's expert applied, on the same examples."""
    out = {}
    for k in lib.skills:
        examples = skill_examples(SKILLS[k], held_out)[:per_skill] if k in SKILLS else []
        if not examples:
            continue
        base = skill_outcomes(model, tokenizer, SKILLS[k], examples, eval_cfg, ctx)
        with lib.apply(model, k):
            expert = skill_outcomes(model, tokenizer, SKILLS[k], examples, eval_cfg, ctx)
        out[k] = (base, expert)
    return out


def _interval(values: Sequence[float], cfg: EvalConfig) -> tuple[float, float, float]:
    lo, hi = bootstrap_interval(values, cfg.bootstrap_samples, cfg.bootstrap_seed)
    return float(np.mean(values)), lo, hi


def exemplars_for(skills: Sequence[str], train: Sequence[Example], n: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    out = {}
    for name in skills:
        pool = skill_examples(SKILLS[name], train)
        out[name] = "\n".join(ex.text.strip() for ex in rng.sample(pool, min(n, len(pool))))
    return out


def evaluate_library(model: Any, tokenizer: Any, lib: ExpertLibrary, held_out: Sequence[Example], eval_cfg: EvalConfig,
                     ctx: PhaseContext, *, per_skill: int, dispatch: str, exemplars: dict[str, str], margin: float
                     ) -> tuple[dict[str, float], dict[str, Any]]:
    """Every measurement of step 4 (module docstring) with the library ``lib`` on ``held_out``."""
    skills = lib.skills
    sets = {k: skill_examples(SKILLS[k], held_out)[:per_skill] for k in skills}
    empty = [k for k, v in sets.items() if not v]
    if empty:
        raise ConfigError(f"held-out split has no examples of skills {empty}")
    mixed = [(k, ex) for k in skills for ex in sets[k]]
    # cross[e][k]: outcomes of expert e (or "base") on skill k's examples.
    cross: dict[str, dict[str, list[float]]] = {"base": {k: skill_outcomes(model, tokenizer, SKILLS[k], sets[k],
                                                                           eval_cfg, ctx) for k in skills}}
    for e in skills:
        with lib.apply(model, e):
            cross[e] = {k: skill_outcomes(model, tokenizer, SKILLS[k], sets[k], eval_cfg, ctx) for k in skills}
    m: dict[str, float] = {}
    for k in skills:
        b, a = cross["base"][k], cross[k][k]
        m[f"{k}/base"], m[f"{k}/base_lo"], m[f"{k}/base_hi"] = _interval(b, eval_cfg)
        m[f"{k}/expert"], m[f"{k}/expert_lo"], m[f"{k}/expert_hi"] = _interval(a, eval_cfg)
        m[f"{k}/d"], m[f"{k}/d_lo"], m[f"{k}/d_hi"] = paired_difference(a, b, eval_cfg.bootstrap_samples,
                                                                        eval_cfg.bootstrap_seed)
        m[f"{k}/n"] = float(len(b))
    flat = {e: [v for k in skills for v in cross[e][k]] for e in cross}
    best = max(skills, key=lambda e: float(np.mean(flat[e])))
    # Two-pass dispatch on the mixed set: classify with the base model, then each group with its expert.
    t0 = time.perf_counter()
    labels = DISPATCHERS[dispatch](model, tokenizer, [ex for _, ex in mixed], exemplars, ctx, margin)
    classify_s = time.perf_counter() - t0
    masks_for = {k: {n: t.detach() for n, t in lib.masks(k).items()} for k in skills}
    true_kind = [k for k, _ in mixed]

    def answer(idx: list[int]) -> list[float]:
        out: list[float] = [0.0] * len(idx)
        for k in skills:  # the harness scores each task family by its own metric
            sub = [j for j, i in enumerate(idx) if true_kind[i] == k]
            if sub:
                vals = skill_outcomes(model, tokenizer, SKILLS[k], [mixed[idx[j]][1] for j in sub], eval_cfg, ctx)
                for j, v in zip(sub, vals):
                    out[j] = v
        return out

    routed = run_grouped(model, lib.bases, labels, masks_for, answer)
    m["mixed/n"] = float(len(mixed))
    m["mixed/base"], m["mixed/base_lo"], m["mixed/base_hi"] = _interval(flat["base"], eval_cfg)
    m["mixed/best_single"], m["mixed/best_single_lo"], m["mixed/best_single_hi"] = _interval(flat[best], eval_cfg)
    m["mixed/dispatch"], m["mixed/dispatch_lo"], m["mixed/dispatch_hi"] = _interval(routed, eval_cfg)
    for name, other in (("base", flat["base"]), ("best_single", flat[best])):
        d, lo, hi = paired_difference(routed, other, eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed)
        m[f"mixed/dispatch_minus_{name}"], m[f"mixed/dispatch_minus_{name}_lo"], m[f"mixed/dispatch_minus_{name}_hi"] = d, lo, hi
    m["dispatch/accuracy"] = float(np.mean([lab == k for lab, k in zip(labels, true_kind)]))
    m["dispatch/unknown_share"] = float(np.mean([lab == UNKNOWN for lab in labels]))
    m["dispatch/classify_s"] = classify_s
    details = {"best_single": best, "cross": {e: {k: float(np.mean(v)) for k, v in cross[e].items()} for e in cross},
               "dispatch_counts": {lab: labels.count(lab) for lab in sorted(set(labels))}}
    return m, details


def run(inputs: ExpertsInputs, cfg: ExpertsConfig, ctx: PhaseContext) -> PhaseOutput:
    """Train, store, reload and measure one expert per skill (module docstring)."""
    model, tok, corpus = inputs.model, inputs.tokenizer, inputs.corpus
    held_out = corpus.split(inputs.eval.split)
    train = corpus.split("train")
    for k in cfg.skills:  # every refusal before any compute
        if not skill_examples(SKILLS[k], train):
            raise ConfigError(f"experts.skills: {k!r} has no examples in the train split")
        if not skill_examples(SKILLS[k], held_out):
            raise ConfigError(f"experts.skills: {k!r} has no examples in the {inputs.eval.split} split")
    skills = {k: skill_with(k, cfg.objectives.get(k)) for k in cfg.skills}
    for k in cfg.skills:
        if skills[k].objective == "answer":
            for ex in skill_examples(skills[k], train):
                reference_reply(ex)  # a corpus example without a reply is refused here, not mid-training
    t0 = time.perf_counter()
    bases = decompose(model, find_targets(model, cfg.targets), cfg.ternary_rank)
    svd_s = time.perf_counter() - t0
    z, curves, train_s = {}, {}, {}
    for i, k in enumerate(cfg.skills):
        t1 = time.perf_counter()

        def on_step(step: int, stats: dict[str, float], k: str = k) -> None:
            ctx.tracker.log_metrics({f"{k}/train_{n}": v for n, v in stats.items()}, step)
            ctx.tracker.progress(i * cfg.steps + step + 1, len(cfg.skills) * cfg.steps, f"expert {k}")

        z[k], log = train_expert(model, tok, bases, skills[k], train, cfg.settings(), ctx, seed=ctx.seed * 1000 + i,
                                 on_step=on_step)
        curves[f"{k}/reward"] = [(s, e["reward"]) for s, e in enumerate(log)]
        train_s[k] = time.perf_counter() - t1
    exemplars = exemplars_for(cfg.skills, train, cfg.n_exemplars, ctx.seed)
    meta = {"skills_info": {k: {"metric": skills[k].metric, "objective": skills[k].objective} for k in cfg.skills},
            "dispatch": {"method": cfg.dispatch, "margin": cfg.dispatch_margin, "exemplars": exemplars},
            "config": cfg.model_dump(mode="json")}
    save_experts(inputs.out_dir, bases, z, cfg.max_mult, meta)
    lib = load_experts(inputs.out_dir)  # what is stored is what is measured
    metrics, details = evaluate_library(model, tok, lib, held_out, inputs.eval, ctx, per_skill=cfg.eval_examples,
                                        dispatch=cfg.dispatch, exemplars=exemplars, margin=cfg.dispatch_margin)
    base_params = sum(p.numel() for p in model.parameters())
    metrics["z_per_expert"] = float(z_count(bases))
    metrics["overhead_per_expert"] = z_count(bases) / base_params
    metrics["overhead_all_experts"] = z_count(bases) * len(cfg.skills) / base_params
    metrics["basis_floats"] = float(sum(b.U.numel() + b.S.numel() + b.Vh.numel() for b in bases.values()))
    metrics["svd_s"] = svd_s
    for k, s in train_s.items():
        metrics[f"{k}/train_s"] = s
    details.update({"base_params": base_params, "targets": len(bases),
                    "ternary_targets": sum(b.ternary for b in bases.values())})
    if cfg.fewshot_shots:
        found, details["fewshot_alpha"] = fewshot_mixtures(model, tok, lib, train, held_out, inputs.eval, ctx, cfg)
        metrics.update(found)
    return PhaseOutput(models={"model": model}, tokenizer=tok, metrics=metrics, details=details, curves=curves)


def answer_loglik(model: Any, tokenizer: Any, skill: Skill, examples: Sequence[Example], eval_cfg: EvalConfig,
                  ctx: PhaseContext) -> list[float]:
    """Per example, the summed log-likelihood of its correct answer given its prompt: the labelled choice for the
    multiple-choice skills, the reference completion (``text`` after ``prompt``) for the generative ones."""
    import dataclasses

    from forge_models.eval.harness import choice_scores

    if skill.objective == "choice":
        scores = choice_scores(model, tokenizer, list(examples), eval_cfg, ctx)
        return [float(s[ex.label]) for s, ex in zip(scores, examples)]
    refs = [dataclasses.replace(ex, choices=(ex.text[len(ex.prompt):].rstrip("\n"),), label=0) for ex in examples]
    return [float(s[0]) for s in choice_scores(model, tokenizer, refs, eval_cfg, ctx)]


def fewshot_mixtures(model: Any, tokenizer: Any, lib: ExpertLibrary, train: Sequence[Example],
                     held_out: Sequence[Example], eval_cfg: EvalConfig, ctx: PhaseContext, cfg: ExpertsConfig
                     ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per skill: alpha by CEM on ``cfg.fewshot_shots`` train examples of it (:func:`fewshot_alpha`), then the
    mixture vs the base and vs that skill's own expert on the same held-out examples as every other comparison,
    paired. Returns (metrics ``<skill>/mixture...``, alpha per skill)."""
    rng = random.Random(ctx.seed)
    metrics: dict[str, float] = {}
    alphas: dict[str, dict[str, float]] = {}
    for i, k in enumerate(lib.skills):
        pool = skill_examples(SKILLS[k], train)
        shots = rng.sample(pool, min(cfg.fewshot_shots, len(pool)))
        t0 = time.perf_counter()
        alpha, shot_score, calls = fewshot_alpha(model, tokenizer, lib, k, shots, eval_cfg, ctx,
                                                 population=cfg.cem_population, elite=cfg.cem_elite,
                                                 iterations=cfg.cem_iterations, seed=ctx.seed * 1000 + i)
        held = skill_examples(SKILLS[k], held_out)[: cfg.eval_examples]
        base = skill_outcomes(model, tokenizer, SKILLS[k], held, eval_cfg, ctx)
        with lib.apply(model, alpha=alpha):
            mixed = skill_outcomes(model, tokenizer, SKILLS[k], held, eval_cfg, ctx)
        with lib.apply(model, k):
            own = skill_outcomes(model, tokenizer, SKILLS[k], held, eval_cfg, ctx)
        m = {"mixture": _interval(mixed, eval_cfg)}
        for name, ref in (("base", base), ("expert", own)):
            m[f"mixture_minus_{name}"] = paired_difference(mixed, ref, eval_cfg.bootstrap_samples,
                                                           eval_cfg.bootstrap_seed)
        for name, (v, lo, hi) in m.items():
            metrics.update({f"{k}/{name}": v, f"{k}/{name}_lo": lo, f"{k}/{name}_hi": hi})
        metrics.update({f"{k}/fewshot_score": shot_score, f"{k}/fewshot_evaluations": float(calls),
                        f"{k}/fewshot_s": time.perf_counter() - t0,
                        **{f"{k}/alpha/{e}": a for e, a in alpha.items()}})
        alphas[k] = alpha
    return metrics, alphas


def fewshot_alpha(model: Any, tokenizer: Any, lib: ExpertLibrary, skill: str, shots: Sequence[Example],
                  eval_cfg: EvalConfig, ctx: PhaseContext, *, population: int = 32, elite: float = 0.2,
                  iterations: int = 50, seed: int = 0) -> tuple[dict[str, float], float, int]:
    """Few-shot mixing (Transformer^2's third strategy): alpha over the library's experts by CEM, scored by the
    harness metric of ``skill`` on ``shots`` (a few examples of the target task, never the ones reported), ties
    broken by the mean log-likelihood of the shots' correct answers (as the released code does).

    Returns (alpha, best few-shot score, number of evaluations).
    """
    from forge_models.experts.dispatch import cem

    names = lib.skills
    calls = 0

    def score(a: np.ndarray) -> tuple[float, float]:
        nonlocal calls
        calls += 1
        with lib.apply(model, alpha={k: float(v) for k, v in zip(names, a)}):
            acc = float(np.mean(skill_outcomes(model, tokenizer, SKILLS[skill], shots, eval_cfg, ctx)))
            return acc, float(np.mean(answer_loglik(model, tokenizer, SKILLS[skill], shots, eval_cfg, ctx)))

    res = cem(score, len(names), population=population, elite=elite, iterations=iterations, seed=seed)
    return {k: float(v) for k, v in zip(names, res.best)}, res.best_score, calls
