"""One pretrained-route sibling on SmolLM2-135M-Instruct: the Cognate phase's LoRA fine-tune of the base on a
data mix, evaluated before and after by the shared harness (chat-formatted) on the smollm2 preset's
validation split, with 95% bootstrap intervals and paired differences on the same examples.

    make smollm2 && .venv/bin/forge import smollm2-135m --out models/smollm2-135m
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/smollm2_sibling.py [--steps 40] [--out FILE]

The sibling (name "dialog", LoRA r 16 / alpha 32 on all seven projections, lr 1e-3, batches of 4 x 256
tokens, mix arithmetic 1, tool 2, persona 1, system 1) is trained by `forge_models.cognate.run` exactly as the
pipeline runs it (phases=[cognate] of the smollm2 preset, one sibling instead of three). bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import load_config  # noqa: E402
from forge_models import cognate  # noqa: E402
from forge_models.data import build_corpus  # noqa: E402
from forge_models.eval import evaluate, paired_metrics  # noqa: E402
from forge_models.runtime import PhaseContext, RecordingTracker  # noqa: E402

KEYS = ("loss", "arith_em", "tool_valid", "tool_correct", "tool_answer_correct", "persona_rule_adherence",
        "system_answer_correct", "choice_acc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-text", default=str(ROOT.parent / "shared/data/carroll-alice.txt"),
                    help="held-out-only real text (data.eval_sources); its perplexity is reported per source")
    ap.add_argument("--out", default=str(ROOT / "bench/results/smollm2_sibling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sibling = ("[{name: dialog, method: lora, lora: {rank: 16, alpha: 32}, train: {steps: %d, batch_size: 4, "
               "seq_len: 256, lr: 1.0e-3, warmup_steps: 4, weight_decay: 0.0, data_mix: {arithmetic: 1, tool: 2, "
               "persona: 1, system: 1}}}]" % args.steps)
    cfg = load_config(preset="smollm2", overrides=["phases=[cognate]", f"cognate.siblings={sibling}",
                                                  f"data.eval_sources=[{{path: {args.eval_text}}}]"])
    corpus = build_corpus(cfg.data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.cognate.common_base)
    ctx = PhaseContext(precision="bf16", tracker=RecordingTracker())
    t0 = time.perf_counter()
    out = cognate.run(cognate.CognateInputs(corpus=corpus, tokenizer=tok, eval_cfg=cfg.eval), cfg.cognate, ctx)
    wall = time.perf_counter() - t0
    held = corpus.split("validation")
    outcomes: dict[str, dict[str, list[float]]] = {}
    metrics = {}
    for name in ("base", "dialog"):  # re-evaluated with per-example outcomes for the paired differences
        outcomes[name] = {}
        metrics[name] = evaluate(out.models[name], tok, held, cfg.eval, ctx, outcomes=outcomes[name])
    paired = paired_metrics(outcomes["dialog"], outcomes["base"], cfg.eval.bootstrap_samples, cfg.eval.bootstrap_seed)
    result = {
        "steps": args.steps, "phase_wall_s": wall, "sibling_tokens_per_s": out.metrics.get("dialog/tokens_per_s"),
        "metrics": metrics,
        "paired_dialog_minus_base": paired,
        "curve": out.curves["dialog/loss"],
        "machine": {"threads": args.threads, "load_avg": os.getloadavg(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for n, m in metrics.items():
        print(n, {k: round(m[k], 3) for k in KEYS if k in m}, {k: round(v, 2) for k, v in m.items() if k.startswith("ppl_")})
    print("paired (dialog - base):", json.dumps(paired, indent=1))


if __name__ == "__main__":
    main()
