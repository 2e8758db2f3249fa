"""SeedLM (Shafipour et al., arXiv 2410.10714): each block of C weights as U(s) t, seed + a few 4-bit numbers.

- A K-bit Fibonacci LFSR (feedback = XOR of the state bits at ``taps``; state <- (state >> 1) |
  (feedback << (K - 1))) seeded with s in [1, 2^K - 1] emits C*P states V(s) (the seed itself first);
  ``U(s) = (V(s) - 2^(K-1)) / (2^(K-1) - 1)``, a C x P matrix filled row by row. The taps must make a
  primitive polynomial (period 2^K - 1): then every seed is a position on one cycle and the whole bank
  of 2^K - 1 matrices is the set of sliding windows of one sequence, built once per (K, taps, C, P).
- t = U(s)^+ w is quantised to P Q-bit two's-complement integers with one shared E-bit exponent
  ``e = ceil(log2(max|t| / (2^(Q-1) - 1)))``; the seed minimising ||w - U(s) t_q||_2 is kept
  (exhaustive, data-free). The search is two matmuls per chunk of seeds against the pseudo-inverse and
  U^T banks, with the error expanded as ||w||^2 - 2 t_q.(U^T w) + t_q^T (U^T U) t_q.
- One block is stored as one record of exactly K + P*Q + E bits (seed | codes | exponent), bit-packed;
  per tensor one int16 exponent offset e0 (the 2^E exponents are e0 .. e0 + 2^E - 1).

Deviation from the paper, stated: the exponent range is set per tensor from max|W| (e_hi =
ceil(log2(max|W| / 7)) + 6, e0 = e_hi - 2^E + 1); a seed whose coefficients need a larger exponent is
clamped and simply loses the search. The paper does not publish code; its exponent convention may differ.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from forge_models.compression.bitpack import pack_bits, unpack_bits
from forge_models.compression.encoders import Encoded, Encoder, register
from forge_models.runtime import ConfigError

__all__ = ["TAPS", "SeedLM", "lfsr_step", "lfsr_states", "lfsr_period", "seed_bank", "seedlm_search"]

TAPS: dict[int, tuple[int, ...]] = {
    8: (0, 1, 2, 7),
    9: (0, 4),
    10: (0, 3),
    11: (0, 2),
    12: (0, 1, 2, 8),
    13: (0, 1, 2, 5),
    14: (0, 1, 2, 12),
    15: (0, 1),
    16: (0, 1, 3, 12),  # the reference's K = 16 taps ("as given in the paper")
}
"""Primitive taps per K under this module's LFSR convention (the K = 16 set is the reference's; the
others are the lexicographically first 2- or 4-tap sets with period 2^K - 1, found by exhaustive check and
verified by the unit tests)."""


def lfsr_step(state: int, k: int, taps: tuple[int, ...]) -> int:
    fb = 0
    for t in taps:
        fb ^= (state >> t) & 1
    return (state >> 1) | (fb << (k - 1))


def lfsr_states(seed: int, k: int, taps: tuple[int, ...], n: int) -> list[int]:
    """The first ``n`` states from ``seed`` (the seed first), by direct integer iteration."""
    out, s = [], seed
    for _ in range(n):
        out.append(s)
        s = lfsr_step(s, k, taps)
    return out


def lfsr_period(k: int, taps: tuple[int, ...], seed: int = 1) -> int:
    """Steps until the LFSR returns to ``seed`` (2^K - 1 exactly when the taps are primitive)."""
    s, n = lfsr_step(seed, k, taps), 1
    while s != seed:
        s, n = lfsr_step(s, k, taps), n + 1
        if n > (1 << k):
            raise ConfigError(f"LFSR with taps {taps} does not return to its seed (not a permutation)")
    return n


@functools.lru_cache(maxsize=4)
def seed_bank(k: int, taps: tuple[int, ...], c: int, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, pinv, G) for every seed 1..2^K - 1 (row s - 1): U (N, C, P), pinv (N, P, C), G = U^T U (N, P, P).

    Built from one cycle of the LFSR as sliding windows; float32. Cached (a pure function of its args).
    """
    n = (1 << k) - 1
    period = lfsr_period(k, taps)
    if period != n:
        raise ConfigError(f"taps {taps} are not primitive for K = {k}: period {period} != {n}")
    seq = torch.tensor(lfsr_states(1, k, taps, n), dtype=torch.int64)
    pos = torch.empty(n + 1, dtype=torch.int64)
    pos[seq] = torch.arange(n)
    starts = pos[1:]  # position of seed s at row s - 1
    idx = (starts.unsqueeze(1) + torch.arange(c * p)) % n
    v = seq[idx].double()
    half = float(1 << (k - 1))
    u = ((v - half) / (half - 1.0)).view(n, c, p)
    pinv = torch.linalg.pinv(u)
    g = u.transpose(1, 2) @ u
    return u.float().contiguous(), pinv.float().contiguous(), g.float().contiguous()


