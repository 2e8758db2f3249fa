"""Self-modelling: a head reads an early layer and predicts the model's own tempered output distribution.

Target: ``softmax(logits / T)`` of the model's final logits (detached; T = ``temperature``, default 2,
so the whole distribution matters, not only its top token). Input: the output of decoder layer
``tap_layer`` on its first call (the Cognate refiner calls its layers once per refinement step).
Loss: ``KL(target || softmax(head(h)))`` in nats per real token. The target is a non-trivial fact about
the model itself: what the rest of the network will make of the early state.

The head always trains at full rate; the trunk receives ``weight`` x its gradient through the tap
(:func:`scale_grad`), so the stage schedule decides how much self-modelling shapes the model, and a
weight of 0 leaves the trunk untouched. The head is a separate module: it is never part of the model the
phase returns.

Baseline ("copy"): the *logit lens*, which copies the tap state straight to the output (the model's own
final norm and LM head), i.e. predicts that later layers change nothing. A head that has learned
something must beat it; the unit test checks a trained head clearly does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge_models.runtime import ConfigError

__all__ = ["LayerTap", "SelfModelHead", "decoder_layers", "logit_lens", "scale_grad", "self_model_loss"]


class SelfModelHead(nn.Module):
    """LayerNorm + linear map from the tap's hidden size to the vocabulary (logits of the prediction)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h.float()))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back into ``x`` is multiplied by ``scale`` (0 = detached)."""
    if scale == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, float(scale))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.layers`` of Llama-style and Cognate models, ``h`` of GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(module):
            return module
    raise ConfigError(
        f"{type(model).__name__} has no ModuleList of decoder layers named 'layers', 'h' or 'blocks'; "
        f"the self-model cannot tap it (set training.self_model.enabled=false)"
    )


class LayerTap:
    """Forward hook that keeps the output of one layer's *first* call since the last :meth:`reset`."""

    def __init__(self, layer: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self.value is None:
            self.value = output[0] if isinstance(output, (tuple, list)) else output

    def reset(self) -> None:
        self.value = None

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise ConfigError("the self-model tap saw no forward pass of its layer")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self._handle.remove()


def self_model_loss(
    pred_logits: torch.Tensor, model_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(softmax(model_logits / T) || softmax(pred_logits)) per token, averaged over ``mask`` (nats)."""
    target = F.log_softmax(model_logits.detach().float() / temperature, dim=-1)
    pred = F.log_softmax(pred_logits.float(), dim=-1)
    kl = (target.exp() * (target - pred)).sum(-1)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def logit_lens(model: nn.Module, h: torch.Tensor, temperature: float) -> torch.Tensor:
    """The copy baseline's prediction logits: the tap state through the model's final norm and LM head, / T."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    head = model.get_output_embeddings()
    x = norm(h) if norm is not None else h
    return head(x.to(head.weight.dtype)).float() / temperature
