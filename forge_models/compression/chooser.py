"""Per-tensor choice of encodings under a byte budget.

Damage of a candidate on a tensor = its output error on calibration activations (train split only):
``tr(dW H dW^T)`` with ``H = E[x x^T]`` of the layer's inputs, i.e. the mean over calibration tokens of
``||x dW^T||^2``. For a tensor without an owning linear layer (an untied input embedding) H = I (plain
squared error). The total damage is taken as the sum over tensors (a first-order proxy; the sequential
encode with reload-and-evaluate in :mod:`forge_models.compression.phase` checks the real loss).

The budget problem (one option per tensor, minimise total damage, total bytes <= budget) is a
multiple-choice knapsack. Each tensor's options are reduced to the lower convex hull of (bytes, damage)
(dominated and non-convex options dropped), then upgrade steps along the hulls are taken greedily in order
of damage removed per byte while they fit. A dominated option (more bytes and more damage than another of
the same tensor) can therefore never be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from forge_models.runtime import ConfigError

__all__ = ["Option", "hull", "choose", "collect_hessians", "output_damage"]


@dataclass(frozen=True)
class Option:
    """One candidate for one tensor: its stored bytes and its measured damage."""

    bytes: int
    damage: float


def hull(options: list[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, damage), by increasing bytes and decreasing damage."""
    order = sorted(range(len(options)), key=lambda i: (options[i].bytes, options[i].damage))
    frontier: list[int] = []
    for i in order:  # Pareto frontier: strictly less damage than every cheaper option
        if not frontier or options[i].damage < options[frontier[-1]].damage:
            if frontier and options[i].bytes == options[frontier[-1]].bytes:
                frontier.pop()
            frontier.append(i)
    out: list[int] = []
    for i in frontier:  # convexity: slopes (damage drop per byte) must decrease
        while len(out) >= 2:
            a, b = options[out[-2]], options[out[-1]]
            c = options[i]
            # b lies on or above the segment a-c: drop it
            if (b.damage - a.damage) * (c.bytes - a.bytes) >= (c.damage - a.damage) * (b.bytes - a.bytes):
                out.pop()
            else:
                break
        out.append(i)
    return out


def choose(options: dict[str, list[Option]], budget: int) -> dict[str, int]:
    """Option index per tensor minimising total damage with total bytes <= budget.

    Raises:
        ConfigError: even the smallest option of every tensor does not fit the budget.
    """
    hulls = {name: hull(opts) for name, opts in options.items()}
    pos = {name: 0 for name in options}
    total = sum(options[n][h[0]].bytes for n, h in hulls.items())
    if total > budget:
        raise ConfigError(
            f"the smallest candidate of every tensor needs {total:,} bytes, over the budget of {budget:,}; "
            f"raise the budget or add smaller candidate encodings"
        )
    while True:
        best, best_rate = None, 0.0
        for name, h in hulls.items():
            if pos[name] + 1 < len(h):
                a, b = options[name][h[pos[name]]], options[name][h[pos[name] + 1]]
                extra = b.bytes - a.bytes
                if total + extra <= budget:
                    rate = (a.damage - b.damage) / max(extra, 1)
                    if rate > best_rate:
                        best, best_rate = name, rate
        if best is None:
            break
        h = hulls[best]
        total += options[best][h[pos[best] + 1]].bytes - options[best][h[pos[best]]].bytes
        pos[best] += 1
    return {name: hulls[name][pos[name]] for name in options}


@torch.no_grad()
def collect_hessians(model: nn.Module, ids: torch.Tensor, batch_size: int, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """H = E[x x^T] (float32, (in, in)) of the inputs of each given linear module over the calibration ids."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(make(name)))
    try:
        was = model.training
        model.eval()
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i : i + batch_size])
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def output_damage(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> float:
    """tr(dW H dW^T): mean squared output error per calibration token (H None: squared Frobenius error)."""
    d = (w.float() - w_hat.float()).double()
    if h is None:
        return float((d * d).sum())
    return float(((d @ h.double()) * d).sum())
