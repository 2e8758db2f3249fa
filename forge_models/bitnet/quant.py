"""BitNet b1.58 quantisers as pure functions, and their straight-through (STE) autograd wrappers.

Conventions (Ma et al. 2024, arXiv 2402.17764; the HF blog "1.58-bit LLM"; transformers'
``integrations/bitnet.py``), written here once because scale conventions are the known trap:

- **Weights, absmean per tensor:** ``s_w = 1 / max(mean|W|, 1e-5)``, ``W_q = clamp(round(W * s_w), -1, 1)``,
  ``W_deq = W_q / s_w``. ``s_w`` is the *reciprocal* of mean|W|; the integer result is **divided** by it.
  This is the ``weight_scale`` transformers' packed ``BitLinear`` stores (its ``AutoBitLinear`` offline mode
  multiplies instead, and Microsoft's GPU converter stores mean|W|: neither is used here).
- **Activations, absmax per token (last dim), 8 bits:** ``s_x = 127 / max(max|x|, 1e-5)``,
  ``x_q = clamp(round(x * s_x), -128, 127)``, ``x_deq = x_q / s_x``.
- **Integer product:** ``x_deq @ W_deq.T = (x_q @ W_q.T) / (s_x * s_w)``.

``torch.round`` rounds half to even, as transformers does, so the integers agree bit for bit. All
arithmetic is in float32 whatever the input dtype (bf16 cannot even hold 1/s_w accurately).
"""

from __future__ import annotations

import torch

__all__ = [
    "EPS",
    "ACT_QMAX",
    "ACT_QMIN",
    "weight_quant",
    "activation_quant",
    "weight_fake_quant",
    "activation_fake_quant",
    "WeightSTE",
    "ActivationSTE",
    "quant_strength_at",
]

EPS = 1e-5
"""Floor of mean|W| and max|x| (an all-zero tensor or token must not divide by zero)."""
ACT_QMAX = 127
ACT_QMIN = -128


def weight_quant(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantisation of a whole tensor.

    Returns ``(W_q, s_w)``: int8 values in {-1, 0, +1} of ``weight``'s shape, and the float32 0-dim
    scale ``s_w = 1 / max(mean|W|, 1e-5)`` (so ``W ~ W_q / s_w``).
    """
    w = weight.detach().float()
    scale = 1.0 / w.abs().mean().clamp(min=EPS)
    return (w * scale).round().clamp(-1, 1).to(torch.int8), scale


def activation_quant(x: torch.Tensor, *, as_float: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) absmax 8-bit quantisation.

    Returns ``(x_q, s_x)``: int8 values in [-128, 127] of ``x``'s shape, and float32 scales of shape
    ``x.shape[:-1] + (1,)`` with ``s_x = 127 / max(max|x|, 1e-5)`` (so ``x ~ x_q / s_x``). With
    ``as_float`` the same integers are returned in float32 (for kernels that take float weights).
    """
    v = x.detach().float()
    # In-place round/clamp on the product save two temporaries; same values as (v * scale).round().clamp(...),
    # the expression transformers uses. (torch.linalg.vector_norm(inf) is 5x slower than abs().amax() on CPU.)
    scale = ACT_QMAX / v.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)
    q = (v * scale).round_().clamp_(ACT_QMIN, ACT_QMAX)
    return (q if as_float else q.to(torch.int8)), scale


def weight_fake_quant(weight: torch.Tensor) -> torch.Tensor:
    """``W_q / s_w`` in float32: the dequantised ternary tensor (at most 3 distinct values)."""
    q, scale = weight_quant(weight)
    return q.float() / scale


def activation_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """``x_q / s_x`` in float32: the dequantised 8-bit activations."""
    q, scale = activation_quant(x)
    return q.float() / scale


class WeightSTE(torch.autograd.Function):
    """Forward: the dequantised ternary weights (in the input's dtype). Backward: identity.

    Exactly ``W + (q(W) - W).detach()`` of the paper, except that the forward value is ``q(W)`` itself
    rather than a float sum that may round differently. A gradient through ``round`` itself would be
    zero almost everywhere; the identity is what lets the latent weights train.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return weight_fake_quant(weight).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class ActivationSTE(torch.autograd.Function):
    """Forward: the dequantised 8-bit activations (in the input's dtype). Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return activation_fake_quant(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def quant_strength_at(step: int, warmup_steps: int) -> float:
    """The lambda warm-up of the HF fine-tuning recipe: ``min(step / warmup_steps, 1)``; 1 when warmup is 0."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, 1.0)
