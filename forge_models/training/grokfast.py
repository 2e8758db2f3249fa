"""Grokfast: amplify the slow component of the gradient (Lee, Kang, Kim, Lee, arXiv 2405.20233).

The two filters keep the interface and defaults of the reference code (``ironjr/grokfast grokfast.py``)
and are called between ``loss.backward()`` and ``optimizer.step()``; they rewrite ``p.grad`` in place
and return the filter state, which the caller passes back on the next call::

    grads = None
    for batch in data:
        loss(model, batch).backward()
        grads = gradfilter_ema(model, grads=grads, alpha=0.98, lamb=2.0)
        optimizer.step(); optimizer.zero_grad()

- **EMA** ``mu_t = alpha * mu_{t-1} + (1 - alpha) * g_t`` with ``mu`` seeded with the first gradient (no
  bias correction), then ``p.grad = g_t + lamb * mu_t``. So the first call, and every call for a
  constant gradient, gives ``(1 + lamb) * g``; for a gradient alternating between +g and -g, ``mu``
  tends to ``±g (1 - alpha) / (1 + alpha)`` and the fast component is barely amplified.
- **MA** ``p.grad = g_t + lamb * mean(last window_size gradients, the current one included)``
  (``filter_type="sum"``: their sum). With ``warmup=True`` nothing changes until the window is full;
  ``trigger=True`` (with warm-up) keeps recording but never filters, as in the reference.

Two differences from the reference, neither of which changes a filtered value: a parameter whose
``grad`` is None (unused this step) or that does not require grad is skipped and never touched (the
reference would fail on it), and stored gradients are copies, so a later in-place ``zero_grad`` cannot
empty the window. The state is keyed by parameter name, so it can be checkpointed.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from torch import nn

__all__ = ["gradfilter_ema", "gradfilter_ma"]


@torch.no_grad()
def gradfilter_ema(
    model: nn.Module,
    grads: dict[str, torch.Tensor] | None = None,
    alpha: float = 0.98,
    lamb: float = 2.0,
) -> dict[str, torch.Tensor]:
    """EMA Grokfast filter; returns the running averages ``mu`` by parameter name (pass them back)."""
    if grads is None:
        grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.grad is None:
            continue
        g = p.grad.detach()
        if name not in grads:
            grads[name] = g.clone()  # seeded with the first gradient: no bias correction
        grads[name] = grads[name] * alpha + g * (1.0 - alpha)
        p.grad = g + grads[name] * lamb
    return grads


@torch.no_grad()
def gradfilter_ma(
    model: nn.Module,
    grads: dict[str, deque] | None = None,
    window_size: int = 100,
    lamb: float = 5.0,
    filter_type: Literal["mean", "sum"] = "mean",
    warmup: bool = True,
    trigger: bool = False,
) -> dict[str, deque]:
    """Moving-average Grokfast filter; returns the gradient windows by parameter name (pass them back)."""
    if filter_type not in ("mean", "sum"):
        raise ValueError(f"filter_type must be 'mean' or 'sum', got {filter_type!r}")
    if grads is None:
        grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.grad is None:
            continue
        g = p.grad.detach()
        window = grads.setdefault(name, deque(maxlen=window_size))
        window.append(g.clone())
        # The reference's condition, with its operator precedence made explicit.
        if (not warmup) or (len(window) == window_size and not trigger):
            total = torch.stack(list(window)).sum(0)
            avg = total / len(window) if filter_type == "mean" else total
            p.grad = g + avg * lamb
    return grads