def _quantise(t: torch.Tensor, e0: int, q: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (..., P) -> (integer codes (..., P) in [-2^(Q-1), 2^(Q-1) - 1], exponents (...) in [e0, e0+2^E-1])."""
    qmax = (1 << (q - 1)) - 1
    m = t.abs().amax(-1).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(m / qmax)).clamp(e0, e0 + (1 << e) - 1)
    codes = (t / torch.exp2(exp).unsqueeze(-1)).round().clamp(-qmax - 1, qmax)
    return codes, exp


def seedlm_search(
    blocks: torch.Tensor, k: int, taps: tuple[int, ...], p: int, q: int, e: int, e0: int,
    seeds: torch.Tensor | None = None, work: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exhaustive seed search for blocks (B, C): (seeds (B,), codes (B, P), exponents (B,), sq. errors (B,)).

    ``seeds`` restricts the search to a subset (tests use it for the one-seed baseline). ``work`` bounds
    the seeds x blocks of one chunk (memory ~ 10 * work * P floats).
    """
    b, c = blocks.shape
    u, pinv, g = seed_bank(k, taps, c, p)
    all_seeds = torch.arange(1, (1 << k), dtype=torch.int64) if seeds is None else seeds.to(torch.int64)
    rows = all_seeds - 1
    ut = u.transpose(1, 2).contiguous()
    best_err = torch.full((b,), float("inf"))
    best_seed = torch.zeros(b, dtype=torch.int64)
    best_codes = torch.zeros(b, p)
    best_exp = torch.zeros(b)
    wsq = (blocks * blocks).sum(1)
    bchunk = max(1, min(b, work // 256))
    for b0 in range(0, b, bchunk):
        wb = blocks[b0 : b0 + bchunk]
        nb = wb.shape[0]
        schunk = max(1, work // nb)
        for s0 in range(0, rows.numel(), schunk):
            r = rows[s0 : s0 + schunk]
            n = r.numel()
            t = (pinv[r].reshape(n * p, c) @ wb.T).view(n, p, nb).transpose(1, 2)  # (n, nb, P)
            a = (ut[r].reshape(n * p, c) @ wb.T).view(n, p, nb).transpose(1, 2)
            codes, exp = _quantise(t, e0, q, e)
            tq = codes * torch.exp2(exp).unsqueeze(-1)
            quad = (torch.einsum("nbp,npq->nbq", tq, g[r]) * tq).sum(-1)
            err = wsq[b0 : b0 + nb] - 2.0 * (tq * a).sum(-1) + quad  # (n, nb)
            val, arg = err.min(0)
            better = val < best_err[b0 : b0 + nb]
            if bool(better.any()):
                ii = torch.nonzero(better).squeeze(1)
                best_err[b0 + ii] = val[ii]
                best_seed[b0 + ii] = r[arg[ii]] + 1
                best_codes[b0 + ii] = codes[arg[ii], ii]
                best_exp[b0 + ii] = exp[arg[ii], ii]
    return best_seed, best_codes, best_exp, best_err.clamp(min=0)


@register
class SeedLM(Encoder):
    """SeedLM blocks: C weights per block, P coefficients of Q bits, E-bit shared exponent, K-bit seed.

    Bits per weight = (K + P*Q + E) / C: C=8, P=3, K=16 -> 4.00; C=12, P=4, K=16 -> 3.00 (the paper's
    configurations); smaller K for CPU runs (C=8, P=3, K=12 -> 3.50).
    """

    name: ClassVar[str] = "seedlm"
    c: int = Field(8, ge=2, le=64, description="Weights per block C.")
    p: int = Field(3, ge=1, le=16, description="Coefficients per block P (must be <= C).")
    k: int = Field(16, ge=8, le=16, description="LFSR bits K (seed bits per block); 2^K - 1 seeds searched.")
    q: int = Field(4, ge=2, le=8, description="Bits per coefficient Q (two's complement).")
    e: int = Field(4, ge=1, le=8, description="Bits of the shared exponent E.")

    @model_validator(mode="after")
    def _valid(self) -> "SeedLM":
        if self.p > self.c:
            raise ValueError(f"P ({self.p}) must be <= C ({self.c})")
        if self.record_bits > 62:
            raise ValueError(f"a block record of K + P*Q + E = {self.record_bits} bits exceeds 62")
        return self

    @property
    def record_bits(self) -> int:
        return self.k + self.p * self.q + self.e

    @property
    def taps(self) -> tuple[int, ...]:
        return TAPS[self.k]

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(-1)
        pad = (-flat.numel()) % self.c
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.view(-1, self.c)

    def exponent_offset(self, w: torch.Tensor) -> int:
        qmax = (1 << (self.q - 1)) - 1
        m = float(w.abs().max())
        e_hi = math.ceil(math.log2(max(m, 1e-30) / qmax)) + 6
        return e_hi - (1 << self.e) + 1

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        blocks = self._blocks(w)
        e0 = self.exponent_offset(w)
        seeds, codes, exps, _ = seedlm_search(blocks, self.k, self.taps, self.p, self.q, self.e, e0)
        return self.pack(tuple(w.shape), seeds, codes, exps, e0)

    def pack(self, shape, seeds, codes, exps, e0) -> Encoded:
        half = 1 << (self.q - 1)
        record = seeds.to(torch.int64)
        for i in range(self.p):
            record = record | ((codes[:, i].to(torch.int64) + half) << (self.k + i * self.q))
        record = record | ((exps.to(torch.int64) - e0) << (self.k + self.p * self.q))
        tensors = {"records": pack_bits(record, self.record_bits), "e0": torch.tensor([e0], dtype=torch.int16)}
        return Encoded(self.name, self.model_dump(), tuple(shape), tensors)

    def unpack(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seeds (B,), integer codes (B, P), exponents (B,)) from the stored records."""
        numel = enc.numel
        nb = -(-numel // self.c)
        rec = unpack_bits(enc.tensors["records"], self.record_bits, nb)
        e0 = int(enc.tensors["e0"][0])
        seeds = rec & ((1 << self.k) - 1)
        half = 1 << (self.q - 1)
        codes = torch.stack(
            [((rec >> (self.k + i * self.q)) & ((1 << self.q) - 1)) - half for i in range(self.p)], dim=1
        )
        exps = ((rec >> (self.k + self.p * self.q)) & ((1 << self.e) - 1)) + e0
        return seeds, codes, exps

    def decode(self, enc, dtype=torch.float32):
        seeds, codes, exps = self.unpack(enc)
        if bool((seeds == 0).any()):
            from forge_models.runtime import ArtifactIntegrityError

            raise ArtifactIntegrityError("SeedLM record holds seed 0, which an LFSR never emits")
        u, _, _ = seed_bank(self.k, self.taps, self.c, self.p)
        t = codes.float() * torch.exp2(exps.float()).unsqueeze(1)
        out = torch.empty(seeds.numel(), self.c)
        step = 1 << 18
        for i in range(0, seeds.numel(), step):
            out[i : i + step] = torch.einsum("bcp,bp->bc", u[seeds[i : i + step] - 1], t[i : i + step])
        return out.reshape(-1)[: enc.numel].view(enc.shape).to(dtype)

    def payload_bits(self, shape):
        nb = -(-(shape[0] * shape[1]) // self.c)
        return nb * self.record_bits + 16
