"""VPTQ (Liu et al., arXiv 2409.17066): vector quantisation of weight columns under the layer's Hessian.

Minimises tr(dW H dW^T) with H = E[x x^T] of the layer inputs (calibration activations, train split):

1. Each column of W (out x in) is cut into out / v vectors of length v along the output dimension.
2. Codebook of k1 centroids from **Hessian-weighted k-means**: each vector of column n weighs H_nn.
   Optional **residual** codebook (k2 centroids, fitted the same way on the first-stage residual) and
   **outlier columns** (the ``outlier_frac`` of columns with the largest H_nn * ||W_:n||^2, with their
   own codebook pair). k-means: seeded sample initialisation, Lloyd iterations (``kiter``, ``ktol``), on at
   most ``kmeans_sample`` vectors (a deviation from the code's cuML on all vectors, for CPU time).
3. Columns in GPTQ order (natural order; ``act_order`` = descending H_nn), blocks of 128: each vector of
   column q goes to its nearest centroid in Euclidean distance (then the residual centroid of what is
   left); E = (W_:q - Q_:q) / [H^-1]_qq updates the rest of the block, W_:,q+1.. -= E [H^-1]_q,q+1..
   (H^-1 the upper Cholesky factor of the damped inverse, ``percdamp`` 0.01), lazy update after the block.
4. Stored: bit-packed indices (ceil(log2 k) bits per vector and stage), fp16 codebooks, int32 outlier ids.
   Bits per weight = index bits + codebook overhead, both counted.

Layer-wise fine-tuning (optional in the paper) is not implemented.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from forge_models.compression.bitpack import pack_bits, unpack_bits
from forge_models.compression.encoders import Encoded, Encoder, register
from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = ["VPTQ", "nearest", "weighted_kmeans", "gptq_vq", "proxy_error", "vptq_bits", "index_bits"]


def index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def vptq_bits(out: int, inp: int, v: int, k1: int, k2: int = 0, cb_bits: int = 16) -> tuple[float, float]:
    """(index bits per weight, codebook-overhead bits per weight) of one tensor, as in the paper's formula."""
    idx = math.log2(k1) / v + (math.log2(k2) / v if k2 else 0.0)
    overhead = (v * (k1 + k2)) * cb_bits / (out * inp)
    return idx, overhead


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of each row of x (N, v); centroids (k, v)."""
    cn = (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        d = cn.unsqueeze(0) - 2.0 * (xb @ centroids.T)  # ||x||^2 is constant per row
        out[i : i + chunk] = d.argmin(1)
    return out


def weighted_kmeans(
    x: torch.Tensor, weights: torch.Tensor, k: int, iters: int, tol: float, seed: int, sample: int
) -> torch.Tensor:
    """Weighted Lloyd k-means on rows of x (N, v) with non-negative row weights; returns (k, v) centroids.

    Initialisation: k distinct rows drawn with probability proportional to weight (seeded). At most
    ``sample`` rows (drawn the same way, without replacement) are used for fitting.
    """
    g = torch.Generator().manual_seed(seed)
    w = weights.double().clamp(min=0) + 1e-12
    if x.shape[0] > sample:
        pick = torch.multinomial(w, sample, replacement=False, generator=g)
        x, w = x[pick], w[pick]
    x = x.double()
    k_eff = min(k, x.shape[0])
    init = torch.multinomial(w, k_eff, replacement=False, generator=g)
    c = x[init].clone()
    prev = float("inf")
    for _ in range(iters):
        a = nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x * w.unsqueeze(1))
        mass = torch.zeros(k_eff, dtype=torch.float64).index_add_(0, a, w)
        alive = mass > 0
        c[alive] = sums[alive] / mass[alive].unsqueeze(1)
        obj = float((w * ((x - c[a]) ** 2).sum(1)).sum())
        if math.isfinite(prev) and prev - obj <= tol * max(prev, 1e-30):
            break
        prev = obj
    if k_eff < k:  # fewer vectors than centroids: pad with copies (never selected twice by argmin)
        c = torch.cat([c, c[:1].repeat(k - k_eff, 1)])
    return c.float()


def proxy_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative proxy error tr(dW H dW^T) / tr(W H W^T)."""
    d = (w - w_hat).double()
    hd = h.double()
    return float(((d @ hd) * d).sum() / ((w.double() @ hd) * w.double()).sum())


