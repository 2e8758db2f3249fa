"""Packed storage of ternary matrices: 2 bits per weight (transformers' layout) or 5 weights per byte.

Both pack along the first (output) dimension, so a ``(out, in)`` matrix becomes ``(ceil(out / k), in)``
bytes with k = 4 or 5:

- ``"2bit"`` — byte-compatible with ``transformers.integrations.bitnet.pack_weights``: the code
  ``v + 1`` (in {0, 1, 2}) of row ``r`` goes to bits ``2i .. 2i+1`` of packed row ``r mod R``, with
  ``R = ceil(out / 4)`` and ``i = r // R``. Padding rows (out not a multiple of 4) hold code 0, exactly as
  transformers' zero-initialised buffer does. 2 bits per weight; 8x smaller than bf16.
- ``"base3"`` — the 3^5 = 243 <= 256 bound: five codes ``c_0..c_4`` (rows ``r + i * R``,
  ``R = ceil(out / 5)``) become one byte ``sum c_i * 3^i``. 1.6 bits per weight. Not a transformers format:
  only :func:`forge_models.bitnet.export.load_packed` reads it. Padding rows hold code 1 (weight 0).

Unpacking needs the true ``out`` (padding rows are dropped), so exports record every matrix's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = ["Packing", "PACKINGS", "pack_fields", "pack_2bit", "unpack_2bit", "pack_base3", "unpack_base3", "packed_rows"]


def _codes(q: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} -> {0, 1, 2} as uint8, shape (out, rest) (refuses anything else: no silent clamping)."""
    if q.ndim < 1 or q.shape[0] == 0:
        raise ConfigError(f"cannot pack a tensor of shape {tuple(q.shape)}")
    if q.is_floating_point() and not bool(torch.equal(q, q.round())):
        raise ConfigError("pack expects ternary integers {-1, 0, 1}; got non-integer values")
    q = q.reshape(q.shape[0], -1)
    if bool(((q < -1) | (q > 1)).any()):
        raise ConfigError("pack expects ternary values {-1, 0, 1}; got values outside that set")
    return (q.to(torch.int16) + 1).to(torch.uint8)


def packed_rows(out_features: int, values_per_byte: int) -> int:
    """Rows of the packed buffer: ceil(out / values_per_byte)."""
    return -(-out_features // values_per_byte)


def pack_fields(codes: torch.Tensor) -> torch.Tensor:
    """2-bit fields ``(out, rest)`` uint8 in [0, 3] -> ``(ceil(out/4), rest)``: row r to bits 2i of row r mod R."""
    out = codes.shape[0]
    rows = packed_rows(out, 4)
    padded = torch.zeros((4 * rows, codes.shape[1]), dtype=torch.uint8, device=codes.device)
    padded[:out] = codes
    blocks = padded.view(4, rows, -1)
    return blocks[0] | (blocks[1] << 2) | (blocks[2] << 4) | (blocks[3] << 6)


def pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Ternary ``(out, ...)`` -> uint8 ``(ceil(out/4), ...)`` in transformers' ``pack_weights`` layout."""
    return pack_fields(_codes(q)).reshape((packed_rows(q.shape[0], 4), *q.shape[1:]))


def unpack_2bit(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 ``(ceil(out/4), ...)`` -> int8 ternary ``(out, ...)``; inverse of :func:`pack_2bit`."""
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or rows != packed_rows(out_features, 4):
        raise ArtifactIntegrityError(
            f"2-bit packed tensor of dtype {packed.dtype} and shape {tuple(packed.shape)} cannot hold "
            f"{out_features} rows (expected uint8 with {packed_rows(out_features, 4)} rows)"
        )
    flat = packed.reshape(rows, -1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1, 1)
    codes = ((flat.unsqueeze(0) >> shifts) & 3).reshape(4 * rows, -1)[:out_features]
    if bool((codes == 3).any()):
        raise ArtifactIntegrityError("2-bit packed tensor holds code 3, which is not a ternary value")
    return (codes.to(torch.int8) - 1).reshape((out_features, *packed.shape[1:]))


_POWERS3 = (1, 3, 9, 27, 81)


def pack_base3(q: torch.Tensor) -> torch.Tensor:
    """Ternary ``(out, ...)`` -> uint8 ``(ceil(out/5), ...)``, five base-3 digits per byte."""
    codes = _codes(q)
    out = codes.shape[0]
    rows = packed_rows(out, 5)
    padded = torch.ones((5 * rows, codes.shape[1]), dtype=torch.int16, device=codes.device)
    padded[:out] = codes.to(torch.int16)
    blocks = padded.view(5, rows, -1)
    packed = sum(blocks[i] * p for i, p in enumerate(_POWERS3))
    return packed.to(torch.uint8).reshape((rows, *q.shape[1:]))


def unpack_base3(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 ``(ceil(out/5), ...)`` -> int8 ternary ``(out, ...)``; inverse of :func:`pack_base3`."""
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or rows != packed_rows(out_features, 5):
        raise ArtifactIntegrityError(
            f"base-3 packed tensor of dtype {packed.dtype} and shape {tuple(packed.shape)} cannot hold "
            f"{out_features} rows (expected uint8 with {packed_rows(out_features, 5)} rows)"
        )
    flat = packed.reshape(rows, -1).to(torch.int16)
    if bool((flat > 242).any()):
        raise ArtifactIntegrityError("base-3 packed tensor holds a byte > 242, which no 5 ternary digits make")
    digits = torch.stack([(flat // p) % 3 for p in _POWERS3])  # (5, rows, rest)
    codes = digits.reshape(5 * rows, -1)[:out_features]
    return (codes.to(torch.int8) - 1).reshape((out_features, *packed.shape[1:]))


@dataclass(frozen=True)
class Packing:
    """One storage format: how many weights share a byte, and its pack / unpack functions."""

    name: str
    values_per_byte: int
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]

    def packed_bytes(self, out_features: int, in_features: int) -> int:
        """Exact size of a packed ``(out, in)`` matrix: ceil(out / values_per_byte) * in."""
        return packed_rows(out_features, self.values_per_byte) * in_features


PACKINGS: dict[str, Packing] = {
    "2bit": Packing("2bit", 4, pack_2bit, unpack_2bit),
    "base3": Packing("base3", 5, pack_base3, unpack_base3),
}
"""Storage formats by the name the config uses."""
