"""Singular Value Fine-tuning (SVF, Transformer^2): the basis, the composition, and attaching an expert.

Reference: Sun, Cetin, Tang, "Transformer-Squared: Self-adaptive LLMs" (arXiv 2501.06252) and the released
code ``SakanaAI/self-adaptive-llms`` (``utils.py::compose_new_params``, ``policy/base.py``).

For each target matrix ``W`` (m x n) the SVD ``W = U diag(S) Vh`` is taken **once**, in fp32. An expert is
one vector ``z`` per target; its mask is ``sigmoid(z) * max_mult`` (released ``policy/base.py``) and the
adapted weight is, as in the released code (not the paper's plain ``U diag(S * z) Vh``)::

    c  = sum(S) / sum(S * mask)                 # keeps the singular-value sum fixed
    W' = U diag(S * mask * c) Vh

so a **uniform mask returns W exactly** (every mask value equal -> ``mask * c == 1``) and z only re-weights
directions against each other. We compute it as a correction of the stored weight::

    W' = W + U diag(S * (c * mask - 1)) Vh

which is the same matrix when all directions are used (``W - U diag(S) Vh`` is only the SVD's rounding),
and keeps the base weight itself in the sum, so the uniform mask gives W up to the rounding of
``c * mask - 1`` (~1e-7) instead of the SVD's reconstruction error.

Which directions: all ``min(m, n)`` of a dense matrix (as released), or the top ``k`` for a ternary
(BitNet) matrix, renormalised within those ``k``. Why the ternary form differs: scaling the singular values
of BitLinear's *latent* weight and re-ternarising it mostly rounds the change away. Here the basis is the
SVD of the weight the ternary layer really computes with (the dequantised ternary codes) and the expert is a
**high-precision low-rank side term** on the layer's normalised input, ``y = BitLinear(x) + x_n @ dW^T``:
the ternary codes are never touched and the stored expert is exactly what runs.

A library may also be **re-based** on other weights of the same layers (:func:`basis_of` on the new effective
weight, keeping the stored number of directions): the compression phase carries only z and the served agent
recomputes the basis from the decoded compressed weights (``forge_models.experts.library``). The composition
is invariant to the sign of a singular pair (``u_i s_i v_i^T = (-u_i) s_i (-v_i)^T``), so the sign choice of
the SVD routine cannot change an expert (for distinct singular values; within a repeated one the SVD may
rotate the directions). A ternary target may then be a ``PackedBitLinear`` (the compressed
model's inference layer): its effective weight is its stored codes divided by its scale, and the side term
is added in the same way on its normalised input.

Attaching is functional: nothing writes into a base weight. A dense ``nn.Linear`` gets a
``torch.nn.utils.parametrize`` parametrisation (``weight`` becomes ``W + dW(mask)``, the original Parameter
kept untouched); a ``BitLinear`` gets a forward hook adding the side term. Both read the masks from one
:class:`MaskState`, so during training gradients flow from the loss into z and nowhere else, and leaving
:func:`attached` removes every parametrisation and hook, giving back the very same Parameter objects.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from forge_models.runtime import ConfigError

__all__ = ["TargetBasis", "MaskState", "find_targets", "decompose", "basis_of", "effective_weight", "is_ternary",
           "mask_from_z", "init_z", "svf_delta", "compose", "attached", "weight_fingerprint", "z_count"]


@dataclass
class TargetBasis:
    """The fp32 SVD of one target matrix, cut to the directions SVF may scale.

    Attributes:
        name: module name of the linear layer (``model.layers.0.mlp.up_proj``).
        U: (m, k) left singular vectors; S: (k,) singular values, descending; Vh: (k, n) right ones.
        ternary: True for a BitLinear target (the basis is that of its dequantised ternary weight and the
            expert is applied as a side term; see the module docstring).
        full_rank: min(m, n) of the matrix (k may be smaller for ternary targets).
        fingerprint: sha256 of the fp32 effective weight the basis was taken from (checked on attach).
    """

    name: str
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    ternary: bool
    full_rank: int
    fingerprint: str

    @property
    def rank(self) -> int:
        return int(self.S.numel())


class MaskState:
    """The masks an attached expert reads: ``masks[name]`` per target, or None for the base weights."""

    def __init__(self) -> None:
        self.masks: Mapping[str, torch.Tensor] | None = None


def _is_bitlinear(module: nn.Module) -> bool:
    from forge_models.bitnet.layers import BitLinear  # lazy: bitnet pulls in its kernel module

    return isinstance(module, BitLinear)


def _is_packed(module: nn.Module) -> bool:
    from forge_models.bitnet.layers import PackedBitLinear

    return isinstance(module, PackedBitLinear)


def is_ternary(module: nn.Module) -> bool:
    """A ternary target: a BitLinear (latent weights) or a PackedBitLinear (the compressed model's layer)."""
    return _is_bitlinear(module) or _is_packed(module)


def find_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the linear layers whose name contains one of ``patterns`` (released code: "mlp")."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p in n for p in patterns)]
    if not names:
        raise ConfigError(f"no linear layer of {type(model).__name__} matches target patterns {list(patterns)}")
    packed = [n for n, m in model.named_modules() if type(m).__name__ == "PackedBitLinear" and any(p in n for p in patterns)]
    if packed:
        raise ConfigError(f"{packed[:3]}... are packed BitNet layers; load the model from its latent weights "
                          "(tasks.inputs.load_input_model) so SVF can read the ternary weights")
    return names


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 matrix the layer computes with: the weight, or for BitLinear / PackedBitLinear the dequantised
    ternary codes (``q / s_w``; the same bits for a BitLinear and the PackedBitLinear stored from it)."""
    if _is_packed(module):
        return module.ternary().float().cpu() / module.weight_scale.float().cpu()
    w = module.weight.detach().float()
    if _is_bitlinear(module):
        from forge_models.bitnet.quant import weight_quant

        if float(module.quant_strength) != 1.0:
            raise ConfigError(f"BitLinear at quant_strength {module.quant_strength}; SVF experts need the "
                              "finished ternary model (strength 1)")
        q, scale = weight_quant(w)
        return q.float() / scale
    return w


def weight_fingerprint(w: torch.Tensor) -> str:
    return hashlib.sha256(w.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def basis_of(name: str, module: nn.Module, rank: int | None = None) -> TargetBasis:
    """SVD (fp32, CPU) of one target's effective weight, cut to its top ``rank`` directions (None: all)."""
    w = effective_weight(module).cpu()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    k = S.numel() if rank is None else min(int(rank), S.numel())
    return TargetBasis(name, U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous(), is_ternary(module),
                       int(S.numel()), weight_fingerprint(w))


def decompose(model: nn.Module, targets: Sequence[str], ternary_rank: int = 16) -> dict[str, TargetBasis]:
    """SVD (fp32, CPU, once) of every target; ternary targets keep their top ``ternary_rank`` directions."""
    modules = dict(model.named_modules())
    return {name: basis_of(name, modules[name], ternary_rank if is_ternary(modules[name]) else None)
            for name in targets}


def z_count(bases: Mapping[str, TargetBasis]) -> int:
    """Trainable parameters of one expert: one z entry per scaled direction (sum of min(m, n) when dense)."""
    return sum(b.rank for b in bases.values())


def init_z(bases: Mapping[str, TargetBasis], init_value: float, init_std: float, generator: torch.Generator
           ) -> dict[str, torch.Tensor]:
    """Released init (``policy/base.py``): z = randn * std + init_value (mask ~ sigmoid(0.1) = 0.525)."""
    return {n: torch.randn(b.rank, generator=generator) * init_std + init_value for n, b in bases.items()}


def mask_from_z(z: torch.Tensor, max_mult: float) -> torch.Tensor:
    return torch.sigmoid(z) * max_mult


def _coefficients(basis: TargetBasis, mask: torch.Tensor) -> torch.Tensor:
    """``S * (c * mask - 1)``: the change of each singular value under the renormalised composition."""
    S = basis.S.to(mask.device)
    c = S.sum() / (S * mask).sum()
    return S * (c * mask - 1.0)


def svf_delta(basis: TargetBasis, mask: torch.Tensor) -> torch.Tensor:
    """``W' - W`` for one target (m x n)."""
    coef = _coefficients(basis, mask)
    return (basis.U.to(mask.device) * coef) @ basis.Vh.to(mask.device)


def compose(weight: torch.Tensor, basis: TargetBasis, mask: torch.Tensor) -> torch.Tensor:
    """The adapted weight ``W' = W + U diag(S (c mask - 1)) Vh`` (see the module docstring)."""
    return weight + svf_delta(basis, mask.to(weight.device)).to(weight.dtype)


class _SVFWeight(nn.Module):
    """Parametrisation of a dense weight: ``W -> W + dW(mask)``; the identity while no mask is set."""

    def __init__(self, basis: TargetBasis, state: MaskState) -> None:
        super().__init__()
        self.basis, self.state = basis, state

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masks = self.state.masks
        if masks is None:
            return weight
        return compose(weight, self.basis, masks[self.basis.name])


def _side_hook(basis: TargetBasis, state: MaskState):
    """Forward hook of a BitLinear target: add ``x_n @ dW^T`` in high precision (ternary codes untouched)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        masks = state.masks
        if masks is None:
            return output
        x = args[0]
        x_n = module.rms_norm(x) if module.rms_norm is not None else x
        coef = _coefficients(basis, masks[basis.name].to(x.device))
        # Low rank: (x_n Vh^T) diag(coef) U^T costs k (m + n) per token instead of m n.
        side = F.linear(F.linear(x_n.float(), basis.Vh.to(x.device)) * coef, basis.U.to(x.device))
        return output + side.to(output.dtype)

    return hook


@contextmanager
def attached(model: nn.Module, bases: Mapping[str, TargetBasis], state: MaskState, *, check: bool = True
             ) -> Iterator[MaskState]:
    """Attach SVF to every target of ``model`` for the duration of the block; the base comes back unchanged.

    While attached, the model computes with the masks in ``state.masks`` (None: the base weights). On exit the
    parametrisations are removed with ``leave_parametrized=False`` (the original Parameter objects return)
    and the hooks are removed, so the base weights are restored bit for bit.

    ``check``: refuse a model whose target weights are not the ones the basis was taken from.
    """
    modules = dict(model.named_modules())
    missing = [n for n in bases if n not in modules]
    if missing:
        raise ConfigError(f"the model has no layers {missing[:3]}: this expert library belongs to another model")
    if check:
        for name, basis in bases.items():
            if weight_fingerprint(effective_weight(modules[name]).cpu()) != basis.fingerprint:
                raise ConfigError(f"layer {name}: its weight is not the one the experts were trained on "
                                  "(fingerprint mismatch); load the model stored with this library")
    done: list[tuple[str, object]] = []
    try:
        for name, basis in bases.items():
            module = modules[name]
            if basis.ternary:
                done.append(("hook", module.register_forward_hook(_side_hook(basis, state))))
            else:
                parametrize.register_parametrization(module, "weight", _SVFWeight(basis, state))
                done.append(("param", module))
        yield state
    finally:
        for kind, item in reversed(done):
            if kind == "hook":
                item.remove()  # type: ignore[attr-defined]
            else:
                parametrize.remove_parametrizations(item, "weight", leave_parametrized=False)  # type: ignore[arg-type]
