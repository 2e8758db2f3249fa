"""SVF experts on a small trained model: each expert vs the base on its own skill, overhead, dispatch.

    # a tiny Cognate trunk (tiny preset, no variants) and its corpus, then the bench:
    forge phase cognate --preset tiny --set 'cognate.variants=[{name: v, max_refine_steps: 1, train: {steps: 20,
        batch_size: 16, seq_len: 128, lr: 0.001, warmup_steps: 5}}]' --set cognate.trunk.steps=600 \
        --store file:///tmp/exb/store --out /tmp/exb/cognate
    OMP_NUM_THREADS=1 python bench/experts_bench.py --model /tmp/exb/cognate/trunk \
        --corpus /tmp/exb/store/data/<key>/corpus --out bench/results/experts_tiny.json
    # plus few-shot mixing (alpha by CEM, population 32, elite 0.2, 50 iterations, on 8 validation shots):
    ... --cem-shots 8 --out bench/results/experts_tiny_cem.json

Everything is measured on the **test** split (never trained on; experts train on the train split); the
"best single expert" comparator is picked on that same test set, which can only favour it. Intervals: 95%
percentile bootstrap, paired on the same examples (forge_models.eval.stats).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import forge_models  # noqa: F401  (registers Cognate)
from forge_models.config import EvalConfig
from forge_models.data import Corpus
from forge_models.experts import (SKILLS, ExpertsConfig, decompose, find_targets, load_experts, save_experts,
                                  skill_with, train_expert)
from forge_models.experts.phase import evaluate_library, exemplars_for, fewshot_alpha, skill_outcomes
from forge_models.eval import paired_difference
from forge_models.experts.train import skill_examples
from forge_models.experts.svf import z_count
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (with its tokenizer).")
    ap.add_argument("--corpus", required=True, help="Corpus folder (train/validation/test.jsonl) of that model.")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eval-examples", type=int, default=100, help="Test examples per skill.")
    ap.add_argument("--skills", default="arithmetic,tool,persona,narrative")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the figures.")
    ap.add_argument("--cem-shots", type=int, default=0,
                    help="Few-shot mixing: validation examples per skill for CEM (0: skip the CEM measurement).")
    ap.add_argument("--dispatchers", default="exemplar,oracle",
                    help="First passes measured (each re-runs the cross table: on SmolLM2 give one).")
    ap.add_argument("--cem-population", type=int, default=32)
    ap.add_argument("--cem-iterations", type=int, default=50)
    ap.add_argument("--objectives", default="",
                    help="Per generation skill, its objective: e.g. arithmetic=answer,tool=answer (default reinforce).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"{time.strftime('%H:%M:%S')} loaded {args.model}", flush=True)
    tok = load_tokenizer(args.model)
    corpus = Corpus.load(Path(args.corpus))
    ctx = PhaseContext(device=torch.device("cpu"), seed=args.seed, precision="fp32")
    objectives = dict(kv.split("=", 1) for kv in args.objectives.split(",") if kv)
    cfg = ExpertsConfig(skills=args.skills.split(","), steps=args.steps, lr=args.lr, eval_examples=args.eval_examples,
                        objectives=objectives)
    eval_cfg = EvalConfig(max_new_tokens=32, batch_size=16)
    t0 = time.perf_counter()
    bases = decompose(model, find_targets(model, cfg.targets), cfg.ternary_rank)
    z, logs = {}, {}
    for i, k in enumerate(cfg.skills):
        t1 = time.perf_counter()
        z[k], log = train_expert(model, tok, bases, skill_with(k, cfg.objectives.get(k)), corpus.train, cfg.settings(), ctx,
                                 seed=args.seed * 1000 + i)
        first, last = log[: max(1, len(log) // 4)], log[-max(1, len(log) // 4):]
        logs[k] = {"train_s": time.perf_counter() - t1,
                   "reward_first_quarter": sum(e["reward"] for e in first) / len(first),
                   "reward_last_quarter": sum(e["reward"] for e in last) / len(last)}
        print(k, logs[k], flush=True)
    exemplars = exemplars_for(cfg.skills, corpus.train, cfg.n_exemplars, args.seed)
    results, cem_results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        save_experts(Path(tmp) / "lib", bases, z, cfg.max_mult, {})
        lib = load_experts(Path(tmp) / "lib")  # measured as stored
        for dispatch in args.dispatchers.split(","):
            m, details = evaluate_library(model, tok, lib, corpus.test, eval_cfg, ctx, per_skill=cfg.eval_examples,
                                          dispatch=dispatch, exemplars=exemplars, margin=cfg.dispatch_margin)
            results[dispatch] = {"metrics": m, "details": details}
        if args.cem_shots:
            # Few-shot mixing: alpha by CEM on validation shots, then the test examples of that skill.
            cem_out = {}
            for k in cfg.skills:
                t1 = time.perf_counter()
                shots = skill_examples(SKILLS[k], corpus.validation)[: args.cem_shots]
                alpha, shot_score, calls = fewshot_alpha(model, tok, lib, k, shots, eval_cfg, ctx,
                                                         population=args.cem_population,
                                                         iterations=args.cem_iterations, seed=args.seed)
                test = skill_examples(SKILLS[k], corpus.test)[: cfg.eval_examples]
                base = skill_outcomes(model, tok, SKILLS[k], test, eval_cfg, ctx)
                with lib.apply(model, alpha=alpha):
                    mixed = skill_outcomes(model, tok, SKILLS[k], test, eval_cfg, ctx)
                d, lo, hi = paired_difference(mixed, base, eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed)
                cem_out[k] = {"alpha": alpha, "shot_score": shot_score, "evaluations": calls, "base": sum(base) / len(base),
                              "mixture": sum(mixed) / len(mixed), "d": d, "d_lo": lo, "d_hi": hi,
                              "seconds": time.perf_counter() - t1}
                print("cem", k, cem_out[k], flush=True)
            cem_results = cem_out
    params = sum(p.numel() for p in model.parameters())
    out = {"model": args.model, "params": params, "z_per_expert": z_count(bases),
           "overhead_per_expert": z_count(bases) / params, "train": logs, "config": cfg.model_dump(mode="json"),
           "results": results, "cem": cem_results,
           "cem_settings": {"shots": args.cem_shots, "population": args.cem_population,
                            "iterations": args.cem_iterations, "elite": 0.2}, "wall_s": time.perf_counter() - t0, "threads": args.threads}
    m = next(iter(results.values()))["metrics"]
    print(f"\nparams {params:,}; z per expert {z_count(bases):,} ({z_count(bases) / params:.3%})")
    print("| skill | n | base | expert | d [95%] |")
    for k in cfg.skills:
        print(f"| {k} | {int(m[f'{k}/n'])} | {m[f'{k}/base']:.3f} | {m[f'{k}/expert']:.3f} | "
              f"{m[f'{k}/d']:+.3f} [{m[f'{k}/d_lo']:+.3f}, {m[f'{k}/d_hi']:+.3f}] |")
    for dispatch, r in results.items():
        mm = r["metrics"]
        print(f"{dispatch}: base {mm['mixed/base']:.3f} best single ({r['details']['best_single']}) "
              f"{mm['mixed/best_single']:.3f} dispatch {mm['mixed/dispatch']:.3f}; dispatch - best "
              f"{mm['mixed/dispatch_minus_best_single']:+.3f} [{mm['mixed/dispatch_minus_best_single_lo']:+.3f}, "
              f"{mm['mixed/dispatch_minus_best_single_hi']:+.3f}]; classify acc {mm['dispatch/accuracy']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