def _damped_inverse_chol(h: torch.Tensor, w: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w = w.clone()
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), w


def gptq_vq(
    w: torch.Tensor,
    h: torch.Tensor,
    v: int,
    codebooks: list[tuple[torch.Tensor, torch.Tensor | None]],
    col_group: torch.Tensor,
    *,
    error_feedback: bool = True,
    act_order: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The column loop: returns (W_hat (out, in), main indices (in, out/v), residual indices or None).

    ``codebooks[g]`` = (main (k1, v), residual (k2, v) or None) for column group g; ``col_group`` (in,)
    gives each column's group. With ``error_feedback=False`` each vector is simply rounded to its nearest
    centroid (the k-means-only ablation). Computes in float64.
    """
    out, inp = w.shape
    nv = out // v
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(inp)
    invperm = torch.argsort(perm)
    hinv, w = _damped_inverse_chol(h[perm][:, perm], w.double()[:, perm], percdamp)
    groups = col_group[perm]
    has_res = codebooks[0][1] is not None
    idx1 = torch.zeros(inp, nv, dtype=torch.int64)
    idx2 = torch.zeros(inp, nv, dtype=torch.int64) if has_res else None
    q_all = torch.zeros_like(w)
    cbs = [(c1.double(), None if c2 is None else c2.double()) for c1, c2 in codebooks]
    for i0 in range(0, inp, blocksize):
        i1 = min(i0 + blocksize, inp)
        err_block = torch.zeros(out, i1 - i0, dtype=torch.float64)
        for j in range(i0, i1):
            col = w[:, j].view(nv, v)
            c1, c2 = cbs[int(groups[j])]
            a = nearest(col, c1)
            qcol = c1[a]
            idx1[j] = a
            if c2 is not None:
                b = nearest(col - qcol, c2)
                qcol = qcol + c2[b]
                idx2[j] = b
            qcol = qcol.reshape(out)
            q_all[:, j] = qcol
            if error_feedback:
                e = (w[:, j] - qcol) / hinv[j, j]
                w[:, j + 1 : i1] -= e.unsqueeze(1) * hinv[j, j + 1 : i1].unsqueeze(0)
                err_block[:, j - i0] = e
        if error_feedback and i1 < inp:
            w[:, i1:] -= err_block @ hinv[i0:i1, i1:]
    return q_all[:, invperm].float(), idx1[invperm], None if idx2 is None else idx2[invperm]


@register
class VPTQ(Encoder):
    """VPTQ with one codebook (and optional residual codebook) per tensor, plus outlier columns."""

    name: ClassVar[str] = "vptq"
    uses_hessian: ClassVar[bool] = True
    v: int = Field(4, ge=1, le=32, description="Vector length along the output dimension.")
    k1: int = Field(256, ge=2, le=1 << 16, description="Centroids of the main codebook.")
    k2: int = Field(0, ge=0, le=1 << 16, description="Centroids of the residual codebook (0 = none).")
    outlier_frac: float = Field(0.0, ge=0.0, le=0.5, description="Share of columns with their own codebooks.")
    kiter: int = Field(25, ge=1, le=1000, description="k-means iterations (the code's default is 100).")
    ktol: float = Field(1e-5, ge=0.0, description="Relative k-means objective tolerance.")
    kmeans_sample: int = Field(65536, ge=256, description="Most vectors used to fit a codebook.")
    percdamp: float = Field(0.01, gt=0.0, le=1.0, description="Hessian dampening, share of mean diag(H).")
    act_order: bool = Field(False, description="Visit columns in descending H_nn (GPTQ's act-order).")
    hessian_weighted: bool = Field(True, description="Weight k-means vectors by H_nn (off = plain k-means).")
    error_feedback: bool = Field(True, description="GPTQ error feedback in the column loop.")

    @model_validator(mode="after")
    def _valid(self) -> "VPTQ":
        if self.k2 == 1:
            raise ValueError("k2 must be 0 (no residual codebook) or >= 2")
        return self

    def _rows(self, out: int) -> int:
        return -(-out // self.v) * self.v

    def _fit(self, vecs, wts, seed):
        c1 = weighted_kmeans(vecs, wts, self.k1, self.kiter, self.ktol, seed, self.kmeans_sample)
        c2 = None
        if self.k2:
            r = vecs - c1[nearest(vecs, c1)]
            c2 = weighted_kmeans(r, wts, self.k2, self.kiter, self.ktol, seed + 1, self.kmeans_sample)
        return c1, c2

    def fit_codebooks(self, w: torch.Tensor, h: torch.Tensor, seed: int):
        """(codebooks per column group, column group of each column) for padded w (out_p, in)."""
        out, inp = w.shape
        diag = torch.diag(h).float().clamp(min=0)
        col_w = diag if self.hessian_weighted else torch.ones(inp)
        groups = torch.zeros(inp, dtype=torch.int64)
        n_out = int(round(self.outlier_frac * inp))
        if n_out:
            score = diag * (w * w).sum(0)
            groups[torch.topk(score, n_out).indices] = 1
        books = []
        for gi in range(2 if n_out else 1):
            cols = torch.nonzero(groups == gi).squeeze(1)
            vecs = w[:, cols].T.reshape(-1, self.v)  # (ncols * out/v, v), column-major order of vectors
            wts = col_w[cols].repeat_interleave(out // self.v)
            c1, c2 = self._fit(vecs, wts, seed + 17 * gi)
            # The loop must use the centroids as stored (fp16), or the decoded weights would differ from
            # what the error feedback compensated.
            books.append((c1.half().float(), None if c2 is None else c2.half().float()))
        return books, groups

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        out, inp = w.shape
        h = torch.eye(inp) if hessian is None else hessian.detach().float().cpu()
        if h.shape != (inp, inp):
            raise ConfigError(f"Hessian of shape {tuple(h.shape)} does not match a weight with {inp} inputs")
        out_p = self._rows(out)
        wp = torch.zeros(out_p, inp)
        wp[:out] = w
        books, groups = self.fit_codebooks(wp, h, seed)
        _, idx1, idx2 = gptq_vq(
            wp, h, self.v, books, groups, error_feedback=self.error_feedback, act_order=self.act_order,
            percdamp=self.percdamp,
        )
        tensors = {"idx1": pack_bits(idx1, index_bits(self.k1))}
        if idx2 is not None:
            tensors["idx2"] = pack_bits(idx2, index_bits(self.k2))
        for gi, (c1, c2) in enumerate(books):
            tensors[f"cb1_{gi}"] = c1.to(torch.float16).contiguous()
            if c2 is not None:
                tensors[f"cb2_{gi}"] = c2.to(torch.float16).contiguous()
        if len(books) > 1:
            tensors["outlier_cols"] = torch.nonzero(groups == 1).squeeze(1).to(torch.int32)
        return Encoded(self.name, self.model_dump(), (out, inp), tensors, {"n_outlier": int((groups == 1).sum())})

    def decode(self, enc, dtype=torch.float32):
        out, inp = enc.shape
        out_p = self._rows(out)
        nv = out_p // self.v
        idx1 = unpack_bits(enc.tensors["idx1"], index_bits(self.k1), inp * nv).view(inp, nv)
        groups = torch.zeros(inp, dtype=torch.int64)
        if "outlier_cols" in enc.tensors:
            groups[enc.tensors["outlier_cols"].to(torch.int64)] = 1
        if int(idx1.max()) >= self.k1:
            raise ArtifactIntegrityError(f"VPTQ index {int(idx1.max())} outside a codebook of {self.k1}")
        wt = torch.empty(inp, nv, self.v)
        idx2 = None
        if self.k2:
            idx2 = unpack_bits(enc.tensors["idx2"], index_bits(self.k2), inp * nv).view(inp, nv)
        for gi in range(int(groups.max()) + 1):
            cols = torch.nonzero(groups == gi).squeeze(1)
            part = enc.tensors[f"cb1_{gi}"].double()[idx1[cols]]
            if idx2 is not None:
                part = part + enc.tensors[f"cb2_{gi}"].double()[idx2[cols]]
            wt[cols] = part.float()
        return wt.reshape(inp, out_p).T[:out].to(dtype).contiguous()

    def payload_bits(self, shape):
        out, inp = shape
        nvec = inp * (self._rows(out) // self.v)
        n_out = int(round(self.outlier_frac * inp))
        ngroups = 2 if n_out else 1
        bits = nvec * index_bits(self.k1) + ngroups * self.k1 * self.v * 16
        if self.k2:
            bits += nvec * index_bits(self.k2) + ngroups * self.k2 * self.v * 16
        if n_out:
            bits += n_out * 32
        return bits
