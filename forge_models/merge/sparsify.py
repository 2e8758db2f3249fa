"""Sparsifiers for task vectors (deltas against the base), one tensor at a time.

Each function keeps some entries of a delta and zeroes the rest, then optionally rescales what is kept:

- ``magnitude``: the top ``density`` fraction by |delta| (TIES trim, https://arxiv.org/abs/2306.01708).
- ``magnitude_outliers``: drop the largest ``gamma`` fraction and enough of the smallest to keep
  ``density`` (Model Breadcrumbs, https://arxiv.org/abs/2312.06795).
- ``bernoulli``: keep each entry with probability ``density`` (DARE, https://arxiv.org/abs/2311.03099).
- ``della_magprune``: keep probability linear in the magnitude rank within each row, in
  [density - epsilon, density + epsilon] (DELLA, https://arxiv.org/abs/2406.11617).

Rescaling (``rescale_norm``):

- ``"inverse"``: divide each kept entry by its keep probability, as both papers do (DARE: 1/(1-p) with
  drop rate p = 1 - density; DELLA: 1/p_i per entry). The merged delta is then unbiased: E[out] = delta.
- ``"l1"`` / ``"l2"`` / ``"linf"``: mergekit's ``rescaled_masked_tensor`` (since mergekit PR #245): scale
  the masked tensor so that its norm equals the original's. mergekit's ``rescale: true`` means ``"l1"``.
- ``None``: no rescaling.

Trimming is always per tensor (mergekit's convention); the TIES paper trims over the whole flattened
model instead (see ``forge_models.merge.methods``).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["RescaleNorm", "rescale_masked", "magnitude", "magnitude_outliers", "bernoulli", "della_magprune",
           "RankSelector"]

RescaleNorm = Literal["inverse", "l1", "l2", "linf"]
_EPS = 1e-7


def rescale_masked(
    delta: torch.Tensor,
    mask: torch.Tensor,
    norm: RescaleNorm | None,
    keep_probability: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``delta * mask``, rescaled by keep probability ("inverse") or to match a norm of ``delta``."""
    masked = delta * mask
    if norm is None:
        return masked
    if norm == "inverse":
        if keep_probability is None:
            raise ValueError("rescale_norm 'inverse' needs the keep probability (random sparsifiers only)")
        return masked / keep_probability
    if norm == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = delta.norm(), masked.norm()
    elif norm == "linf":
        before, after = delta.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"unknown rescale_norm {norm!r}; use inverse, l1, l2 or linf")
    # Like mergekit: an (almost) all-zero delta or mask is returned unscaled instead of dividing by ~0.
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale_norm: RescaleNorm | None = None) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (TIES "trim"), at least one.

    Ties in magnitude are broken by position (stable sort), so the result is deterministic; mergekit
    uses an unstable argsort (identical results unless magnitudes tie). ``density >= 1`` returns
    ``delta`` itself. When ``int(density * numel)`` is 0 (a 1-entry bias such as Cognate's
    ``model.halt.bias`` at any density < 1) the largest entry is kept, as mergekit 0.1.5 does (older
    mergekit failed an assertion there).
    """
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    if rescale_norm == "inverse":
        raise ValueError("magnitude trimming is deterministic; use rescale_norm l1/l2/linf or none")
    order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[order[:k]] = 1
    return rescale_masked(delta, mask.view_as(delta), rescale_norm)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float = 0.01, rescale_norm: RescaleNorm | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma * numel)`` largest entries and the smallest ones, keeping
    exactly ``int(density * numel)`` entries (at least one, as in :func:`magnitude`).

    If ``density + gamma > 1`` fewer large outliers are dropped so the density is still met (mergekit's
    rule). The kept range of the ascending magnitude order is ``[n_bot, numel - n_top)``, as in mergekit
    0.1.5; older mergekit sliced ``[n_bot:-n_top]``, which keeps *nothing* when ``int(gamma * numel)`` is
    0 (any tensor under 100 entries at gamma 0.01).
    """
    if density >= 1:
        return delta
    if rescale_norm == "inverse":
        raise ValueError("breadcrumbs trimming is deterministic; use rescale_norm l1/l2/linf or none")
    n = delta.numel()
    keep = max(1, int(density * n))
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.argsort(delta.abs().reshape(-1), stable=True)  # ascending magnitude
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot : n - n_top]] = 1
    return rescale_masked(delta, mask.view_as(delta), rescale_norm)


