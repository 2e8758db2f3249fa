"""The encoder contract, the name registry, and the simple encodings (bf16, group-wise int RTN, NF4, ternary,
the exact grid, entropy-coded scalar quantisation).

An encoder is a frozen pydantic model (its fields are its parameters) with three methods:

- ``encode(w, hessian, seed) -> Encoded``: the packed payload of one 2-D weight ``(out, in)``; ``hessian``
  is E[x x^T] of the layer's inputs (``(in, in)``, float32) for encoders that use it, else ignored.
- ``decode(enc, dtype) -> Tensor``: the dense weight, shape ``enc.shape``, in ``dtype``.
- ``payload_bits(shape) -> int``: the exact number of bits the payload fields hold (before the byte
  round-up of each stored stream); tests check it against the packed tensors.

``Encoded.tensors`` is what the artifact stores (uint8 bit streams, fp16/fp32 scales and codebooks);
``Encoded.nbytes`` is their exact byte count. Sizes reported as results are read from the written files.
SeedLM and VPTQ live in their own modules and register here on import of the package.
"""

from __future__ import annotations

import lzma
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from forge_models.bitnet.packing import PACKINGS
from forge_models.compression.bitpack import pack_bits, packed_nbytes, unpack_bits
from forge_models.compression.rans import rans_decode, rans_encode
from forge_models.config import Frozen
from forge_models.runtime import ArtifactIntegrityError, ConfigError

__all__ = ["Encoded", "Encoder", "ENCODERS", "register", "make_encoder", "Bf16", "RTN", "NF4", "NF4_CODE", "Ternary",
           "Grid", "ECSQ", "NotApplicable"]


class NotApplicable(Exception):
    """This encoder cannot represent this tensor (e.g. it is not on the grid an exact encoder needs).

    Not an error of the input: the phase drops the candidate for that tensor and says why if none is left.
    """


