"""The optimizer every training phase uses: AdamW with weight decay on matrices only."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["make_adamw"]


def make_adamw(model: nn.Module, lr: float, weight_decay: float, *,
               no_decay_modules: tuple[type[nn.Module], ...] = (nn.Embedding,),
               extra: Iterable[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95, eps 1e-8) over the trainable parameters of ``model`` and then ``extra``.

    Weight decay applies to matrices only: not to vectors (norms, biases) nor to the parameters of
    ``no_decay_modules`` (embeddings; a tied output head is the embedding, counted once).
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, no_decay_modules) for p in m.parameters(recurse=False)}
    decay, plain = [], []
    for p in [*(p for p in model.parameters() if p.requires_grad), *extra]:
        (plain if id(p) in no_decay or p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
