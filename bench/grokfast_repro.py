"""Grokfast reproduction: modular multiplication grokking with the EMA and MA filters and without.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grokfast_repro.py [--steps 2000] [--runs ema,ma,none]
        [--seed 0] [--eval-every 50] [--threads 1] [--no-stop] [--out bench/out/grokfast_repro.json]

Setup of ``ironjr/grokfast main.py`` (independent re-implementation): x * y mod 97 with x in [0, 97) and
y in [1, 97) (9,312 equations), input [x, op, y, =] -> answer, loss on the answer only; random 50/50
train/validation split; 2 layers, width 128, 4 heads, GELU MLP 4x, learned positions, untied head, and
the reference block quirk ``x = LN1(x); x = x + Attn(x); x = x + MLP(LN2(x))`` (the residual is added to
the LayerNorm *output*). torch.optim.Adam (L2 weight decay, not AdamW), lr 1e-3, betas (0.9, 0.98),
LambdaLR warm-up ``update / 10`` for the first 10 updates, batch 512, the training set walked in order in
batches of 512 (as the reference does). Runs (all from the same seed, hence the same initial weights and
split):

- ``ema``: Grokfast-EMA alpha 0.98, lamb 2, weight decay 0.005
- ``ma``: Grokfast-MA window 100, lamb 5, weight decay 0.01
- ``none``: no filter, weight decay 0

Validation accuracy on the held-out half is measured every ``--eval-every`` updates; the table reports
the first evaluated update with val accuracy >= 95% ("not reached" otherwise), the accuracies at the end
and the wall time. A run stops once it reaches 95% unless ``--no-stop``. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from forge_models.training.grokfast import gradfilter_ema, gradfilter_ma  # noqa: E402

P = 97
TARGET = 0.95
RUNS = {
    "ema": {"filter": "ema", "alpha": 0.98, "lamb": 2.0, "weight_decay": 0.005},
    "ma": {"filter": "ma", "window_size": 100, "lamb": 5.0, "weight_decay": 0.01},
    "none": {"filter": "none", "weight_decay": 0.0},
}


class Block(nn.Module):
    """The reference block, quirk included: the attention residual is added to LN1's output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (seq, batch, dim)
        mask = torch.triu(torch.full((len(x), len(x)), -float("inf"), device=x.device, dtype=x.dtype), diagonal=1)
        x = self.ln_1(x)
        a, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, tokens: int = P + 2, seq_len: int = 5) -> None:
        super().__init__()
        self.token_embeddings = nn.Embedding(tokens, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.layers = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, tokens, bias=False)  # untied

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (seq, batch) token ids
        h = self.token_embeddings(x)
        positions = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
        h = h + self.position_embeddings(positions).expand_as(h)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h))


def multiplication_mod_p() -> torch.Tensor:
    """(5, 9312): rows x, op, y, =, x*y mod p; tokens p and p+1 are '=' and the operator."""
    x, y = torch.cartesian_prod(torch.arange(P), torch.arange(1, P)).T
    return torch.stack([x, torch.full_like(x, P + 1), y, torch.full_like(x, P), x * y % P])


@torch.no_grad()
def accuracy(model: nn.Module, data: torch.Tensor, batch: int = 2048) -> float:
    model.eval()
    hits = 0
    for chunk in torch.split(data, batch, dim=1):
        hits += int((model(chunk[:-1])[-1].argmax(-1) == chunk[-1]).sum())
    model.train()
    return hits / data.shape[1]


def run(name: str, steps: int, seed: int, eval_every: int, stop: bool, batch_size: int = 512) -> dict:
    spec = RUNS[name]
    torch.manual_seed(seed)
    data = multiplication_mod_p()
    train_idx, valid_idx = torch.randperm(data.shape[1]).split(data.shape[1] // 2)
    train, valid = data[:, train_idx], data[:, valid_idx]
    model = Decoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=spec["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1 if update > 10 else update / 10)
    batches = torch.split(train, batch_size, dim=1)
    grads = None
    history, reached, step = [], None, 0
    t0 = time.perf_counter()
    train_acc_first_99 = None
    while step < steps:
        for batch in batches:
            logits = model(batch[:-1])[-1]  # the answer position only
            loss = F.cross_entropy(logits, batch[-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec["filter"] == "ema":
                grads = gradfilter_ema(model, grads=grads, alpha=spec["alpha"], lamb=spec["lamb"])
            elif spec["filter"] == "ma":
                grads = gradfilter_ma(model, grads=grads, window_size=spec["window_size"], lamb=spec["lamb"])
            optimizer.step()
            scheduler.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                tr, va = accuracy(model, train), accuracy(model, valid)
                elapsed = time.perf_counter() - t0
                history.append({"step": step, "train_acc": tr, "val_acc": va, "loss": float(loss), "seconds": elapsed})
                print(f"[{name}] step {step:5d} loss {float(loss):.4f} train {tr:.3f} val {va:.3f} ({elapsed:.0f} s)",
                      flush=True)
                if train_acc_first_99 is None and tr >= 0.99:
                    train_acc_first_99 = step
                if reached is None and va >= TARGET:
                    reached = step
            if step >= steps or (stop and reached is not None):
                break
        if stop and reached is not None:
            break
    seconds = time.perf_counter() - t0
    last = history[-1]
    return {
        "run": name, "settings": spec, "seed": seed, "steps_run": step, "first_step_val_ge_95": reached,
        "first_step_train_ge_99": train_acc_first_99, "final_train_acc": last["train_acc"],
        "final_val_acc": last["val_acc"], "seconds": seconds, "s_per_step": seconds / max(step, 1),
        "history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="Update budget per run.")
    parser.add_argument("--runs", default="ema,ma,none", help="Comma-separated subset of ema, ma, none.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split and the initial weights (shared).")
    parser.add_argument("--eval-every", type=int, default=50, help="Updates between validation measurements.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the reference timing used 1).")
    parser.add_argument("--no-stop", action="store_true", help="Keep training after reaching 95%% val accuracy.")
    parser.add_argument("--out", default="bench/out/grokfast_repro.json", help="JSON output path.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")

    results = [run(n, args.steps, args.seed, args.eval_every, not args.no_stop) for n in names]

    print("\n| Run | Settings | First step val >= 95% | Steps run | Train acc (end) | Val acc (end) | Wall time | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = {k: v for k, v in r["settings"].items() if k != "filter"}
        reached = r["first_step_val_ge_95"] if r["first_step_val_ge_95"] is not None else "not reached"
        print(f"| {r['run']} | {s} | {reached} | {r['steps_run']} | {r['final_train_acc']:.3f} | "
              f"{r['final_val_acc']:.3f} | {r['seconds']:.0f} s | {r['s_per_step']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__, "steps": args.steps,
            "eval_every": args.eval_every, "stop_at_target": not args.no_stop, "p": P, "target": TARGET}
    out.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