@dataclass
class Encoded:
    """One encoded tensor: which encoder, its parameters, the original shape and the stored payload."""

    encoding: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the payload tensors (what the artifact writes for this tensor, header aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


class Encoder(Frozen):
    """Base of every encoder; subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str] = ""
    uses_hessian: ClassVar[bool] = False

    def encode(self, w: torch.Tensor, hessian: torch.Tensor | None = None, seed: int = 0) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def payload_bits(self, shape: tuple[int, int]) -> int:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The JSON form used by configs and the recipe: {"name": ..., **params}."""
        return {"name": self.name, **self.model_dump()}

    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.model_dump().items())
        return f"{self.name}({params})"

    def _check(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim != 2 or w.numel() == 0:
            raise ConfigError(f"{self.name} encodes 2-D tensors; got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ConfigError(f"{self.name}: the tensor holds NaN or inf values")
        return w.detach().float().cpu()


ENCODERS: dict[str, type[Encoder]] = {}
"""Encoder classes by name."""


def register(cls: type[Encoder]) -> type[Encoder]:
    if not cls.name or cls.name in ENCODERS:
        raise ValueError(f"encoder name {cls.name!r} is empty or already registered")
    ENCODERS[cls.name] = cls
    return cls


def make_encoder(spec: dict[str, Any] | Encoder) -> Encoder:
    """An encoder from its spec ``{"name": ..., **params}`` (validated by the encoder's own model).

    Raises:
        ConfigError: unknown name or invalid parameters.
    """
    if isinstance(spec, Encoder):
        return spec
    params = dict(spec)
    name = params.pop("name", None)
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoding {name!r}; known: {sorted(ENCODERS)}")
    try:
        return ENCODERS[name](**params)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(f"invalid parameters for encoding {name!r}: {exc}") from exc


def encoded_from_record(encoding: str, params: dict[str, Any], shape, tensors, meta=None) -> Encoded:
    return Encoded(encoding, dict(params), tuple(int(s) for s in shape), dict(tensors), dict(meta or {}))


def row_blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    """``w`` (out, in) as (out, ceil(in / size), size) blocks along the input dimension, the last one padded
    with zeros (the padding is never stored: encoders slice their codes back to ``in``)."""
    out, inp = w.shape
    nb = -(-inp // size)
    padded = torch.zeros(out, nb * size)
    padded[:, :inp] = w
    return padded.view(out, nb, size)


@register
class Bf16(Encoder):
    """The tensor in bfloat16 (16 bits per weight): the no-loss-to-speak-of reference candidate."""

    name: ClassVar[str] = "bf16"

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        return Encoded(self.name, self.model_dump(), tuple(w.shape), {"w": w.to(torch.bfloat16).contiguous()})

    def decode(self, enc, dtype=torch.float32):
        return enc.tensors["w"].to(dtype).reshape(enc.shape)

    def payload_bits(self, shape):
        return 16 * shape[0] * shape[1]


@register
class RTN(Encoder):
    """Group-wise round-to-nearest int-k along the input dimension, one fp16 scale (and zero) per group.

    Symmetric (default, as the reference's "RTN int4 g128 = 4.125 bpw"): ``q = clamp(round(w / s),
    -2^(k-1), 2^(k-1) - 1)`` with ``s = max|w| / (2^(k-1) - 1)``. Asymmetric: ``s = (max - min) / (2^k - 1)``,
    ``q = round((w - min) / s)``, an fp16 min stored next to the scale (Q4_1-style). Rows whose length is
    not a multiple of ``group`` end in a shorter last group (no padding codes are stored: SmolLM2's 576-wide
rows would otherwise pay 11% more code bits at g = 128).
    """

    name: ClassVar[str] = "rtn"
    bits: int = Field(4, ge=2, le=8, description="Bits per integer code.")
    group: int = Field(128, ge=8, le=1 << 16, description="Weights per scale, along the input dimension.")
    sym: bool = Field(True, description="Symmetric absmax (one scale) or asymmetric min/max (scale + min).")

    def _groups(self, shape):
        return -(-shape[1] // self.group)

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        out, inp = w.shape
        g = row_blocks(w, self.group)
        if self.sym:
            qmax = (1 << (self.bits - 1)) - 1
            scale = (g.abs().amax(-1) / qmax).to(torch.float16)
            s = scale.float().clamp(min=1e-12).unsqueeze(-1)
            q = (g / s).round().clamp(-qmax - 1, qmax) + (qmax + 1)
            q = q.reshape(out, -1)[:, :inp]
            tensors = {"codes": pack_bits(q.to(torch.int64), self.bits), "scale": scale.contiguous()}
        else:
            lo = g.amin(-1).to(torch.float16)
            scale = ((g.amax(-1) - lo.float()) / ((1 << self.bits) - 1)).to(torch.float16)
            s = scale.float().clamp(min=1e-12).unsqueeze(-1)
            q = ((g - lo.float().unsqueeze(-1)) / s).round().clamp(0, (1 << self.bits) - 1)
            q = q.reshape(out, -1)[:, :inp]
            tensors = {"codes": pack_bits(q.to(torch.int64), self.bits), "scale": scale.contiguous(), "min": lo.contiguous()}
        return Encoded(self.name, self.model_dump(), (out, inp), tensors)

    def decode(self, enc, dtype=torch.float32):
        out, inp = enc.shape
        ng = self._groups(enc.shape)
        q = torch.zeros(out, ng * self.group)
        q[:, :inp] = unpack_bits(enc.tensors["codes"], self.bits, out * inp).view(out, inp).float()
        q = q.view(out, ng, self.group)
        s = enc.tensors["scale"].float().unsqueeze(-1)
        if self.sym:
            w = (q - (1 << (self.bits - 1))) * s
        else:
            w = q * s + enc.tensors["min"].float().unsqueeze(-1)
        return w.reshape(out, ng * self.group)[:, :inp].to(dtype).contiguous()

    def payload_bits(self, shape):
        ng = self._groups(shape)
        return shape[0] * (shape[1] * self.bits + ng * (16 if self.sym else 32))


NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
"""QLoRA's NormalFloat4 levels (Dettmers et al. 2023): quantiles of N(0, 1), 8 positive and 7 negative ones
plus an exact 0, scaled to [-1, 1]; `tests/unit/test_compression_encoders.py` rebuilds them from the inverse
normal CDF."""


@register
class NF4(Encoder):
    """NormalFloat4 (QLoRA): each weight as the nearest of the 16 :data:`NF4_CODE` levels times its block's
    absmax, blocks of ``block`` consecutive weights along a row (the input dimension).

    With ``double_quant`` (QLoRA's default) the absmax values are stored as 8-bit codes, linear in [0, max] per
    chunk of 256 absmax values with one fp32 max per chunk, rounded up so no weight leaves [-1, 1]:
    4 + 8/64 + 32/16384 = 4.127 bits per weight at ``block`` = 64, the bytes of RTN int4 g128 (4.125).
    Deviation: bitsandbytes quantises the absmax values with its dynamic 8-bit map after subtracting their
    mean; the linear map here is simpler and measured to cost nothing visible (docs/phases/compression.md).
    Without ``double_quant`` the absmax is fp16 (4.25 bpw at 64). Rows not a multiple of ``block`` end in a
    shorter block (no padding codes are stored), as in :class:`RTN`.
    """

    name: ClassVar[str] = "nf4"
    block: int = Field(64, ge=8, le=1 << 16, description="Weights per absmax, along the input dimension.")
    double_quant: bool = Field(True, description="Absmax as 8-bit codes per chunk of 256 (else fp16).")
    DQ_CHUNK: ClassVar[int] = 256

    def _blocks(self, shape):
        return -(-shape[1] // self.block)

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        out, inp = w.shape
        g = row_blocks(w, self.block)
        nb = g.shape[1]
        absmax = g.abs().amax(-1).reshape(-1)
        if self.double_quant:
            n = absmax.numel()
            chunks = torch.zeros(-(-n // self.DQ_CHUNK) * self.DQ_CHUNK)
            chunks[:n] = absmax
            chunks = chunks.view(-1, self.DQ_CHUNK)
            cmax = chunks.amax(-1)
            q8 = torch.ceil(chunks / cmax.clamp(min=1e-30).unsqueeze(-1) * 255).clamp(0, 255).reshape(-1)[:n]
            tensors = {"absmax_codes": q8.to(torch.uint8).contiguous(), "absmax_max": cmax.float().contiguous()}
        else:
            tensors = {"absmax": absmax.to(torch.float16).contiguous()}
        a = self._absmax(tensors, out, nb).unsqueeze(-1)
        x = (g / a.clamp(min=1e-30)).clamp(-1, 1)
        idx = torch.bucketize(x, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
        tensors["codes"] = pack_bits(idx.reshape(out, -1)[:, :inp].to(torch.int64), 4)
        return Encoded(self.name, self.model_dump(), (out, inp), tensors)

    def _absmax(self, tensors, out, nb):
        if self.double_quant:
            n = out * nb
            codes = tensors["absmax_codes"].float()
            cmax = tensors["absmax_max"].float().repeat_interleave(self.DQ_CHUNK)[:n]
            return (codes / 255 * cmax).view(out, nb)
        return tensors["absmax"].float().view(out, nb)

    def decode(self, enc, dtype=torch.float32):
        out, inp = enc.shape
        nb = self._blocks(enc.shape)
        idx = torch.zeros(out, nb * self.block, dtype=torch.int64)
        idx[:, :inp] = unpack_bits(enc.tensors["codes"], 4, out * inp).view(out, inp)
        idx[:, inp:] = 7  # the padding decodes to the exact 0 level
        w = NF4_CODE[idx].view(out, nb, self.block) * self._absmax(enc.tensors, out, nb).unsqueeze(-1)
        return w.reshape(out, nb * self.block)[:, :inp].to(dtype).contiguous()

    def payload_bits(self, shape):
        n_abs = shape[0] * self._blocks(shape)
        stats = 8 * n_abs + 32 * -(-n_abs // self.DQ_CHUNK) if self.double_quant else 16 * n_abs
        return shape[0] * shape[1] * 4 + stats


@register
class Ternary(Encoder):
    """BitNet b1.58 ternary weights: absmean scale per tensor, codes packed 2-bit or base-3 (1.6 bpw).

    For a BitLinear layer this is lossless with respect to what the layer computes: the codes and scale
    are exactly ``forge_models.bitnet.quant.weight_quant`` of the latent weight. With ``entropy=True`` the
    packed stream is also compressed with LZMA (lossless) and the smaller of the two is stored (the choice
    is recorded); on near-uniform ternary codes the gain is small, which is why it is measured, not assumed.
    """

    name: ClassVar[str] = "ternary"
    packing: Literal["2bit", "base3"] = Field("base3", description="2 bits per weight or 5 weights per byte.")
    entropy: bool = Field(True, description="Also try LZMA on the packed stream; keep it only if smaller.")

    def encode(self, w, hessian=None, seed=0):
        from forge_models.bitnet.quant import weight_quant

        w = self._check(w)
        q, s_w = weight_quant(w)
        packed = PACKINGS[self.packing].pack(q).reshape(-1).contiguous()
        tensors = {"scale": s_w.reshape(1).float()}
        meta = {"raw_bytes": int(packed.numel()), "lzma": False}
        if self.entropy:
            comp = lzma.compress(packed.numpy().tobytes(), preset=9 | lzma.PRESET_EXTREME)
            meta["lzma_bytes"] = len(comp)
            if len(comp) < packed.numel():
                packed = torch.frombuffer(bytearray(comp), dtype=torch.uint8).clone()
                meta["lzma"] = True
        tensors["codes"] = packed
        return Encoded(self.name, self.model_dump(), tuple(w.shape), tensors, meta)

    def decode(self, enc, dtype=torch.float32):
        q, scale = self.decode_codes(enc)
        return (q.float() / scale).to(dtype)

    def decode_codes(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 ternary matrix, float32 scale s_w) exactly as stored (for PackedBitLinear at load)."""
        out, inp = enc.shape
        packing = PACKINGS[self.packing]
        codes = enc.tensors["codes"]
        expected = packing.packed_bytes(out, inp)
        if codes.numel() != expected:  # an LZMA stream: decompress, then it must have the packed length
            try:
                raw = lzma.decompress(codes.numpy().tobytes())
            except lzma.LZMAError as exc:
                raise ArtifactIntegrityError(f"ternary codes are neither packed ({expected} B) nor LZMA: {exc}") from exc
            codes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        q = packing.unpack(codes.reshape(-1, inp), out)
        return q, enc.tensors["scale"].float()

    def payload_bits(self, shape):
        return 8 * PACKINGS[self.packing].packed_bytes(shape[0], shape[1]) + 32


# Streams of the grid encoding start with one byte naming their form (a stream's length alone cannot tell).
_RAW, _LZMA, _RANS = 0, 1, 2


def _tagged(form: int, data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(bytes([form]) + data), dtype=torch.uint8).clone()


def _smallest(raw: bytes, *coded: tuple[int, bytes]) -> torch.Tensor:
    """The shortest of the raw bytes and the given (form, bytes) codings, as a tagged uint8 stream."""
    form, data = min([(_RAW, raw), *coded], key=lambda fd: len(fd[1]))
    return _tagged(form, data)


def _untag(stream: torch.Tensor, what: str) -> tuple[int, bytes]:
    data = stream.numpy().tobytes()
    if not data or data[0] not in (_RAW, _LZMA, _RANS):
        raise ArtifactIntegrityError(f"{what}: unknown stream form {data[:1]!r}")
    return data[0], data[1:]


def _raw_bytes(stream: torch.Tensor, raw_len: int, what: str) -> bytes:
    """The raw bytes of a tagged raw-or-LZMA stream, checked against the length they must have."""
    form, data = _untag(stream, what)
    if form == _LZMA:
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise ArtifactIntegrityError(f"{what}: corrupted LZMA stream: {exc}") from exc
    elif form != _RAW:
        raise ArtifactIntegrityError(f"{what}: form {form} is not raw or LZMA")
    if len(data) != raw_len:
        raise ArtifactIntegrityError(f"{what}: {len(data)} bytes, {raw_len} expected")
    return data


@register
class Grid(Encoder):
    """Lossless re-encoding of a tensor that already lies on a block-affine integer grid.

    A model dequantised from a GGUF ``Q4_1`` file (SmolLM2-135M-Instruct's linear layers) holds, in each
    block of ``group`` consecutive weights of a row, exactly ``w = q * d + m`` computed in float32, with
    ``d`` and ``m`` fp16 and ``q`` in ``[0, 2^bits)``. Re-quantising such weights with another 4-bit
    scheme (NF4, RTN) adds a second rounding on top of the first; recovering ``(q, d, m)`` costs nothing.
    ``encode`` recovers them (``m`` = the block minimum, ``d`` = the fp16 value of (max - min) / (2^bits - 1)
    or one of its fp16 neighbours) and verifies that :meth:`decode` reproduces **every weight bit for bit**;
    otherwise it raises :class:`NotApplicable` and the phase drops it for that tensor.

    With ``entropy`` the codes are entropy-coded with interleaved rANS (:mod:`.rans`), each code under the
    context of its block's zero point ``round(-m / d)``: a block whose range sits mostly above zero has its
    codes low, and the other way round (on SmolLM2: 3.79 bits of information per code given that context,
    3.85 without, 3.91 with LZMA). The fp16 ``d``/``m`` stream is LZMA-compressed (about 0.6 bits per
    weight instead of 1). Each stream keeps whichever form is shortest, raw included, named by its first
    byte. ``payload_bits`` gives the raw bound; sizes reported as results are read from the written files.
    """

    name: ClassVar[str] = "grid"
    bits: int = Field(4, ge=2, le=8, description="Bits per integer code of the grid the tensor lies on.")
    group: int = Field(32, ge=2, le=1 << 16, description="Weights per (d, m) block along a row (Q4_1: 32).")
    entropy: bool = Field(True, description="LZMA the codes and the d/m stream where that is shorter.")

    def _levels(self) -> int:
        return (1 << self.bits) - 1

    @staticmethod
    def _dequant(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # Two float32 roundings, q * d then + m, in this order: the way GGUF readers dequantise Q4_1.
        return q * d.unsqueeze(-1) + m.unsqueeze(-1)

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        out, inp = w.shape
        if inp % self.group:
            raise NotApplicable(f"rows of {inp} weights are not a multiple of group {self.group}")
        g = w.view(out, inp // self.group, self.group)
        m = g.amin(-1)
        if not torch.equal(m.half().float(), m):
            raise NotApplicable("block minima are not fp16 values")
        d0 = ((g.amax(-1) - m) / self._levels()).half()
        d, q, ok = torch.zeros_like(m), torch.zeros_like(g), torch.zeros_like(m, dtype=torch.bool)
        for step in (0, -1, 1, -2, 2):  # the fp16 d itself or a neighbour (float32 rounding of max - min)
            dc = (d0.view(torch.int16) + step).view(torch.float16).float() if step else d0.float()
            dc = torch.where(d0 == 0, torch.zeros_like(dc), dc)
            qc = torch.where(dc.unsqueeze(-1) > 0, (g - m.unsqueeze(-1)) / dc.unsqueeze(-1), torch.zeros_like(g))
            qc = qc.round().clamp(0, self._levels())
            hit = ~ok & torch.isfinite(dc) & (self._dequant(qc, dc, m) == g).all(-1)
            d, q, ok = torch.where(hit, dc, d), torch.where(hit.unsqueeze(-1), qc, q), ok | hit
        if not bool(ok.all()):
            bad = int((~ok).sum())
            raise NotApplicable(f"{bad} of {ok.numel()} blocks are not on a {self.bits}-bit affine fp16 grid")
        q = q.reshape(-1).to(torch.int64)
        codes_raw = pack_bits(q, self.bits).numpy().tobytes()
        stats_raw = torch.cat([d.half().reshape(-1), m.half().reshape(-1)]).view(torch.uint8).numpy().tobytes()
        if self.entropy:
            ctx = self._contexts(d.half().float(), m)
            codes = _smallest(codes_raw, (_RANS, rans_encode(q.numpy(), 1 << self.bits, ctx, 1 << self.bits)))
            stats = _smallest(stats_raw, (_LZMA, lzma.compress(stats_raw, preset=6)))
        else:
            codes, stats = _tagged(_RAW, codes_raw), _tagged(_RAW, stats_raw)
        meta = {"codes_form": int(codes[0]), "stats_form": int(stats[0])}
        enc = Encoded(self.name, self.model_dump(), (out, inp), {"codes": codes, "stats": stats}, meta)
        if not torch.equal(self.decode(enc).view(torch.int32), w.view(torch.int32)):  # bit for bit, or not at all
            raise NotApplicable("decoding does not reproduce the tensor bit for bit")
        return enc

    def _contexts(self, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
        """Per code: its block's zero point round(-m / d) clipped to the code range (0 where d = 0)."""
        z = torch.where(d > 0, -m / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
        z = z.round().clamp(0, self._levels()).to(torch.int64)
        return z.reshape(-1).repeat_interleave(self.group).numpy()

    def decode(self, enc, dtype=torch.float32):
        out, inp = enc.shape
        nb = out * inp // self.group
        stats = torch.frombuffer(bytearray(_raw_bytes(enc.tensors["stats"], 4 * nb, "grid d/m")), dtype=torch.float16)
        d, m = stats[:nb].float().view(out, -1), stats[nb:].float().view(out, -1)
        form, data = _untag(enc.tensors["codes"], "grid codes")
        if form == _RANS:
            q = torch.from_numpy(rans_decode(data, self._contexts(d, m))).float()
            if q.numel() != out * inp:
                raise ArtifactIntegrityError(f"grid codes: {q.numel()} codes, {out * inp} expected")
        else:
            raw = _raw_bytes(enc.tensors["codes"], packed_nbytes(out * inp, self.bits), "grid codes")
            q = unpack_bits(torch.frombuffer(bytearray(raw), dtype=torch.uint8), self.bits, out * inp).float()
        return self._dequant(q.view(out, -1, self.group), d, m).reshape(out, inp).to(dtype).contiguous()

    def payload_bits(self, shape):  # raw form: codes, fp16 d and m per block, one form byte per stream
        return shape[0] * shape[1] * self.bits + 32 * (shape[0] * shape[1] // self.group) + 16


@register
class ECSQ(Encoder):
    """Entropy-coded scalar quantisation: a uniform quantiser per row, its integer codes coded with rANS.

    Each row gets one fp16 step ``s = step * rms(row)`` and every weight becomes ``q = round(w / s)``, with no
    clamp: the code range is whatever the tensor needs (offset stored). The codes are entropy-coded (order 0,
    one frequency table per tensor, :mod:`.rans`), so the rate is set by the step, not by a bit width: a code
    near 0 costs less than one in the tails. Against a fixed-width 4-bit code this is the textbook gain of
    entropy-coded uniform quantisation over a fixed-rate quantiser (about 1.5 dB, roughly halving the mean
    squared error at the same rate for Gaussian-like weights). On SmolLM2's tied embedding: step 0.2 gives
    4.33 bits per weight at a relative MSE of 0.0033, NF4 b32 4.25 bits at 0.0087.

    Decoding is ``q * s`` in float32. ``payload_bits`` is the raw form's bound (16-bit codes); the chooser
    uses the encoded bytes.
    """

    name: ClassVar[str] = "ecsq"
    step: float = Field(0.25, gt=0, le=4.0, description="Quantisation step as a fraction of the row's RMS.")

    def encode(self, w, hessian=None, seed=0):
        w = self._check(w)
        out, inp = w.shape
        rms = w.pow(2).mean(1).sqrt()
        s = (rms * self.step).half()
        if not torch.isfinite(s).all():
            raise NotApplicable("a row's step overflows fp16")
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero (or underflowing) row codes to zeros
        q = (w / s.float().unsqueeze(1)).round().to(torch.int64)
        k = int(q.abs().max())
        if 2 * k + 1 > 1 << 15:
            raise NotApplicable(f"codes span +-{k}, more than the coder's 32768 symbols (outliers far beyond "
                                f"the row RMS)")
        sym = (q + k).reshape(-1).numpy()
        raw = (q.reshape(-1).to(torch.int16)).numpy().astype("<i2").tobytes()
        codes = _smallest(raw, (_RANS, rans_encode(sym, 2 * k + 1)))
        tensors = {"codes": codes, "step": s.contiguous(), "offset": torch.tensor([k], dtype=torch.int32)}
        return Encoded(self.name, self.model_dump(), (out, inp), tensors, {"codes_form": int(codes[0])})

    def decode(self, enc, dtype=torch.float32):
        out, inp = enc.shape
        k = int(enc.tensors["offset"][0])
        form, data = _untag(enc.tensors["codes"], "ecsq codes")
        if form == _RANS:
            q = torch.from_numpy(rans_decode(data)) - k
        else:
            raw = _raw_bytes(enc.tensors["codes"], 2 * out * inp, "ecsq codes")
            q = torch.from_numpy(np.frombuffer(raw, dtype="<i2").astype(np.int64))
        if q.numel() != out * inp:
            raise ArtifactIntegrityError(f"ecsq codes: {q.numel()} codes, {out * inp} expected")
        if enc.tensors["step"].numel() != out:
            raise ArtifactIntegrityError(f"ecsq steps: {enc.tensors['step'].numel()} rows, {out} expected")
        return (q.view(out, inp).float() * enc.tensors["step"].float().unsqueeze(1)).to(dtype).contiguous()

    def payload_bits(self, shape):  # raw form: 16-bit codes, one fp16 step per row, the offset, one form byte
        return shape[0] * shape[1] * 16 + 16 * shape[0] + 32 + 8


def bitpacked_len(count: int, nbits: int) -> int:
    return packed_nbytes(count, nbits)
