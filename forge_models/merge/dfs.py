"""Data-flow-space (DFS) merging: route tokens through a sequence of the source models' layers.

Akiba, Shing, Tang, Sun, Ha 2024, "Evolutionary Optimization of Model Merging Recipes",
https://arxiv.org/abs/2403.13187, section 3.2. Weights are not changed; what is searched is the path:

- the M layers of the source models are laid out in order (model 0's layers, then model 1's, ...) and
  the layout is repeated r times, giving T = M * r slots;
- an indicator I of length T selects the slots whose value is > 0; the selected layers, in slot order,
  form the merged model's layer stack;
- a matrix W in R^{M x M} scales the input of layer j when it comes from layer i.

Where this differs from the paper, on purpose:

- W is applied only at *joints between models* (the previous layer belongs to another source model);
  a transition inside one model keeps scale 1. Distribution shift between models is what the scaling is
  for; within-model entries of W are ignored.
- The first routed layer is never scaled (its input comes from the embeddings, which have no index in W).
- Embeddings, the final norm and the head come from one model (``base``, Sakana's "model A").

:func:`build_dfs_model` builds the routed model in memory (exact for any W, through forward pre-hooks
on the joint layers). The streaming merge (``merge_models`` with ``merge_method: dfs``) writes it as a
plain Hugging Face folder, which can only express W = 1 at every joint: a scale != 1 cannot be folded
into the weights of a pre-norm residual block (it scales the residual stream itself), so that case is
refused rather than written wrong.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

__all__ = ["DFSRoute", "dfs_route", "build_dfs_model", "find_layer_stack"]


@dataclass(frozen=True)
class DFSRoute:
    """A routed layer stack.

    Attributes:
        layers: (model index, layer index) of every output layer, in execution order.
        scales: the input scale of every output layer (1.0 except at joints between models).
    """

    layers: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    @property
    def joints(self) -> tuple[int, ...]:
        """Output positions whose previous layer comes from another model."""
        return tuple(k for k in range(1, len(self.layers)) if self.layers[k][0] != self.layers[k - 1][0])

    @property
    def unit_scales(self) -> bool:
        return all(s == 1.0 for s in self.scales)


def dfs_route(
    indicator: Sequence[float],
    layers_per_model: Sequence[int],
    *,
    repeats: int,
    scales: Sequence[Sequence[float]] | None = None,
) -> DFSRoute:
    """Decode an indicator (and optional scale matrix W) into a :class:`DFSRoute`.

    Args:
        indicator: T = M * repeats numbers; slot t holds global layer t mod M and is used when > 0.
        layers_per_model: number of layers of each source model, in layout order (M is their sum).
        repeats: r, how often the layout is repeated.
        scales: optional M x M matrix; entry [i][j] scales the input of global layer j after layer i.

    Raises:
        ValueError: wrong lengths, no slot selected, or a non-finite / wrongly shaped W.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not layers_per_model or any(n < 1 for n in layers_per_model):
        raise ValueError(f"every source model needs at least one layer, got {list(layers_per_model)}")
    m_total = sum(layers_per_model)
    if len(indicator) != m_total * repeats:
        raise ValueError(f"DFS indicator has {len(indicator)} entries; the layout needs T = M * r = "
                         f"{m_total} * {repeats} = {m_total * repeats}")
    owner: list[tuple[int, int]] = []
    for model, n in enumerate(layers_per_model):
        owner.extend((model, layer) for layer in range(n))
    chosen = [slot % m_total for slot, v in enumerate(indicator) if float(v) > 0]
    if not chosen:
        raise ValueError("DFS indicator selects no layer (no entry is > 0)")
    if scales is not None:
        if len(scales) != m_total or any(len(row) != m_total for row in scales):
            raise ValueError(f"DFS scales must be an M x M matrix with M = {m_total}")
        if not all(math.isfinite(float(x)) for row in scales for x in row):
            raise ValueError("DFS scales must be finite numbers")
    out_scales = [1.0]
    for prev, cur in zip(chosen, chosen[1:]):
        joint = owner[prev][0] != owner[cur][0]
        out_scales.append(float(scales[prev][cur]) if (joint and scales is not None) else 1.0)
    return DFSRoute(layers=tuple(owner[g] for g in chosen), scales=tuple(out_scales))


def find_layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The parent module, attribute name and ModuleList of a causal LM's decoder layers.

    Looks for a ModuleList called ``layers`` / ``h`` / ``blocks`` with ``num_hidden_layers`` entries.
    """
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and leaf in ("layers", "h", "blocks") and (want is None or len(module) == want):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            return parent, leaf, module
    raise ValueError(f"{type(model).__name__}: no decoder layer stack (a ModuleList 'layers' of {want} blocks) found")


def _scale_input(scale: float, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # Decoder layers take the hidden states first, positionally (Cognate, Llama) or as a keyword.
    if args:
        return (args[0] * scale, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = kwargs["hidden_states"] * scale
    return args, kwargs


def build_dfs_model(models: Sequence[nn.Module], route: DFSRoute, *, base: int = 0) -> nn.Module:
    """A new model whose layer stack is ``route`` over ``models`` (copies; the sources are untouched).

    Embeddings, final norm and head are ``models[base]``'s. Layers at joints with a scale != 1 get a
    forward pre-hook that multiplies their input hidden states. ``config.num_hidden_layers`` (and
    ``layer_types`` where present) follow the route; attention ``layer_idx`` is renumbered so a KV cache
    keeps one slot per routed layer.
    """
    if not models:
        raise ValueError("build_dfs_model needs at least one model")
    kinds = {type(mdl).__name__ for mdl in models}
    if len(kinds) != 1:
        raise ValueError(f"DFS routes layers between models of one architecture, got {sorted(kinds)}")
    stacks = [find_layer_stack(mdl)[2] for mdl in models]
    reference = {k: tuple(v.shape) for k, v in stacks[0][0].state_dict().items()}
    for i, stack in enumerate(stacks[1:], start=1):
        shapes = {k: tuple(v.shape) for k, v in stack[0].state_dict().items()}
        if shapes != reference:
            raise ValueError(f"model {i}'s layers differ in shape from model 0's: "
                             f"{sorted(set(shapes.items()) ^ set(reference.items()))[:3]}")
    for m_idx, l_idx in route.layers:
        if not 0 <= m_idx < len(models) or not 0 <= l_idx < len(stacks[m_idx]):
            raise ValueError(f"route names layer {l_idx} of model {m_idx}, which does not exist")

    # Copy the base without its own layers (they are replaced), then attach copies of the routed ones.
    parent, attr, own = find_layer_stack(models[base])
    setattr(parent, attr, nn.ModuleList())
    try:
        out = copy.deepcopy(models[base])
    finally:
        setattr(parent, attr, own)
    new_layers = nn.ModuleList(copy.deepcopy(stacks[m][l]) for m, l in route.layers)
    out_parent = out.get_submodule(_path_of(models[base], parent)) if parent is not models[base] else out
    setattr(out_parent, attr, new_layers)

    cfg = out.config
    cfg.num_hidden_layers = len(route.layers)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list):
        cfg.layer_types = [models[m].config.layer_types[l] for m, l in route.layers]
    for k, layer in enumerate(new_layers):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = k
        if route.scales[k] != 1.0:
            layer.register_forward_pre_hook(functools.partial(_scale_input, route.scales[k]), with_kwargs=True)
    return out


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module not found under root")
