"""Merge arithmetic: pure functions of one tensor position across models.

Every function takes the tensors of one weight (same shape, a floating dtype; the streaming merge hands
them over in float32) and returns the merged tensor. None of them mutates its inputs. Notation:
theta_b the base model's tensor, theta_i the others, delta_i = theta_i - theta_b the task vectors.

The conventions follow mergekit (https://github.com/arcee-ai/mergekit, ``mergekit/merge_methods``):
trimming and sign election are per tensor, weights may be negative, parameters are plain numbers here
(the recipe resolves gradients and filters before calling). Where a function follows a paper instead,
its docstring says so. The registry (``forge_models.merge.registry``) binds names to these functions.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from forge_models.merge import sparsify as sp

__all__ = [
    "linear",
    "generalized_task_arithmetic",
    "combine_task_vectors",
    "per_model_generators",
    "consensus_mask",
    "slerp",
    "slerp_sums",
    "slerp_coefficients",
    "model_stock",
    "model_stock_ratio",
    "passthrough",
]

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Consensus = Literal["sum", "count"]


def linear(tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average theta = sum_i w_i theta_i / sum_i w_i (``normalize``) or the plain weighted sum.

    Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482 (mergekit ``linear``).
    """
    _check_aligned(tensors, weight, "weight")
    # Weights as a tensor of the inputs' dtype, fused multiply-adds into zeros, divided by the summed
    # weight tensor: the same operations as mergekit 0.1.5's linear_merge, so the result is bit-identical
    # (measured on float32); Python-float weights or a stacked sum differ in the last bit.
    w = torch.tensor([float(v) for v in weight], dtype=tensors[0].dtype)
    out = torch.zeros_like(tensors[0])
    for i, x in enumerate(tensors):
        out.addcmul_(x, w[i])
    if normalize:
        total = w.sum()
        if total == 0:
            raise ValueError("linear with normalize: the weights sum to 0")
        out.div_(total)
    return out


