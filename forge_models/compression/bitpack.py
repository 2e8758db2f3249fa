"""Exact bit packing of unsigned integer fields into a uint8 stream (LSB first), and its inverse.

Every encoder stores its integer fields (seeds, coefficients, exponents, codebook indices, int-k codes)
through these two functions, so the bytes on disk are exactly ``ceil(count * nbits / 8)``: a field of
``nbits`` bits costs ``nbits`` bits, not a whole byte or int16.
"""

from __future__ import annotations

import torch

from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

# Bit expansion is chunked so a 28M-value tensor never materialises 28M x nbits booleans at once.
_CHUNK = 1 << 20


def packed_nbytes(count: int, nbits: int) -> int:
    """Bytes of ``count`` fields of ``nbits`` bits: ceil(count * nbits / 8)."""
    return -(-count * nbits // 8)


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned integers in [0, 2^nbits) (any shape) -> uint8 stream of ceil(n * nbits / 8) bytes.

    Raises:
        ConfigError: ``nbits`` outside [1, 32] or a value that does not fit in ``nbits`` bits.
    """
    if not 1 <= nbits <= 62:
        raise ConfigError(f"nbits must be in [1, 62], got {nbits}")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << nbits)):
        raise ConfigError(f"values must lie in [0, 2^{nbits}); got [{int(flat.min())}, {int(flat.max())}]")
    if nbits == 8:
        return flat.to(torch.uint8).clone()
    if nbits in (1, 2, 4):
        per = 8 // nbits
        pad = (-flat.numel()) % per
        v = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per).to(torch.uint8)
        out = torch.zeros(v.shape[0], dtype=torch.uint8)
        for i in range(per):
            out |= v[:, i] << (i * nbits)
        return out
    total_bits = flat.numel() * nbits
    out = torch.zeros(-(-total_bits // 8), dtype=torch.uint8)
    shifts = torch.arange(nbits, dtype=torch.int64)
    weights = (1 << torch.arange(8, dtype=torch.int64))
    # Chunks hold a multiple of 8 values, so every chunk starts on a byte boundary.
    step = _CHUNK - (_CHUNK % 8)
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        bits = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = (-bits.numel()) % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        byte_vals = (bits.view(-1, 8) * weights).sum(1).to(torch.uint8)
        first = start * nbits // 8
        out[first : first + byte_vals.numel()] = byte_vals
    return out


def unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` fields as int64.

    Raises:
        ArtifactIntegrityError: the stream is not uint8 or has the wrong length for ``count`` fields.
    """
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != packed_nbytes(count, nbits):
        raise ArtifactIntegrityError(
            f"packed stream of dtype {packed.dtype}, shape {tuple(packed.shape)} cannot hold {count} fields of "
            f"{nbits} bits (expected uint8 of {packed_nbytes(count, nbits)} bytes)"
        )
    if nbits == 8:
        return packed.to(torch.int64)
    if nbits in (1, 2, 4):
        per = 8 // nbits
        mask = (1 << nbits) - 1
        fields = torch.stack([(packed >> (i * nbits)) & mask for i in range(per)], dim=1).reshape(-1)
        return fields[:count].to(torch.int64)
    out = torch.empty(count, dtype=torch.int64)
    bit_idx = torch.arange(8, dtype=torch.int64)
    weights = (1 << torch.arange(nbits, dtype=torch.int64))
    step = _CHUNK - (_CHUNK % 8)
    for start in range(0, count, step):
        n = min(step, count - start)
        first = start * nbits // 8
        nbytes = -(-n * nbits // 8)
        bits = ((packed[first : first + nbytes].to(torch.int64).unsqueeze(1) >> bit_idx) & 1).reshape(-1)
        out[start : start + n] = (bits[: n * nbits].view(n, nbits) * weights).sum(1)
    return out
