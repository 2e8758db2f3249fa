"""Row-chunked merging of one tensor: memory bounded by a chunk, not by the largest tensor.

A streaming merge that holds whole tensors peaks at roughly (models + temporaries) x the largest tensor.
For vocabulary-heavy models that is more than a model (Qwen2.5-1.5B: the 151936 x 1536 embedding is 15%
of the model, ~0.9 GB in float32, times ~10 for TIES). Here a tensor is processed in ranges of rows
(dim 0; row-major storage makes each range one contiguous byte range to read and to write), in two
passes where a method needs whole-tensor statistics:

- linear, passthrough, dfs: elementwise, one pass;
- generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*): consensus and
  normalisation are elementwise; DARE masks come from one generator per input model, whose stream
  continues across chunks; DELLA ranks within rows, which chunks keep whole; TIES / breadcrumbs first
  find each model's magnitude thresholds (one model's |delta| at a time, :class:`RankSelector`), then
  mask chunk by chunk;
- slerp: a first pass sums norms and the dot product (float64), the second interpolates;
- model_stock: a first pass sums the task vectors' squared norms and pairwise dot products (float64)
  for the ratio t; with ``filter_wise`` each row is self-contained and one pass suffices.

Every kernel gives exactly the tensor that the reference function in ``methods`` gives on the whole
tensor, which the unit tests check, except the two-pass slerp and model_stock, whose sums are
accumulated in another order (float64; last-bit differences). A model_stock tensor that fits in one
chunk goes through the reference function. Not chunked (whole tensor, reference function): task-vector
methods that rescale sparsified deltas to match a norm (``rescale_norm`` l1/l2/linf needs the norm of
the masked delta first).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from forge_models.merge import methods as m
from forge_models.merge import sparsify as sp
from forge_models.merge.registry import MergeMethod

__all__ = ["Kernel", "kernel_for", "row_ranges", "DEFAULT_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 4 * 2**20
"""Working bytes of one input's chunk (float32: 1M entries). A merge holds ~5-15 chunk-sized buffers
(inputs, deltas, masks, consensus), so this sets peak memory; larger chunks were not measurably faster."""

Read = Callable[[int, int, int], torch.Tensor]
"""read(input, start_row, stop_row) -> rows in the working dtype; input -1 is the base."""


class Kernel(Protocol):
    """Two-pass merge of one tensor over row ranges."""

    whole_1d: bool  # a 1-D tensor must be one chunk (DELLA ranks a 1-D tensor as a single row)

    def prepare(self, read: Read, ranges: Sequence[tuple[int, int]]) -> None: ...

    def rows(self, read: Read, start: int, stop: int) -> torch.Tensor: ...


def row_ranges(shape: Sequence[int], chunk_bytes: int, itemsize: int = 4, whole: bool = False) -> list[tuple[int, int]]:
    """Consecutive row ranges of about ``chunk_bytes`` working bytes each (at least one row)."""
    rows = int(shape[0])
    numel = 1
    for s in shape:
        numel *= int(s)
    if whole or rows == 0 or numel * itemsize <= chunk_bytes:
        return [(0, rows)]
    per_row = (numel // rows) * itemsize
    step = max(1, chunk_bytes // max(1, per_row))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


class _Elementwise:
    """Methods whose output entry depends only on the same entry of the inputs."""

    whole_1d = False

    def __init__(self, method: MergeMethod, values: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> None:
        self.method, self.values, self.per_model = method, values, per_model

    def prepare(self, read: Read, ranges: Sequence[tuple[int, int]]) -> None:
        pass

    def rows(self, read: Read, start: int, stop: int) -> torch.Tensor:
        tensors = [read(i, start, stop) for i in range(len(self.per_model))]
        return self.method.apply(tensors, None, self.values, self.per_model, None)


class _TaskArithmetic:
    """generalized_task_arithmetic over row chunks (see the module docstring)."""

    def __init__(self, sparsification: str | None, consensus: str | None, values: Mapping[str, Any],
                 per_model: Sequence[Mapping[str, Any]], generators: Sequence[torch.Generator | None]) -> None:
        self.sparsification, self.consensus = sparsification, consensus
        self.values, self.per_model, self.generators = values, per_model, generators
        self.norm = values["rescale_norm"] if values["rescale"] else None
        self.weight = [p["weight"] for p in per_model]
        self.whole_1d = sparsification == "della_magprune"
        self.selectors: list[sp.RankSelector | None] = [None] * len(per_model)

    def supported(self) -> bool:
        sparsifying = self.sparsification is not None and any(p.get("density", 1.0) < 1 for p in self.per_model)
        return not (sparsifying and self.norm not in (None, "inverse"))

    def prepare(self, read: Read, ranges: Sequence[tuple[int, int]]) -> None:
        if self.sparsification not in ("magnitude", "magnitude_outliers"):
            return
        for i, p in enumerate(self.per_model):
            if p["density"] >= 1:
                continue
            # One model's |delta| at a time: the thresholds need the whole tensor, the merge does not.
            magnitudes = None
            offset = 0
            for a, b in ranges:
                part = (read(i, a, b) - read(-1, a, b)).abs_().reshape(-1)
                if magnitudes is None:
                    if len(ranges) == 1:
                        magnitudes = part
                        break
                    per_row = part.numel() // max(1, b - a)
                    magnitudes = torch.empty(ranges[-1][1] * per_row, dtype=part.dtype)
                magnitudes[offset : offset + part.numel()] = part
                offset += part.numel()
                del part
            if self.sparsification == "magnitude":
                self.selectors[i] = sp.RankSelector.top_k(magnitudes, p["density"], inplace=True)
            else:
                self.selectors[i] = sp.RankSelector.outliers(magnitudes, p["density"], p["gamma"], inplace=True)
            del magnitudes

    def rows(self, read: Read, start: int, stop: int) -> torch.Tensor:
        base = read(-1, start, stop)
        weighted = []
        for i, p in enumerate(self.per_model):
            delta = read(i, start, stop) - base
            if self.selectors[i] is not None:
                delta.mul_(self.selectors[i].mask(delta.abs()).to(delta.dtype))
            elif self.sparsification == "random":
                delta = sp.bernoulli(delta, p["density"], self.generators[i], self.norm)
            elif self.sparsification == "della_magprune":
                delta = sp.della_magprune(delta, p["density"], p["epsilon"], self.generators[i], self.norm)
            weighted.append(delta.mul_(float(p["weight"])))
        mixed = m.combine_task_vectors(weighted, self.weight, consensus=self.consensus,
                                       normalize=self.values["normalize"], lambda_=self.values["lambda"])
        return base + mixed


class _Slerp:
    """slerp: norms and dot product summed over chunks, then the interpolation chunk by chunk."""

    whole_1d = False

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.t = values["t"]
        self.s0 = self.s1 = 0.0

    def prepare(self, read: Read, ranges: Sequence[tuple[int, int]]) -> None:
        sums = sum(m.slerp_sums(read(-1, a, b), read(0, a, b)) for a, b in ranges)
        self.s0, self.s1 = m.slerp_coefficients(sums, self.t)

    def rows(self, read: Read, start: int, stop: int) -> torch.Tensor:
        return read(-1, start, stop) * self.s0 + read(0, start, stop) * self.s1


class _ModelStock:
    """model_stock: the cosines between task vectors need the whole tensor (or, with ``filter_wise``, the
    whole row: then each chunk of rows is exact on its own)."""

    def __init__(self, values: Mapping[str, Any], n: int) -> None:
        self.filter_wise = values["filter_wise"]
        self.whole_1d = self.filter_wise
        # A tensor that fits one chunk goes through the reference function (bit-identical to mergekit).
        self.reference_when_whole = True
        self.n = n
        self.t = 0.0

    def prepare(self, read: Read, ranges: Sequence[tuple[int, int]]) -> None:
        if self.filter_wise:
            return
        n = self.n
        sq = torch.zeros(n, dtype=torch.float64)
        dots = torch.zeros(n, n, dtype=torch.float64)
        for a, b in ranges:
            base = read(-1, a, b)
            offsets = [read(i, a, b) - base for i in range(n)]
            for i in range(n):
                sq[i] += torch.sum(offsets[i].double() ** 2)
                for j in range(i + 1, n):
                    dots[i, j] += torch.sum(offsets[i] * offsets[j], dtype=torch.float64)
        norms = sq.sqrt()
        cosines = [float((dots[i, j] / max(float(norms[i] * norms[j]), 1e-6)).clamp(-1, 1))
                   for i in range(n) for j in range(i + 1, n)]
        cos = sum(cosines) / len(cosines)
        denom = 1 + (n - 1) * cos
        self.t = 0.0 if abs(denom) < 1e-6 else n * cos / denom

    def rows(self, read: Read, start: int, stop: int) -> torch.Tensor:
        base = read(-1, start, stop)
        tensors = [read(i, start, stop) for i in range(self.n)]
        if self.filter_wise:
            return m.model_stock(tensors, base, filter_wise=True)
        mean = sum(tensors) / self.n
        return mean * self.t + base * (1 - self.t)


def kernel_for(
    method: MergeMethod,
    values: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    generators: Sequence[torch.Generator | None],
) -> Kernel | None:
    """The chunked kernel for a method with resolved parameters, or None (merge the whole tensor)."""
    fn = method.fn
    if fn is m.linear or fn is m.passthrough:
        return _Elementwise(method, values, per_model)
    if getattr(fn, "func", None) is m.generalized_task_arithmetic:
        kernel = _TaskArithmetic(fn.keywords["sparsification"], fn.keywords["consensus"], values, per_model, generators)
        return kernel if kernel.supported() else None
    if fn is m.slerp:
        return _Slerp(values)
    if fn is m.model_stock:
        return _ModelStock(values, len(per_model))
    return None
