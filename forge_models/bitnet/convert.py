"""Turn any Hugging Face causal LM into a BitNet b1.58 model, in place, and report what changed.

Every ``nn.Linear`` becomes a :class:`BitLinear` except the ones kept in high precision:

- the output embedding (``lm_head``) and any linear whose weight is shared with an embedding
  (always kept: ternary embeddings break the model — 2B4T/bitnet.cpp keep them at Q6_K or better);
- any module whose name matches one of ``keep_patterns`` (e.g. ``halt``, the Cognate halting head, or a
  Quiet-STaR mixing head).

Modules with parameters that are not linear layers (embeddings, norms, ...) are never quantised and are
listed as kept with the reason. A model with transformers ``Conv1D`` layers (GPT-2 style) is refused: those
would silently stay in full precision, and transformers' BitNet loader would not convert them either.

Pattern semantics: a pattern matches a module name if it equals it, is its last dotted component(s)
(``halt`` matches ``model.halt``), or matches the whole name as a regular expression
(``model\\.layers\\.0\\..*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from forge_models.bitnet.layers import ActNorm, BitLinear
from forge_models.runtime import ConfigError

__all__ = ["Conversion", "convert_to_bitnet", "set_quant_strength", "bit_linears", "matches_any", "calibrate_act_norms"]


@dataclass
class Conversion:
    """What :func:`convert_to_bitnet` did.

    Attributes:
        converted: names of the linear layers that are now BitLinear, in module order.
        kept: name -> reason for every other module that owns parameters (kept in high precision).
        kept_linear: the subset of ``kept`` that are ``nn.Linear`` (what a BitNet loader must skip).
    """

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    kept_linear: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"converted": list(self.converted), "kept": dict(self.kept), "kept_linear": list(self.kept_linear)}


def matches_any(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern matching module ``name`` (see the module docstring), or None."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return pattern
    return None


def _embedding_weights(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        ids.add(id(out.weight))
    return ids


def _kept_reason(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return f"not a linear layer ({type(module).__name__})"


def convert_to_bitnet(
    model: nn.Module,
    keep_patterns: Sequence[str] = ("lm_head", "halt"),
    act_norm: ActNorm = "rms",
    rms_norm_eps: float | None = None,
) -> Conversion:
    """Replace the linear layers of ``model`` by BitLinear layers (in place; latent weights are shared).

    Args:
        model: any causal LM (a ``PreTrainedModel`` or a plain ``nn.Module``); modified in place.
        keep_patterns: module-name patterns kept in high precision besides the output embedding.
        act_norm: "rms" (learned-gain RMSNorm before activation quantisation) or "none".
        rms_norm_eps: epsilon of that norm; default the model config's ``rms_norm_eps``, else 1e-6.

    Returns:
        the :class:`Conversion` report. The new layers start at quant_strength 1 (fully quantised).

    Raises:
        ConfigError: a pattern is not a valid regex, the model has Conv1D layers, or nothing was converted.
    """
    for pattern in keep_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"keep pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:
        raise ConfigError(
            f"the model has transformers Conv1D layers ({conv1d[:3]}...); BitNet conversion supports nn.Linear "
            f"models only (Llama, Mistral, Qwen, Cognate, ...). GPT-2 style models are not supported."
        )
    if rms_norm_eps is None:
        rms_norm_eps = float(getattr(getattr(model, "config", None), "rms_norm_eps", None) or 1e-6)

    embedding_weights = _embedding_weights(model)
    report = Conversion()
    replacements: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            report.converted.append(name)  # already converted: idempotent
        elif isinstance(module, nn.Linear):
            pattern = matches_any(name, keep_patterns)
            if id(module.weight) in embedding_weights:
                report.kept[name] = "output embedding or tied to an embedding (never ternarised)"
                report.kept_linear.append(name)
            elif pattern is not None:
                report.kept[name] = f"matches keep pattern {pattern!r}"
                report.kept_linear.append(name)
            else:
                report.converted.append(name)
                replacements.append((name, module))
        elif any(True for _ in module.parameters(recurse=False)) and not _inside(name, report.converted):
            report.kept[name] = _kept_reason(module)

    if not report.converted:
        raise ConfigError(
            "no linear layer was converted to BitLinear: the model has none outside the kept modules "
            f"(kept: {sorted(report.kept)}); check bitnet.keep_patterns"
        )
    for name, linear in replacements:
        model.set_submodule(name, BitLinear.from_linear(linear, act_norm=act_norm, rms_norm_eps=rms_norm_eps))
    return report


def _inside(name: str, parents: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in parents)


def bit_linears(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """The model's BitLinear layers with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


def set_quant_strength(model: nn.Module, strength: float) -> int:
    """Set lambda on every BitLinear of ``model``; returns how many layers were set."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"quant strength must be in [0, 1], got {strength}")
    layers = bit_linears(model)
    for _, layer in layers:
        layer.quant_strength = float(strength)
    return len(layers)


@torch.no_grad()
def calibrate_act_norms(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Set each BitLinear norm gain to the mean RMS of that layer's input on ``input_ids`` (at lambda = 0).

    A unit-gain RMSNorm rescales every token of a pretrained layer's input to RMS 1, which changes what
    the model computes; a gain equal to the typical input RMS keeps the scale, so fine-tuning starts
    near the input model. Returns the gains by layer. Strengths are restored afterwards.
    """
    layers = [(n, m) for n, m in bit_linears(model) if m.rms_norm is not None]
    saved = {n: m.quant_strength for n, m in bit_linears(model)}
    seen: dict[str, list[float]] = {n: [] for n, _ in layers}  # a recurrent model calls a layer repeatedly
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=n: seen[name].append(float(args[0].float().pow(2).mean(-1).sqrt().mean()))
        )
        for n, m in layers
    ]
    try:
        set_quant_strength(model, 0.0)
        was_training = model.training
        model.eval()
        model(input_ids=input_ids)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
        for n, m in bit_linears(model):
            m.quant_strength = saved[n]
    rms = {n: sum(v) / len(v) for n, v in seen.items() if v}
    for n, m in layers:
        if n in rms:
            m.rms_norm.weight.fill_(rms[n])
    return rms
