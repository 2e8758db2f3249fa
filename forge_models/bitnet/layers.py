"""The two BitNet b1.58 linear layers: :class:`BitLinear` for training, :class:`PackedBitLinear` for inference.

``BitLinear`` keeps latent full-precision master weights and computes, at quantisation strength
``lambda`` (``quant_strength``)::

    x_n = rms_norm(x)                                 # learned-gain RMSNorm, or nothing (act_norm="none")
    x_e = (1 - lambda) * x + lambda * STE(q8(x_n))    # q8: per-token absmax int8, dequantised
    w_e = (1 - lambda) * W + lambda * STE(q3(W))      # q3: absmean ternary, dequantised
    y   = x_e @ w_e.T + b

so lambda = 0 is exactly ``nn.Linear`` (the normalisation is bypassed too) and lambda = 1 is exactly the
fully quantised layer of transformers' ``BitLinear`` with ``use_rms_norm=True`` (same ``LlamaRMSNorm``,
same quantisers). The STE passes the gradient of ``x_e``/``w_e`` straight to ``x_n``/``W``, so the latent
weights train through the quantised forward pass; the norm's gain gets its gradient through ``x_n``.

Why the interpolation also covers the normalisation: per-token absmax quantisation is scale-invariant
(q8(c x) = c q8(x) for c > 0), so a parameter-free RMS normalisation before it would only rescale each
token's output; with a learned gain it reweights the input channels before rounding, which is what the
reference asks for ("normalise before quantising"). But on a pretrained model it changes the function,
so at lambda = 0 it must be absent and it is blended in with the quantisation.

``PackedBitLinear`` holds only 2-bit fields (``ceil(out/4) * in`` bytes), a float32 ``weight_scale`` (s_w),
the bias and the norm gain. Its forward pass quantises activations to int8, expands the 2-bit fields to
an int8 ``(in, out)`` operand (two shifts, no float), multiplies with an int32 accumulator
(``torch._int_mm``: oneDNN VNNI/AMX kernels on x86) and applies one scale division,
``y = acc / (s_x * s_w)`` — the same expression, in the same order, as transformers' ``BitLinear``.

Decode (a handful of rows per call) is a different problem: the per-call expansion of the 2-bit fields and
oneDNN's per-call weight reorder cost more than fp32 pays to read its weights. The ``"rowwise2bit"`` backend
(the default where torch has fbgemm's quantized ops) therefore stores the weights as the rows of a 2-bit
row-wise quantised embedding table — row k = input feature k, the unsigned code ``t + 1`` of output
``i * R + j`` in bits ``2i`` of byte ``j``, then fp16 scale 1.0 and bias -1.0 — and computes ``x_q @ W`` for up to
:data:`ROWWISE_MAX_ROWS` rows as one weighted embedding bag per row (``sum_k x_q[k] * W[k, :]``, fbgemm's
``embedding_bag_2bit_rowwise_offsets``): it reads the 2-bit codes directly, nothing is expanded. Its float32
accumulator holds sums of integers below 2^24, so it is the integer accumulator exactly (checked bit for bit
in the tests). Larger inputs (prefill) expand the same codes to the int8 operand (shift, shift, minus one)
and use the integer GEMM, as the other backends do.

The ``"ternary_kernel"`` backend (the default where it builds: :mod:`forge_models.bitnet.kernel`) keeps
transformers' own 2-bit layout ``(ceil(out/4), in)`` and runs calls of up to :data:`KERNEL_MAX_ROWS` rows
through one fused C++ op: activation quantisation, u8 x s8 integer dot products read straight from the
codes (VNNI/AVX2), split over torch's threads, and the one scale division. fbgemm's embedding bag is
single-threaded and the quantisation around it costs a handful of tensor ops per call; the fused op does
a 512x512 layer in ~10 us where fp32 needs ~20-30 us. Larger calls expand the codes and use the GEMM.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from forge_models.bitnet import kernel
from forge_models.bitnet.packing import pack_fields, packed_rows
from forge_models.bitnet.quant import ActivationSTE, WeightSTE, activation_quant, weight_quant
from forge_models.runtime import ConfigError

__all__ = [
    "ActNorm",
    "BitLinear",
    "PackedBitLinear",
    "MATMUL_BACKENDS",
    "ROWWISE_BACKEND",
    "ROWWISE_MAX_ROWS",
    "PACKED_BACKENDS",
    "default_backend",
    "default_packed_backend",
    "rowwise_available",
    "KERNEL_BACKEND",
    "KERNEL_MAX_ROWS",
    "kernel_available",
    "bag_index_bytes",
    "integer_linear",
]

ActNorm = Literal["rms", "none"]


def _make_norm(act_norm: str, in_features: int, eps: float, device: torch.device | None) -> nn.Module | None:
    if act_norm == "none":
        return None
    if act_norm == "rms":
        # transformers' own class, so the exported layer computes bit for bit what its BitLinear computes.
        return LlamaRMSNorm(in_features, eps=eps).to(device=device)
    raise ConfigError(f"act_norm must be 'rms' or 'none', got {act_norm!r}")


class BitLinear(nn.Linear):
    """A linear layer trained towards ternary weights and int8 activations (see the module docstring).

    A subclass of ``nn.Linear`` on purpose: ``weight``/``bias`` keep their names and meaning (latent
    weights), and wrappers that target linear layers (LoRA, later phases) keep training it through the
    quantised forward pass.

    Attributes:
        quant_strength: lambda in [0, 1]; 1 after conversion (set it with
            :func:`forge_models.bitnet.convert.set_quant_strength`).
        rms_norm: the activation normalisation (``LlamaRMSNorm``), or None for ``act_norm="none"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        act_norm: ActNorm = "rms",
        rms_norm_eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act_norm = act_norm
        self.rms_norm_eps = float(rms_norm_eps)
        self.rms_norm = _make_norm(act_norm, in_features, rms_norm_eps, device)
        self.quant_strength = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_norm: ActNorm = "rms", rms_norm_eps: float = 1e-6) -> "BitLinear":
        """A BitLinear sharing ``linear``'s weight and bias Parameters (no copy), at full strength."""
        with torch.device("meta"):  # skip allocating and initialising a weight that is replaced at once
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        act_norm="none", rms_norm_eps=rms_norm_eps)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.act_norm = act_norm
        layer.rms_norm = _make_norm(act_norm, linear.in_features, rms_norm_eps, linear.weight.device)
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = float(self.quant_strength)
        if lam == 0.0:
            return F.linear(x, self.weight, self.bias)
        x_n = self.rms_norm(x) if self.rms_norm is not None else x
        if lam == 1.0 and not torch.is_grad_enabled():
            # Inference at full strength: the exact integer product, as PackedBitLinear and transformers'
            # BitLinear compute it, so evaluating this model is evaluating the exported one bit for bit.
            q, scale = weight_quant(self.weight)
            y = integer_linear(x_n, q.t().contiguous(), scale, default_backend())
            return (y if self.bias is None else y + self.bias).to(x.dtype)
        x_e = ActivationSTE.apply(x_n)
        w_e = WeightSTE.apply(self.weight)
        if lam != 1.0:
            x_e = (1.0 - lam) * x + lam * x_e
            w_e = (1.0 - lam) * self.weight + lam * w_e
        return F.linear(x_e, w_e, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_norm={self.act_norm}, quant_strength={self.quant_strength:g}"


# ------------------------------------------------------------------------------------ packed inference


def _int_mm(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    if x_q.is_cuda:
        # cuBLASLt's int8 GEMM wants more than 16 rows and the other sizes multiples of 8. Other shapes get
        # the same integers from a float64 GEMM (exact: |acc| < 2^53). Untested: no GPU on the dev machines.
        if x_q.shape[1] % 8 or w_t.shape[1] % 8:
            return torch.mm(x_q.double(), w_t.double()).to(torch.int32)
        rows = x_q.shape[0]
        if rows <= 16:
            x_q = torch.cat([x_q, x_q.new_zeros(17 - rows, x_q.shape[1])])
            return torch._int_mm(x_q, w_t)[:rows]
    return torch._int_mm(x_q, w_t)


def _int32_matmul(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    # A plain integer GEMM: exact, portable, slower than _int_mm. Kept as a reference backend.
    return torch.mm(x_q.to(torch.int32), w_t.to(torch.int32))


MATMUL_BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "int_mm": _int_mm,
    "int32": _int32_matmul,
}
"""Integer GEMMs ``(m, k) int8 @ (k, n) int8 -> (m, n) int32``, by name."""


def default_backend() -> str:
    """``int_mm`` where torch has it (it does on x86 CPUs since 2.x), else the plain int32 GEMM."""
    return "int_mm" if hasattr(torch, "_int_mm") else "int32"


ROWWISE_BACKEND = "rowwise2bit"
"""PackedBitLinear backend: fbgemm's 2-bit row-wise embedding bag for few rows, the integer GEMM otherwise."""

ROWWISE_MAX_ROWS = 2
"""Largest number of rows (tokens) per call that ``rowwise2bit`` computes with the embedding bag. Its cost grows
linearly with the rows while the GEMM's is flat. Measured on the dev CPU (Xeon, AVX-512 VNNI/AMX, 1 thread;
512x512, 512->1376, 1376->512 layers) against expand + ``_int_mm``: 2.6-2.9x faster at 1 row, 1.4-1.6x at
2, 0.7-1.0x at 4."""

ROWWISE_MAX_IN = 2**24 // 128
"""The embedding bag accumulates in float32: sums of ``in`` terms ``|x_q * t| <= 128`` stay exact integers
while ``128 * in <= 2^24``. Wider layers use the GEMM path."""

KERNEL_BACKEND = "ternary_kernel"
"""PackedBitLinear backend: the fused C++ kernel (:mod:`forge_models.bitnet.kernel`) for few rows, the GEMM otherwise."""

KERNEL_MAX_ROWS = 32
"""Largest number of rows per call that ``ternary_kernel`` computes itself. Its cost grows with the rows, the
expand + GEMM path's is nearly flat: measured on the dev CPU (512x512, 512->1376, 1376->512 layers, 1 and 2
threads) the kernel wins up to 32 rows (0.3-0.75x the GEMM path's time) and loses at 64 (1.05-1.15x)."""

KERNEL_MAX_IN = 2**22
"""The kernel's int32 sums of ``in`` terms ``|(t + 1) * x_q| <= 256`` stay exact while ``256 * in < 2^31``."""

PACKED_BACKENDS = (*MATMUL_BACKENDS, ROWWISE_BACKEND, KERNEL_BACKEND)
"""Backends PackedBitLinear accepts."""


def rowwise_available() -> bool:
    """Whether this torch build has fbgemm's ``quantized::embedding_bag_2bit_rowwise_offsets`` (x86 builds do)."""
    try:
        return hasattr(torch.ops.quantized, "embedding_bag_2bit_rowwise_offsets")
    except (AttributeError, RuntimeError):
        return False


def kernel_available() -> bool:
    """Whether the fused ternary kernel is built and loaded (building it on first call; see kernel.py)."""
    return kernel.kernel_available()


def default_packed_backend() -> str:
    """The fastest exact backend here: ``ternary_kernel`` where it builds, else ``rowwise2bit`` where torch has
    fbgemm, else :func:`default_backend`. All of them give bit-identical outputs."""
    if kernel_available():
        return KERNEL_BACKEND
    return ROWWISE_BACKEND if rowwise_available() else default_backend()


_BAG_INDICES: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
"""(in_features, rows, device) -> (indices, offsets) of the embedding bags; shared by every layer (a few KB)."""


def _bag_indices(in_features: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (in_features, rows, str(device))
    cached = _BAG_INDICES.get(key)
    if cached is None:
        with torch.inference_mode(False), torch.no_grad():
            idx = torch.arange(in_features, dtype=torch.int32, device=device).repeat(rows)
            offsets = torch.arange(rows, dtype=torch.int32, device=device) * in_features
        cached = _BAG_INDICES[key] = (idx, offsets)
    return cached


def bag_index_bytes() -> int:
    """Bytes held by the shared embedding-bag index cache (resident, shared by all rowwise2bit layers)."""
    return sum(t.numel() * t.element_size() for pair in _BAG_INDICES.values() for t in pair)


def _rowwise_table(ternary: torch.Tensor) -> torch.Tensor:
    """Ternary ``(out, in)`` -> uint8 ``(in, R + 4)``, R = ceil(out/4): fbgemm's fused 2-bit row-wise table.

    Row k holds input feature k's weights to all outputs, in the 2-bit layout of the other backends (output
    ``i * R + j`` in bits ``2i`` of byte ``j``, which the kernel reads as its column ``4j + i``) but as the
    unsigned code ``t + 1`` (padding outputs get code 1, weight 0); then fp16 scale 1.0 and fp16 bias -1.0,
    so the kernel's ``scale * code + bias`` is the ternary weight exactly.
    """
    out, in_features = ternary.shape
    rows = packed_rows(out, 4)
    codes = torch.ones((4 * rows, in_features), dtype=torch.uint8, device=ternary.device)
    codes[:out] = (ternary.to(torch.int16) + 1).to(torch.uint8)
    body = pack_fields(codes).t()
    tail = torch.tensor([1.0, -1.0], dtype=torch.float16).view(torch.uint8).to(ternary.device)
    return torch.cat([body, tail.expand(in_features, 4)], dim=1).contiguous()


def integer_linear(x: torch.Tensor, w_t: torch.Tensor, weight_scale: torch.Tensor, backend: str) -> torch.Tensor:
    """``(x_q @ W_q.T) / (s_x * s_w)`` in float32: int8 activations times the int8 ``(in, out)`` operand W_q.T.

    One scale division of the int32 accumulator, in transformers' order (so the result is bit-identical to
    its BitLinear, which divides a float product of the same integers).
    """
    lead = x.shape[:-1]
    x_q, s_x = activation_quant(x.reshape(-1, x.shape[-1]))
    acc = MATMUL_BACKENDS[backend](x_q, w_t)
    return acc.float().div_(s_x * weight_scale).reshape(*lead, -1)


def _check_2bit_codes(codes: torch.Tensor, out_features: int, in_features: int) -> None:
    """Refuse a 2-bit layout that is the wrong shape or holds code 3 (no ternary value) in a real output row."""
    rows = packed_rows(out_features, 4)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, in_features):
        raise ConfigError(f"2-bit codes of dtype {codes.dtype} and shape {tuple(codes.shape)} cannot hold a "
                          f"({out_features}, {in_features}) layer (expected uint8 ({rows}, {in_features}))")
    for i in range(4):  # field i holds outputs i*R .. i*R+R-1; one field at a time keeps the check's memory small
        real = min(rows, out_features - i * rows)
        if real > 0 and bool((((codes[:real] >> (2 * i)) & 3) == 3).any()):
            raise ConfigError("2-bit codes hold code 3, which is not a ternary value")


class PackedBitLinear(nn.Module):
    """Inference-only ternary linear layer computed from 2-bit fields with integer arithmetic.

    Buffers: ``codes`` — uint8 ``(in, ceil(out/4))``: transformers' packed layout, transposed so the
    expanded operand is a contiguous ``(in, 4 * ceil(out/4))`` int8 matrix (the layout ``torch._int_mm`` is
    fast with), and holding each weight as a 2-bit two's-complement field (-1 = 0b11, 0, 1) rather than
    transformers' ``v + 1``, so that two shifts expand it to signed int8 with no further pass;
    ``weight_scale`` — float32 ``(1,)``, s_w = 1/mean|W| (the output is divided by it); ``bias``; and
    ``rms_norm`` if the layer normalises activations. The file format is converted at load.

    Per call the fields are expanded into a transient int8 matrix of ``in * out`` bytes (4x the resident
    codes, freed after the call), multiplied with the int8 activations into an int32 accumulator, and the
    accumulator is divided once by ``s_x * s_w``.

    With ``backend="rowwise2bit"`` (the default where available) ``codes`` is instead the uint8
    ``(in, ceil(out/4) + 4)`` table of :func:`_rowwise_table` (2 bits per weight plus 4 bytes per input
    feature); calls of at most :data:`ROWWISE_MAX_ROWS` rows read it directly with fbgemm's 2-bit embedding
    bag (no expansion), larger ones expand it as above. Every backend computes the same integers, so the
    output is bit-identical whichever runs. The in-memory layout depends on the backend; the file format does
    not (:func:`forge_models.bitnet.export.load_packed` builds either from it).
    """

    def __init__(
        self,
        ternary: torch.Tensor,
        weight_scale: torch.Tensor | float,
        bias: torch.Tensor | None = None,
        rms_norm_weight: torch.Tensor | None = None,
        rms_norm_eps: float = 1e-6,
        backend: str | None = None,
        *,
        codes_2bit: torch.Tensor | None = None,
    ) -> None:
        """``ternary``: the int8 ``(out, in)`` matrix. With the ``ternary_kernel`` backend the weights may
        instead come as ``codes_2bit`` — transformers' 2-bit layout ``(ceil(out/4), in)``, as a packed file
        holds them — with ``ternary`` only giving the shape (an int8 ``(out, in)`` tensor on the meta device):
        the codes are then used as they are, with no unpacking (checked for the invalid code 3)."""
        super().__init__()
        if ternary.ndim != 2:
            raise ConfigError(f"PackedBitLinear needs a 2-D ternary matrix, got shape {tuple(ternary.shape)}")
        self.out_features, self.in_features = int(ternary.shape[0]), int(ternary.shape[1])
        self.backend = backend or default_packed_backend()
        if codes_2bit is not None:
            if self.backend != KERNEL_BACKEND:
                raise ConfigError(f"codes_2bit is the {KERNEL_BACKEND!r} backend's layout, not {self.backend!r}'s")
            _check_2bit_codes(codes_2bit, self.out_features, self.in_features)
        elif bool(((ternary < -1) | (ternary > 1)).any()):
            raise ConfigError("PackedBitLinear needs ternary values in {-1, 0, 1}")
        device = codes_2bit.device if codes_2bit is not None else ternary.device
        if self.backend not in PACKED_BACKENDS:
            raise ConfigError(f"unknown integer matmul backend {self.backend!r}; use one of {sorted(PACKED_BACKENDS)}")
        if self.backend == ROWWISE_BACKEND and not rowwise_available():
            raise ConfigError(f"backend {ROWWISE_BACKEND!r} needs torch's fbgemm quantized ops, which this torch build "
                              f"lacks; use backend={default_backend()!r} (or leave it unset to pick it automatically)")
        if self.backend == KERNEL_BACKEND:
            try:
                kernel.load_kernel()
            except kernel.KernelUnavailable as exc:
                raise ConfigError(f"backend {KERNEL_BACKEND!r} is unavailable: {exc}; leave the backend unset to "
                                  f"pick the fastest available one") from exc
        self._gemm = default_backend() if self.backend in (ROWWISE_BACKEND, KERNEL_BACKEND) else self.backend
        if self.backend == ROWWISE_BACKEND:
            self.register_buffer("codes", _rowwise_table(ternary.to(torch.int8)))
        elif self.backend == KERNEL_BACKEND and codes_2bit is not None:
            # A copy: the caller's tensor may be a view of a whole loaded file, which must not stay alive.
            self.register_buffer("codes", codes_2bit.clone(memory_format=torch.contiguous_format))
        elif self.backend == KERNEL_BACKEND:
            codes = (ternary.to(torch.int16) + 1).to(torch.uint8)  # t + 1; padding rows hold 0 (never read out)
            self.register_buffer("codes", pack_fields(codes).contiguous())  # transformers' (ceil(out/4), in)
        else:
            fields = (ternary.to(torch.int8) & 3).to(torch.uint8)  # two's complement in 2 bits
            self.register_buffer("codes", pack_fields(fields).t().contiguous())
        scale = torch.as_tensor(weight_scale, dtype=torch.float32).reshape(1).clone()
        self.register_buffer("weight_scale", scale.to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.rms_norm: nn.Module | None = None
        if rms_norm_weight is not None:
            self.rms_norm = LlamaRMSNorm(self.in_features, eps=rms_norm_eps).to(device)
            with torch.no_grad():
                self.rms_norm.weight.copy_(rms_norm_weight.float())
            self.rms_norm.requires_grad_(False)
        # Field i (bits 2i, 2i+1) goes to the top of the byte, then a right shift by 6 extends it: arithmetic
        # (int8, sign-extends the two's-complement fields) or logical (uint8, the rowwise table's codes t + 1).
        self.register_buffer(
            "_shifts", torch.tensor([6, 4, 2, 0], dtype=torch.uint8, device=device).view(1, 4, 1),
            persistent=False,
        )

    def _operand(self) -> torch.Tensor:
        """The signed int8 ``(in, 4 * ceil(out/4))`` matrix W_q.T (padding columns are zero)."""
        if self.backend == ROWWISE_BACKEND:
            # The table's codes are t + 1: a logical shift extracts them, and a wrapping uint8 "- 1" (a pass
            # over in * out bytes, far cheaper than correcting the (rows, out) int32 product) makes them t.
            body = self.codes[:, : self.codes.shape[1] - 4]
            expanded = body.unsqueeze(1) << self._shifts  # (in, 1, R) << (1, 4, 1) -> (in, 4, R)
            expanded >>= 6
            expanded -= 1
            return expanded.view(torch.int8).reshape(self.in_features, -1)
        if self.backend == KERNEL_BACKEND:
            # (1, R, in) << (4, 1, 1) -> (4, R, in): block i is outputs i*R .. i*R+R-1, so the reshape is W_q
            # (4R, in) in output order; its transposed view is what _int_mm takes (as fast as a contiguous one).
            expanded = self.codes.unsqueeze(0) << self._shifts.view(4, 1, 1)
            expanded >>= 6
            expanded -= 1
            return expanded.view(torch.int8).reshape(-1, self.in_features).t()
        # (in, 1, rows) << (1, 4, 1) -> (in, 4, rows): block i holds output rows i*rows .. i*rows+rows-1,
        # exactly the output order, so the reshape is free.
        expanded = (self.codes.unsqueeze(1) << self._shifts).view(torch.int8)
        expanded >>= 6
        return expanded.reshape(self.in_features, -1)

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        rows = x.numel() // self.in_features
        return (self.backend == KERNEL_BACKEND and 0 < rows <= KERNEL_MAX_ROWS and not x.is_cuda
                and self.in_features <= KERNEL_MAX_IN)

    def _uses_bag(self, x: torch.Tensor) -> bool:
        rows = x.numel() // self.in_features
        return (self.backend == ROWWISE_BACKEND and 0 < rows <= ROWWISE_MAX_ROWS and not x.is_cuda
                and self.in_features <= ROWWISE_MAX_IN)

    def _bag_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``(x_q @ W_q.T) / (s_x * s_w)`` for a few rows: one weighted 2-bit embedding bag per row."""
        lead = x.shape[:-1]
        x_q, s_x = activation_quant(x.reshape(-1, self.in_features), as_float=True)  # integers, as float32
        rows = x_q.shape[0]
        idx, offsets = _bag_indices(self.in_features, rows, x_q.device)
        acc = torch.ops.quantized.embedding_bag_2bit_rowwise_offsets(
            self.codes, idx, offsets, False, 0, False, x_q.reshape(-1), None, False
        )  # float32 holding exact integers (|acc| <= 128 * in <= 2^24): the int32 accumulator's values
        # The kernel's column 4j + i is output i * R + j: a (rows, out) permutation back to the output order.
        acc = acc.view(rows, -1, 4).transpose(1, 2).reshape(rows, -1)
        return acc[:, : self.out_features].div_(s_x * self.weight_scale).reshape(*lead, -1)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, backend: str | None = None) -> "PackedBitLinear":
        """Freeze a trained BitLinear at full strength into its packed form."""
        q, scale = weight_quant(layer.weight)
        norm_w = layer.rms_norm.weight.detach() if layer.rms_norm is not None else None
        eps = layer.rms_norm.variance_epsilon if layer.rms_norm is not None else layer.rms_norm_eps
        return cls(q, scale, layer.bias, norm_w, eps, backend)

    def ternary(self) -> torch.Tensor:
        """The int8 ternary matrix ``(out, in)`` (for tests and inspection; forward never builds it)."""
        return self._operand()[:, : self.out_features].t().contiguous()

    def resident_bytes(self) -> int:
        """Bytes this layer keeps in memory between calls (codes, scale, bias, norm gain)."""
        tensors = [self.codes, self.weight_scale] + ([self.bias] if self.bias is not None else [])
        tensors += list(self.rms_norm.parameters()) if self.rms_norm is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rms_norm(x.float()) if self.rms_norm is not None else x
        if self._uses_kernel(h):
            bias = None if self.bias is None else self.bias.float().contiguous()
            y = kernel.ternary_linear(h.reshape(-1, self.in_features).float().contiguous(), self.codes,
                                      self.weight_scale.float(), bias, self.out_features)
            return y.reshape(*h.shape[:-1], -1).to(x.dtype)  # bias included
        if self._uses_bag(h):
            y = self._bag_linear(h)
        else:
            y = integer_linear(h, self._operand(), self.weight_scale, self._gemm)[..., : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act_norm={'rms' if self.rms_norm is not None else 'none'}, "
                f"backend={self.backend}")
