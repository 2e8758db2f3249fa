"""BitNet phase quality and size: full precision vs ternary without fine-tuning vs ternary after QAT.

    .venv/bin/python bench/bitnet_quality.py [--store bench/out/cache/forge-store] [--model trunk]
        [--steps 200] [--warmup 50] [--lr 1e-3] [--act-norm rms|none] [--packing 2bit|base3]
        [--precision auto|bf16|fp32] [--out bench/out/bitnet_quality.json]

Input: a Cognate model, corpus and tokenizer of a finished tiny-preset run in a local store (the one
`bench/cache_rerun.py` leaves in bench/out/cache/forge-store; any store with a `cognate/<key>/<model>`
folder and a `data/<key>/{corpus,tokenizer}` folder works). Runs `forge_models.bitnet.run` on it with the
tiny preset's evaluation settings (held-out validation split: 32 examples per task, 8192 perplexity
tokens) and prints the harness metrics of the three models plus the bytes on disk measured from the
exported folder against the bf16 model of the same shape.

QAT is also more training: on an under-trained input, "after QAT" can beat the input for that reason
alone. The control row "fp32, same extra training" fine-tunes a copy of the input in full precision on
the same batches with the same optimizer settings and steps, so the cost of ternary is the difference
between the last two rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import forge_models  # noqa: F401  (registers "cognate")
from forge_models.bitnet import BitNetConfig, BitNetInputs, run
from forge_models.config import EvalConfig
from forge_models.data import Corpus, TokenSampler
from forge_models.eval import evaluate
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer

TINY_EVAL = EvalConfig(split="validation", max_examples=32, ppl_max_tokens=8192, max_new_tokens=24, batch_size=16,
                       seq_len=128)
def fp_control(model, tokenizer, corpus: Corpus, cfg: BitNetConfig, ctx: PhaseContext) -> dict[str, float]:
    """The input fine-tuned in full precision with the phase's batches, optimizer settings and steps."""
    import copy

    model = copy.deepcopy(model).train()
    sampler = TokenSampler(corpus.split("train"), tokenizer, cfg.data_mix, cfg.seq_len, cfg.batch_size, ctx.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step in range(cfg.steps):
        batch = sampler.batch(step)
        with ctx.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return evaluate(model.eval(), tokenizer, corpus.split(TINY_EVAL.split), TINY_EVAL, ctx)


KEYS = ("loss", "ppl", "arith_em", "tool_valid", "tool_correct", "choice_acc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="bench/out/cache/forge-store")
    parser.add_argument("--model", default="trunk", help="which Cognate output model (trunk, math, ...)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--act-norm", choices=["rms", "none"], default="rms")
    parser.add_argument("--packing", choices=["2bit", "base3"], default="2bit")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/out/bitnet_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    store = Path(args.store)
    models = sorted(store.glob(f"cognate/*/{args.model}"))
    data = sorted(store.glob("data/*"))
    if not models or not data:
        raise SystemExit(f"no cognate/*/{args.model} or data/* under {store}: run bench/cache_rerun.py first")
    corpus = Corpus.load(data[0] / "corpus")
    tokenizer = load_tokenizer(data[0] / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32)
    cfg = BitNetConfig(steps=args.steps, warmup_steps=args.warmup, lr=args.lr, batch_size=args.batch,
                       seq_len=args.seq, act_norm=args.act_norm, packing=args.packing, checkpoint_every=10_000)
    t0 = time.perf_counter()
    ctx = PhaseContext(seed=0, precision=args.precision)
    out = run(BitNetInputs(model, tokenizer, corpus, TINY_EVAL), cfg, ctx)
    seconds = time.perf_counter() - t0
    control = fp_control(model, tokenizer, corpus, cfg, ctx)

    table = {"input (fp32)": out.evaluations["before"]["input"],
             "ternary, no fine-tuning": out.evaluations["after"]["ternary_no_ft"],
             "fp32, same extra training": control,
             "ternary after QAT": out.evaluations["after"]["bitnet"]}
    result = {
        "model": str(models[0]),
        "config": cfg.model_dump(mode="json"),
        "precision": out.details["precision"],
        "seconds": seconds,
        "evaluations": table,
        "size": out.details["size"],
        "qat_tokens_per_s": out.metrics["bitnet/qat_tokens_per_s"],
        "export_max_rel_logit_diff": out.metrics["export/max_rel_logit_diff"],
        "converted": len(out.details["conversion"]["converted"]),
        "kept_linear": out.details["conversion"]["kept_linear"],
        "load_average": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"{models[0]}: {result['converted']} linear layers ternary, kept {result['kept_linear']}; "
          f"{args.steps} QAT steps (warm-up {args.warmup}, lr {args.lr}, {out.details['precision']}) in {seconds:.0f} s")
    print(f"{'':26}" + "".join(f"{k:>13}" for k in KEYS))
    for name, values in table.items():
        print(f"{name:26}" + "".join(f"{values[k]:13.3f}" if k in values else f"{'-':>13}" for k in KEYS))
    s = out.details["size"]
    print(f"bytes: ternary linear {s['ternary_linear']:,} (bf16 {s['bf16_linear']:,}, {s['linear_ratio_vs_bf16']:.2f}x), "
          f"high precision {s['high_precision']:,}, weights file {s['weights_file']:,} (bf16 {s['bf16_weights_file']:,}, "
          f"{s['file_ratio_vs_bf16']:.2f}x), folder {s['folder_total']:,}; {s['bits_per_ternary_weight']:.3f} bits/weight")


if __name__ == "__main__":
    main()
