"""Forge training loop (Phase 5) on the tiny Cognate model: held-out metrics before/after, time per stage,
and ablations: the curriculum, the self-model and dreams each switched off in turn, and Grokfast (off by
default, see GrokfastConfig) switched on.

    OMP_NUM_THREADS=1 .venv/bin/python bench/training_loop.py [--store bench/out/cache/forge-store]
        [--model trunk] [--runs full,with-grokfast,no-curriculum,no-self-model,no-dreams] [--scale 1.0]
        [--threads 1] [--precision fp32] [--out bench/out/training_loop.json]

Input: the Cognate trunk, corpus and tokenizer of a finished tiny-preset run in a local store (the one
`bench/cache_rerun.py` leaves in bench/out/cache/forge-store: hidden 128, 2 layers, vocab 1024). Without
one, a trunk of that shape is trained from scratch here with the Cognate phase (400 steps).

Every run starts from the same input model with the same seed and the default `TrainingConfig` (stage
budgets times `--scale`), one feature switched off for an ablation. Metrics are the shared harness on the
held-out validation split (32 examples per task, 8192 perplexity tokens); "delta vs full" is the ablation
minus the full run (for loss, a positive delta means the feature helped). Single seed, tiny model: read the
differences as measurements of this setup, not as general claims.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import forge_models  # noqa: E402,F401  (registers "cognate")
from forge_models.config import CognateArchConfig, CognateConfig, DataConfig, EvalConfig, SyntheticConfig, TrainConfig  # noqa: E402
from forge_models.data import Corpus, build_corpus  # noqa: E402
from forge_models.runtime import PhaseContext  # noqa: E402
from forge_models.tokenizer import load_tokenizer, train_bpe  # noqa: E402
from forge_models.training import TrainingConfig, TrainingInputs, run  # noqa: E402

TINY_EVAL = EvalConfig(split="validation", max_examples=32, ppl_max_tokens=8192, max_new_tokens=24, batch_size=16,
                       seq_len=128)
RUNS = {
    "full": {},
    "with-grokfast": {"grokfast": {"enabled": True}},  # off by default: its "ablation" switches it on
    "no-curriculum": {"curriculum": {"enabled": False}},
    "no-self-model": {"self_model": {"enabled": False}},
    "no-dreams": {"dreams": {"enabled": False}},
}
KEYS = ("loss", "arith_em", "tool_valid", "tool_correct", "choice_acc")


def load_input(store: Path, name: str):
    models = sorted(store.glob(f"cognate/*/{name}"))
    data = sorted(store.glob("data/*"))
    if models and data:
        corpus = Corpus.load(data[0] / "corpus")
        tokenizer = load_tokenizer(data[0] / "tokenizer")
        model = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()
        return model, tokenizer, corpus, str(models[0])
    print(f"no cognate/*/{name} under {store}: training a tiny trunk from scratch", flush=True)
    from forge_models import cognate

    corpus = build_corpus(DataConfig(synthetic=SyntheticConfig(n_examples=6000, max_operand=20)))
    tokenizer = train_bpe([ex.text for ex in corpus.train], 1024)
    cfg = CognateConfig(
        arch=CognateArchConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352,
                               max_position_embeddings=256),
        trunk=TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30),
        variants=[{"name": "unused", "train": {"steps": 1, "warmup_steps": 0, "seq_len": 128}}],
    )
    out = cognate.run(cognate.CognateInputs(corpus=corpus, tokenizer=tokenizer, eval_cfg=TINY_EVAL), cfg,
                      PhaseContext(seed=0, precision="fp32"))
    return out.models["trunk"], tokenizer, corpus, "trained from scratch (cognate phase, 400 steps)"


def scaled_config(overrides: dict, scale: float) -> TrainingConfig:
    base = TrainingConfig()
    stages = [s.model_copy(update={"steps": max(1, round(s.steps * scale))}) for s in base.stages]
    return TrainingConfig(**{**base.model_dump(), "stages": [s.model_dump() for s in stages], **{
        k: {**base.model_dump()[k], **v} for k, v in overrides.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="bench/out/cache/forge-store", help="Store holding a tiny-preset run.")
    parser.add_argument("--model", default="trunk", help="Which Cognate model of the store to train.")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"Comma-separated subset of {list(RUNS)}.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every stage budget (0.2 = quick look).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="Phase precision.")
    parser.add_argument("--seed", type=int, default=0, help="Run seed (same for every run).")
    parser.add_argument("--out", default="bench/out/training_loop.json", help="JSON output path.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")

    model, tokenizer, corpus, source = load_input(Path(args.store), args.model)
    results = {}
    for name in names:
        cfg = scaled_config(RUNS[name], args.scale)
        ctx = PhaseContext(seed=args.seed, precision=args.precision)
        t0 = time.perf_counter()
        out = run(TrainingInputs(model=model, tokenizer=tokenizer, corpus=corpus, eval_cfg=TINY_EVAL), cfg, ctx)
        seconds = time.perf_counter() - t0
        results[name] = {
            "seconds": seconds, "metrics": out.metrics, "before": out.evaluations["before"]["input"],
            "after": out.evaluations["after"]["model"], "stages": out.details["stages"],
            "rollbacks": out.details["rollbacks"], "events": out.details["events"],
            "dreams": {k: v for k, v in out.details["dreams"].items()},
            "curriculum": out.details["curriculum"], "self_model": out.details["self_model"],
            "config": cfg.model_dump(mode="json"),
        }
        after = out.evaluations["after"]["model"]
        print(f"[{name}] {seconds:.0f} s, steps {out.metrics['steps']:.0f}, held-out loss "
              f"{out.evaluations['before']['input']['loss']:.4f} -> {after['loss']:.4f}", flush=True)

    first = results[names[0]]
    print(f"\nInput: {source}; held-out validation split; seed {args.seed}; {args.threads} thread(s)\n")
    print("| Model | " + " | ".join(KEYS) + " |")
    print("| --- |" + " --- |" * len(KEYS))
    print("| input | " + " | ".join(f"{first['before'].get(k, float('nan')):.4f}" for k in KEYS) + " |")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['after'].get(k, float('nan')):.4f}" for k in KEYS) + " |")

    if "full" in results:
        full = results["full"]
        print("\n| Ablation | delta loss vs full | delta arith_em | delta tool_correct | delta choice_acc | steps | "
              "stages ended by criterion | dreams kept | final difficulty | in-band fraction | self-model/copy loss | seconds |")
        print("| --- |" + " --- |" * 11)
        for name, r in results.items():
            m = r["metrics"]
            d = {k: r["after"].get(k, float("nan")) - full["after"].get(k, float("nan")) for k in KEYS}
            sm = (f"{m['self_model/loss']:.4f} / {m['self_model/copy_loss']:.4f}" if "self_model/loss" in m else "-")
            print(f"| {name} | {d['loss']:+.4f} | {d['arith_em']:+.3f} | {d['tool_correct']:+.3f} | {d['choice_acc']:+.3f} | "
                  f"{m['steps']:.0f} | {m['stages/by_criterion']:.0f}/10 | {m['dream/kept']:.0f}/{m['dream/generated']:.0f} | "
                  f"{m.get('curriculum/final_difficulty', float('nan')):.3f} | "
                  f"{m.get('curriculum/in_band_fraction', float('nan')):.2f} | {sm} | {r['seconds']:.0f} |")

        print("\nStages of the full run:\n")
        print("| # | Stage | Steps / budget | Ended by | Seconds | Entry check loss | Exit check loss | Exit reason |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for rec in full["stages"]:
            print(f"| {rec['index']} | {rec['name']} | {rec['steps']} / {rec['budget']} | {rec['ended_by']} | "
                  f"{rec['seconds']:.1f} | {rec['entry'].get('val_loss', float('nan')):.4f} | "
                  f"{(rec['exit'] or {}).get('val_loss', float('nan')):.4f} | {rec['exit_reason']} |")

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": source, "threads": args.threads, "precision": args.precision, "scale": args.scale,
            "seed": args.seed, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__}
    out_path.write_text(json.dumps({"meta": meta, "runs": results}, indent=1, default=str))
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
