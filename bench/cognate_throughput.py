"""Cognate training throughput against a plain PyTorch loop on the same model and batches.

    .venv/bin/python bench/cognate_throughput.py [--steps 40] [--repeats 3] [--precision auto|bf16|fp32]

Both loops train a freshly initialised Cognate model of the same shape on the same pre-sampled batches
with the same AdamW settings, autocast and gradient clipping. "forge" is the phase's own stage loop
(`forge_models.cognate.phase._train_stage`: LR schedule, NaN check, metric logging, progress) with
checkpoints off; "plain" is the minimal loop. Runs alternate (forge, plain, forge, plain, ...) so machine
noise hits both; the reported ratio is the median of per-pair ratios. Goal: forge >= 0.9x plain.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import forge_models  # noqa: F401
from forge_models.cognate.model import CognateForCausalLM, CognateModelConfig
from forge_models.cognate import phase as cp
from forge_models.config import CognateArchConfig, CognateConfig, TrainConfig
from forge_models.data import Example
from forge_models.runtime import PhaseContext, RecordingTracker

SHAPES = {
    "tiny-preset": CognateArchConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352,
                                     max_position_embeddings=256, max_refine_steps=2),
    "5M": CognateArchConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                            max_position_embeddings=256, max_refine_steps=1),
}


class _FixedBatches:
    """Stands in for TokenSampler so both loops see identical batches."""

    def __init__(self, batches):
        self.batches = batches

    def batch(self, step):
        return self.batches[step]


def forge_loop(model, batches, tcfg, ctx) -> float:
    stage = cp._Stage("trunk", tcfg, 0, model.config.act_threshold, model.config.max_refine_steps, 0, "bench")
    cfg = CognateConfig()
    real_sampler = cp.TokenSampler
    cp.TokenSampler = lambda *a, **k: _FixedBatches(batches)  # same batches as the plain loop
    try:
        t0 = time.perf_counter()
        cp._train_stage(stage, model, [Example(kind="text", text="x")], None, cfg, ctx, cp._Progress(ctx, tcfg.steps))
        return time.perf_counter() - t0
    finally:
        cp.TokenSampler = real_sampler


def plain_loop(model, batches, tcfg, ctx) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    for step in range(tcfg.steps):
        batch = batches[step]
        with ctx.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ctx = PhaseContext(device=torch.device("cpu"), seed=0, precision=args.precision, tracker=RecordingTracker())
    results = {}
    for name, arch in SHAPES.items():
        tcfg = TrainConfig(steps=args.steps, batch_size=16, seq_len=128, lr=1e-3, warmup_steps=5)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(2, args.vocab, (tcfg.batch_size, tcfg.seq_len), generator=g) for _ in range(args.steps)]
        ratios, forge_tps, plain_tps = [], [], []
        for _ in range(args.repeats):
            times = {}
            for which, loop in (("forge", forge_loop), ("plain", plain_loop)):
                torch.manual_seed(0)
                model = CognateForCausalLM(CognateModelConfig.from_arch(arch, args.vocab))
                times[which] = loop(model, batches, tcfg, ctx)
            tokens = args.steps * tcfg.batch_size * tcfg.seq_len
            forge_tps.append(tokens / times["forge"])
            plain_tps.append(tokens / times["plain"])
            ratios.append(times["plain"] / times["forge"])
        params = sum(p.numel() for p in model.parameters())
        results[name] = {
            "params": params,
            "forge_tokens_per_s": round(statistics.median(forge_tps)),
            "plain_tokens_per_s": round(statistics.median(plain_tps)),
            "ratio_forge_over_plain": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
        }
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "precision": args.precision, "autocast": str(ctx.autocast_dtype()), "results": results}, indent=2))


if __name__ == "__main__":
    main()
