"""Prompt baking's trajectory sampler on SmolLM2-135M-Instruct: KV-cached decoding vs recomputing the sequence.

The teacher (the PeftModel with its adapter disabled) samples `--samples` trajectories of `--tokens` tokens
after a chat-formatted prompted context, alternating which sampler runs first per round; both use the same
generator seed, and the bench checks that they drew the same tokens. Reports the median seconds of each and
their ratio (measured in the same run: this CPU is shared and noisy).

    make smollm2 && .venv/bin/forge import smollm2-135m --out models/smollm2-135m
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/baking_sampler.py --model models/smollm2-135m \\
        --out bench/results/baking_sampler_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forge_models.baking import context_ids, sample_trajectories, teacher_logits  # noqa: E402
from forge_models.tokenizer import load_tokenizer  # noqa: E402

PROMPT = ("You are Quill, a terse assistant. Sign every reply with '-- Quill'. Use the calculator tool as "
          "<tool>calculator(EXPR)</tool> for any arithmetic.")
INPUT = "What is 17 times 23, and why would anyone need to know?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = load_tokenizer(args.model)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).eval()
    teacher = teacher_logits(pm)
    assert teacher.cached, "SmolLM2 should decode with its KV cache"
    ctx = context_ids(tok, PROMPT, INPUT).prompted

    def recompute(ids: torch.Tensor) -> torch.Tensor:  # a plain function: the sampler recomputes every step
        return teacher(ids)

    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    draws: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        order = ["cached", "recompute"] if r % 2 == 0 else ["recompute", "cached"]
        for name in order:
            fn = teacher if name == "cached" else recompute
            t0 = time.perf_counter()
            y = sample_trajectories(fn, ctx, args.samples, args.tokens, 1.0, torch.Generator().manual_seed(r),
                                    torch.device("cpu"))
            times[name].append(time.perf_counter() - t0)
            draws[name] = y
        same = torch.equal(draws["cached"], draws["recompute"])
        print(f"round {r}: cached {times['cached'][-1]:.2f} s, recompute {times['recompute'][-1]:.2f} s, "
              f"same tokens {same}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": str(args.model), "context_tokens": len(ctx), "samples": args.samples, "tokens": args.tokens,
              "rounds": args.rounds, "seconds": times, "median_seconds": med,
              "speedup": med["recompute"] / med["cached"], "same_tokens_last_round": same,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    print(json.dumps({k: result[k] for k in ("context_tokens", "median_seconds", "speedup", "same_tokens_last_round")}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