def bernoulli(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    rescale_norm: RescaleNorm | None = "inverse",
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (drop rate p = 1 - density).

    ``rescale_norm="inverse"`` is the paper's delta_hat = (1 - m) * delta / (1 - p); mergekit's default
    (``rescale: true``) corresponds to ``"l1"``. The mask is drawn from ``generator``, so a fixed seed
    gives the same output.
    """
    if density >= 1:
        return delta
    if density <= 0:
        raise ValueError(f"DARE density must be in (0, 1], got {density}")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device) < density
    return rescale_masked(delta, keep.to(delta.dtype), rescale_norm, keep_probability=density)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    rescale_norm: RescaleNorm | None = "inverse",
) -> torch.Tensor:
    """DELLA MagPrune: within each row (a 1-D tensor is one row) the entry of rank r (0 = smallest of n)
    is kept with probability ``density - epsilon + 2 * epsilon * r / (n - 1)``.

    Rows follow mergekit's ``della_magprune`` (rank-normalised to [0, 1], so the mean keep probability
    is ``density``). ``"inverse"`` divides each kept entry by its own keep probability, as the DELLA
    paper's rescaling step does; mergekit uses the L1 rescale.
    """
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon < 1, got {density} +/- {epsilon}")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    if n > 1:
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
        rank01 = ranks / (n - 1)
    else:
        rank01 = torch.full(rows.shape, 0.5)  # a single entry sits in the middle of its row
    probability = (density - epsilon) + 2 * epsilon * rank01
    keep = torch.rand(rows.shape, generator=generator, dtype=torch.float32, device=delta.device) < probability
    out = rescale_masked(rows, keep.to(delta.dtype), rescale_norm, keep_probability=probability.to(delta.dtype))
    return out.reshape(delta.shape)


class RankSelector:
    """Chunk-by-chunk equivalent of keeping the entries whose rank in a *stable* sort of ``|delta|`` lies
    in ``[lo, hi)``: ``magnitude`` is ranks [0, k) descending, ``magnitude_outliers`` ranks
    [n_bot, n_bot + keep) ascending. Equal magnitudes are ranked by position, as a stable sort does.

    Built from the full magnitude vector with one selection (``numpy.partition``: one copy of the
    vector; an argsort would add int64 indices of twice its size and take ~10x longer, and
    ``torch.kthvalue`` also allocates int64 indices); :meth:`mask` then takes consecutive flat chunks in
    order.
    """

    def __init__(self, magnitudes: torch.Tensor, lo: int, hi: int, descending: bool, *, inplace: bool = False) -> None:
        a = magnitudes.detach().reshape(-1).cpu()
        n = a.numel()
        if not 0 <= lo < hi <= n:
            raise ValueError(f"rank range [{lo}, {hi}) outside 0..{n}")
        self.lo, self.hi, self.descending = lo, hi, descending
        # Ascending positions of the values at ranks lo and hi - 1 of the requested order.
        first, last = (n - 1 - lo, n - hi) if descending else (lo, hi - 1)
        if a.dtype in (torch.float32, torch.float64):
            # inplace: reorder the caller's buffer (the counts below do not depend on order).
            picked = a.numpy() if inplace else a.numpy().copy()
        else:
            picked = a.float().numpy()  # already a fresh copy
        picked.partition(sorted({first, last}))
        self.first, self.last = float(picked[first]), float(picked[last])
        del picked
        self.before: dict[float, int] = {}
        for v in {self.first, self.last}:
            # count_nonzero: a bool .sum() would materialise an int64 copy of the whole vector.
            self.before[v] = int(torch.count_nonzero(a > v if descending else a < v))
        self.seen = dict.fromkeys(self.before, 0)

    def mask(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask of the next chunk (flattened order continues where the last chunk ended)."""
        a = magnitudes.reshape(-1)
        if self.descending:
            keep = (a < self.first) & (a > self.last)
        else:
            keep = (a > self.first) & (a < self.last)
        for v, before in self.before.items():
            eq = a == v
            count = int(torch.count_nonzero(eq))
            if count:
                rank = before + self.seen[v] + torch.cumsum(eq, 0) - 1
                keep |= eq & (rank >= self.lo) & (rank < self.hi)
                self.seen[v] += count
        return keep.view(magnitudes.shape)

    @classmethod
    def top_k(cls, magnitudes: torch.Tensor, density: float, *, inplace: bool = False) -> "RankSelector":
        """The selection of :func:`magnitude` (keep ``max(1, int(density * numel))`` largest).
        ``inplace`` lets the selection reorder ``magnitudes`` instead of copying it."""
        n = magnitudes.numel()
        return cls(magnitudes, 0, max(1, int(density * n)), descending=True, inplace=inplace)

    @classmethod
    def outliers(cls, magnitudes: torch.Tensor, density: float, gamma: float, *, inplace: bool = False) -> "RankSelector":
        """The selection of :func:`magnitude_outliers`."""
        n = magnitudes.numel()
        keep = max(1, int(density * n))
        n_top = int(gamma * n)
        n_bot = max(0, n - keep - n_top)
        return cls(magnitudes, n_bot, n_bot + keep, descending=False, inplace=inplace)
