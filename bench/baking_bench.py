"""Prompt baking (Phase 6) measured on a real folder: the issue's goal on the stored, reloaded artifact.

Goal: held-out KL(prompted input || baked, unprompted) <= 40% of KL(prompted input || input, unprompted), with a
bootstrap interval over held-out inputs; plus real-text perplexity before/after (Alice in Wonderland, never
trained on) with a paired bootstrap interval over windows.

    # a tiny Cognate trunk (forge phase cognate ... --set "cognate.variants=[]" --out /tmp/bk/cognate)
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/baking_bench.py --model /tmp/bk/cognate \
        --steps 150 --out bench/results/baking_tiny_cognate.json
    # SmolLM2-135M-Instruct (forge import smollm2-135m --out /tmp/bk/smollm2); hours at the paper's budget
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/baking_bench.py --model /tmp/bk/smollm2 --steps 40 \
        --inputs-per-step 2 --samples-per-input 4 --trajectory-tokens 24 --out bench/results/baking_smollm2.json

Inputs x: the user prompts of the synthetic corpus (train split for baking, validation split for measuring);
with a chat template they go in the user turn and the baked prompt in the system slot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import forge_models  # noqa: F401  (registers Cognate)
from forge_models.baking import BakePrompt, BakingConfig, BakingInputs, run
from forge_models.config import DataConfig, EvalConfig, SyntheticConfig
from forge_models.data import build_corpus
from forge_models.eval.real_text import document_windows
from forge_models.eval.stats import paired_difference
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer
from tasks.baking import task_inputs
from tasks.inputs import load_input_model

TOOLS = ("You can call one tool, the calculator: write <tool>calc(EXPRESSION)</tool> and wait for its result. "
         "Always use it for arithmetic.")
PERSONA = "You are Ada, a terse assistant. Answer in one short sentence and end every answer with '-- Ada'."


@torch.no_grad()
def window_losses(model, tokenizer, text: str, seq_len: int, max_tokens: int) -> np.ndarray:
    """Mean NLL (nats/token) of every window of the held-out real text: the unit of the paired interval."""
    windows = document_windows([text], tokenizer, seq_len, max_tokens)
    out = []
    for w in windows:
        ids = torch.tensor([w])
        logits = model(input_ids=ids).logits.float()
        out.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face folder (or a BitNet folder with latent/).")
    ap.add_argument("--out", required=True, help="JSON result file.")
    ap.add_argument("--work", default="/tmp/bk/bench-out", help="Where the baked model is stored and reloaded from.")
    ap.add_argument("--prompts", default="tools,persona", help="Which built-in prompts to bake, in order.")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--inputs-per-step", type=int, default=4)
    ap.add_argument("--samples-per-input", type=int, default=8)
    ap.add_argument("--trajectory-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--half-bake", default="", help="Comma-separated half-bake steps.")
    ap.add_argument("--alice", default="/work/shared/data/carroll-alice.txt")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.monotonic()
    model, latent = load_input_model(Path(args.model))
    tok = load_tokenizer(args.model)
    bitnet_meta = None
    if latent is not None:
        packed = json.loads((Path(args.model) / "bitnet.json").read_text())
        bitnet_meta = {"packing": packed["packing"], "kept_dtype": packed["kept_dtype"],
                       "keep_patterns": latent["keep_patterns"], "act_norm": latent["act_norm"]}
    corpus = build_corpus(DataConfig(seed=1, synthetic=SyntheticConfig(n_examples=3000)))
    train_x, held_x = task_inputs(corpus.train), task_inputs(corpus.validation)
    texts = {"tools": TOOLS, "persona": PERSONA}
    prompts = tuple(BakePrompt(name=n, text=texts[n]) for n in args.prompts.split(","))
    half = tuple(int(s) for s in args.half_bake.split(",") if s)
    cfg = BakingConfig(prompts=prompts, steps=args.steps, lr=args.lr, lora={"rank": args.rank, "alpha": 2.0 * args.rank},
                       inputs_per_step=args.inputs_per_step, samples_per_input=args.samples_per_input,
                       trajectory_tokens=args.trajectory_tokens, temperature=args.temperature,
                       eval_samples_per_input=args.eval_samples, max_heldout_inputs=args.heldout,
                       half_bake_steps=half, seed=args.seed)
    alice = Path(args.alice).read_text(encoding="utf-8")
    seq_len = min(256, int(getattr(model.config, "max_position_embeddings", 256)))
    ppl_before = window_losses(model, tok, alice, seq_len, args.ppl_tokens)  # before: run() bakes in place

    ctx = PhaseContext(device=torch.device("cpu"), seed=args.seed, precision="fp32")
    out = run(BakingInputs(model, tok, train_x, held_x, Path(args.work), bitnet_meta=bitnet_meta), cfg, ctx)
    stored = out.models["model"]  # reloaded from args.work
    ppl_after = window_losses(stored, tok, alice, seq_len, args.ppl_tokens)
    d, lo, hi = paired_difference(ppl_after, ppl_before, seed=args.seed)
    result = {
        "model": args.model, "params": out.details["params"], "bitnet": out.details["bitnet"],
        "config": cfg.model_dump(mode="json"), "metrics": out.metrics,
        "prompts": out.details["prompts"], "combined_prompt_tokens": out.details.get("combined_prompt_tokens"),
        "real_text": {"windows": len(ppl_before), "seq_len": seq_len,
                      "ppl_before": float(np.exp(ppl_before.mean())), "ppl_after": float(np.exp(ppl_after.mean())),
                      "loss_diff": d, "loss_diff_lo": lo, "loss_diff_hi": hi},
        "wall_s": time.monotonic() - t0, "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, shared 2-core CPU (loaded)",
        "command": "bench/baking_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for p in prompts:
        k = f"baking/{p.name}"
        m = out.metrics
        print(f"{p.name}: KL input {m[k + '/kl_input']:.4f} [{m[k + '/kl_input_lo']:.4f}, {m[k + '/kl_input_hi']:.4f}] "
              f"-> baked {m[k + '/kl_baked']:.4f} [{m[k + '/kl_baked_lo']:.4f}, {m[k + '/kl_baked_hi']:.4f}], ratio "
              f"{m[k + '/kl_ratio']:.3f}, goal margin {m[k + '/goal_margin']:+.4f} [{m[k + '/goal_margin_lo']:+.4f}, "
              f"{m[k + '/goal_margin_hi']:+.4f}], re-prompted {m[k + '/kl_reprompted']:.4f}, half-baked "
              f"{out.details['prompts'][p.name]['half_baked']}")
    rt = result["real_text"]
    print(f"real-text ppl {rt['ppl_before']:.3f} -> {rt['ppl_after']:.3f} (loss diff {d:+.4f} [{lo:+.4f}, {hi:+.4f}]); "
          f"{result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