def consensus_mask(weighted: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """Where a weighted delta agrees with the elected sign. A zero entry has sign 0 and never agrees."""
    return torch.sign(weighted) == elected


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    sparsification: Sparsification | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    rescale_norm: sp.RescaleNorm | None = None,
    lambda_: float = 1.0,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Task arithmetic with optional sparsification and sign consensus (mergekit's
    ``generalized_task_arithmetic``): theta = theta_b + lambda * tau.

    1. Task vectors delta_i = theta_i - theta_b, each sparsified on its own with ``density[i]``
       (and rescaled with ``rescale_norm`` when ``rescale``).
    2. Without consensus: tau = sum_i w_i delta_i, divided by sum_i w_i when ``normalize``.
    3. With consensus ("sum" = TIES: gamma = sign(sum_i w_i delta_i), ties at 0 elect +; "count" =
       majority of signs): mask_i = [sign(w_i delta_i) == gamma];
       tau = sum_i w_i delta_i mask_i / sum_i w_i mask_i when ``normalize`` (a zero divisor becomes 1).

    Names built on this: task_arithmetic (Ilharco et al., https://arxiv.org/abs/2212.04089), ties
    (Yadav et al., https://arxiv.org/abs/2306.01708), dare_linear / dare_ties (Yu et al.,
    https://arxiv.org/abs/2311.03099), breadcrumbs (https://arxiv.org/abs/2312.06795), della
    (https://arxiv.org/abs/2406.11617).

    TIES follows mergekit, not the original code (prateeky2806/ties-merging): the trim is top-k per
    tensor (the original ranks each task's whole flattened model), the disjoint mean divides by the sum
    of the agreeing *weights* (the original divides by the count of agreeing non-zero entries, which is
    the same when all weights are 1), and lambda is a recipe parameter rather than searched on
    validation data.
    """
    if not tensors:
        return base.clone()
    _check_aligned(tensors, weight, "weight")
    n = len(tensors)
    density = list(density) if density is not None else [1.0] * n
    gamma = list(gamma) if gamma is not None else [0.01] * n
    epsilon = list(epsilon) if epsilon is not None else [0.15] * n
    generators = per_model_generators(generator, n)
    norm = rescale_norm if rescale else None

    weighted: list[torch.Tensor] = []
    for i, x in enumerate(tensors):
        delta = x - base
        if sparsification == "magnitude":
            delta = sp.magnitude(delta, density[i], norm)
        elif sparsification == "magnitude_outliers":
            delta = sp.magnitude_outliers(delta, density[i], gamma[i], norm)
        elif sparsification == "random":
            delta = sp.bernoulli(delta, density[i], generators[i], norm)
        elif sparsification == "della_magprune":
            delta = sp.della_magprune(delta, density[i], epsilon[i], generators[i], norm)
        elif sparsification is not None:
            raise ValueError(f"unknown sparsification {sparsification!r}")
        # delta is a fresh tensor owned here (x - base, or a sparsifier's output), so scale it in place.
        weighted.append(delta.mul_(float(weight[i])))
    return base + combine_task_vectors(weighted, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


def combine_task_vectors(
    weighted: list[torch.Tensor],
    weight: Sequence[float],
    *,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """tau from weighted (sparsified) task vectors w_i delta_i: steps 2-3 of
    :func:`generalized_task_arithmetic`, elementwise, so it also runs on row chunks. Consumes ``weighted``."""
    if consensus is None:
        mixed = weighted[0]
        for d in weighted[1:]:
            mixed.add_(d)
        if normalize:
            total = float(sum(weight))
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    else:
        votes = torch.zeros_like(weighted[0])
        for d in weighted:
            if consensus == "sum":
                votes.add_(d)
            elif consensus == "count":
                votes.add_(torch.sign(d))
            else:
                raise ValueError(f"unknown consensus {consensus!r}; use sum or count")
        elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
        del votes
        mixed = torch.zeros_like(elected)
        divisor = torch.zeros_like(elected)
        for w, d in zip(weight, weighted):
            agree = consensus_mask(d, elected).to(d.dtype)
            mixed.add_(d.mul_(agree))
            divisor.add_(agree, alpha=float(w))
            del agree
        if normalize:
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    weighted.clear()
    if lambda_ != 1:
        mixed.mul_(float(lambda_))
    return mixed


def per_model_generators(
    generator: torch.Generator | Sequence[torch.Generator | None] | None, n: int
) -> list[torch.Generator | None]:
    """One generator per input model. A single generator is shared (drawn from model after model); a
    sequence gives each model its own stream, which is what lets a row-chunked merge draw the very same
    masks as a whole-tensor one (``torch.rand`` streams concatenate across calls)."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    gens = list(generator)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for {n} models")
    return gens


def slerp(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, t: float, eps: float = 1e-8,
          dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1), treating each tensor as
    one flat vector (mergekit ``slerp``; https://en.wikipedia.org/wiki/Slerp, Shoemake 1985).

    The angle comes from the normalised vectors (norms at or below ``eps`` are left unnormalised); the
    result combines the *unnormalised* tensors: sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1.
    When |cos theta| > ``dot_threshold`` the vectors are nearly colinear and plain lerp is used.
    The angle is computed in float64 (mergekit 0.1.5: float32), which only moves the last bits
    (measured: at most 1.5e-8 absolute difference on tiny float32 Llamas).
    """
    if len(tensors) != 1:
        raise ValueError(f"slerp merges the base with exactly one other model, got {len(tensors)} others")
    s0, s1 = slerp_coefficients(slerp_sums(base, tensors[0]), t, eps=eps, dot_threshold=dot_threshold)
    return base * s0 + tensors[0] * s1


def slerp_sums(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(sum v0^2, sum v1^2, sum v0 v1) in float64: additive, so row chunks can be summed."""
    return torch.stack([
        torch.sum(v0.double() ** 2) if v0.dtype != torch.float64 else torch.sum(v0**2),
        torch.sum(v1.double() ** 2) if v1.dtype != torch.float64 else torch.sum(v1**2),
        torch.sum(v0 * v1, dtype=torch.float64),
    ])


def slerp_coefficients(sums: torch.Tensor, t: float, *, eps: float = 1e-8,
                       dot_threshold: float = 0.9995) -> tuple[float, float]:
    """The weights (s0, s1) of v0 and v1 from :func:`slerp_sums`."""
    n0, n1 = math.sqrt(float(sums[0])), math.sqrt(float(sums[1]))
    dot = float(sums[2]) / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


def model_stock_ratio(cos: torch.Tensor | float, n: int) -> torch.Tensor | float:
    """Model Stock's interpolation ratio t = N cos / (1 + (N - 1) cos) for N fine-tuned models."""
    return n * cos / (1 + (n - 1) * cos)


def model_stock(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522; mergekit ``model_stock``):
    theta = t * mean_i(theta_i) + (1 - t) * theta_b, t = model_stock_ratio(cos, N), where cos is the
    mean pairwise cosine between the task vectors (of the whole tensor, or of each row with
    ``filter_wise``). Needs at least two fine-tuned models.

    The paper derives t for two models; the mean pairwise cosine for more is mergekit's choice, kept
    here. Where 1 + (N - 1) cos is within 1e-6 of zero (cos = -1/(N-1)) t is undefined and the base is
    kept (mergekit would divide by ~0).
    """
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs the base plus at least 2 models, got {len(tensors)}")
    shape = base.shape
    if filter_wise:
        b = base.reshape(1, -1) if base.dim() < 2 else base.reshape(base.shape[0], -1)
    else:
        b = base.reshape(1, -1)
    offsets = [x.reshape(b.shape) - b for x in tensors]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denom = 1 + (n - 1) * cos
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), n * cos / torch.where(denom.abs() < 1e-6, 1.0, denom))
    mean = sum(x.reshape(b.shape) for x in tensors) / n
    return (t * mean + (1 - t) * b).reshape(shape)


def passthrough(tensors: Sequence[torch.Tensor], *, scale: Sequence[float | None] | None = None) -> torch.Tensor:
    """Copy the one source tensor, optionally times its ``scale`` (a per-model parameter, so a list of
    one value; mergekit ``passthrough``). Layer stacking itself is decided by the recipe's slices (or the
    DFS route), which pick the source layer of every output layer."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly one source tensor per output tensor, got {len(tensors)}")
    factor = scale[0] if scale else None
    return tensors[0].clone() if factor is None else tensors[0] * float(factor)


def _check_aligned(tensors: Sequence[torch.Tensor], values: Sequence[float], what: str) -> None:
    if len(values) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(values)} {what} values")
    shapes = {tuple(x.shape) for x in tensors}
    if len(shapes) != 1:
        raise ValueError(f"tensors of different shapes {sorted(shapes)} cannot be merged")
