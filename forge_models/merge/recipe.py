"""Merge recipes in mergekit's YAML format, as a frozen pydantic model, and how parameters resolve.

Accepted (mergekit's ``MergeConfiguration`` for the methods in the registry)::

    merge_method: ties                 # any name in forge_models.merge.registry.METHODS
    base_model: path/to/base           # local Hugging Face folders (safetensors); required by task-vector methods
    models:                            # either models ...
      - model: path/to/a
        parameters: {weight: 1.0, density: [1.0, 0.5]}     # a list = gradient over layer depth
      - model: path/to/b
        parameters:
          weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]   # first matching filter wins
    slices:                            # ... or slices (layer stacking; every slice's sources span equal lengths)
      - sources: [{model: path/to/a, layer_range: [0, 16]}]
    parameters: {normalize: true, lambda: 1.0, t: [0, 0.5, 1]}
    dtype: bfloat16                    # inputs are rounded to this dtype before merging
    out_dtype: float16                 # dtype written (default: dtype, else each base tensor's)
    tokenizer_source: base             # base (default), or a model path; the tokenizer is copied

Resolution, as in mergekit (``mergekit/config.py``): a setting is a scalar; a list of numbers
interpolated linearly at t = layer / (num_layers - 1) of its slice (t = 0 for embeddings, norms and
the head); a conditional ``{filter, value}`` whose filter is a substring of the tensor name (``*`` or no
filter matches everything); or a list of conditionals (the first match wins). A per-model value is looked
up on the slice source (the model), then the slice, then the top-level ``parameters``; a global value on
the slice, then the top level.

Beyond mergekit: the task-vector methods take ``rescale_norm`` (``inverse`` = divide kept entries by
their keep probability, the DARE / DELLA papers' rescale and the default of dare_* / della*; ``l1`` =
mergekit's ``rescale: true``, the default of ties / breadcrumbs; ``l2``, ``linf``). Refused with a reason:
``modules``, ``tokenizer`` (vocabulary building), ``chat_template``, ``tokenizer_source: union``, slice
``residual_weight``, parameters a method does not have (mergekit ignores those silently), hub model ids.

``dfs`` (not in mergekit; Akiba et al. 2024, https://arxiv.org/abs/2403.13187) takes ``models`` (their
layers are laid out in that order) and the top-level parameters ``repeats`` (r), ``indicator`` (T = M * r
numbers; a slot is used where its value is > 0) and optionally ``scales`` (an M x M matrix; see
``forge_models.merge.dfs``). Embeddings, final norm and head come from ``base_model`` (default: the first
model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from forge_models.config import Frozen
from forge_models.merge.registry import METHODS, get_method
from forge_models.runtime import ConfigError

__all__ = [
    "ConditionalParameter",
    "InputModel",
    "InputSlice",
    "OutputSlice",
    "MergeRecipe",
    "ParameterSetting",
    "evaluate_setting",
    "lookup",
    "load_recipe",
    "DTYPE_NAMES",
]

Scalar = Union[bool, int, float, str]
DTYPE_NAMES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
# mergekit keys this implementation knows and deliberately refuses, with the reason.
_UNSUPPORTED = {
    "modules": "multi-module configs are not supported; use models or slices",
    "tokenizer": "tokenizer building (vocabulary union, added tokens) is not supported; use tokenizer_source",
    "chat_template": "chat templates are not rewritten; the tokenizer source's files are copied as they are",
}
_DFS_PARAMS = ("repeats", "indicator", "scales")


class ConditionalParameter(Frozen):
    """A value that applies to tensors whose name contains ``filter`` (all tensors when it is None or *)."""

    value: Union[Scalar, list[Scalar]] = Field(description="Scalar, or a gradient list interpolated over depth.")
    filter: str | None = Field(None, description="Substring of the tensor name, e.g. self_attn or mlp.")


ParameterSetting = Union[Scalar, list[Scalar], ConditionalParameter, list[ConditionalParameter], list[list[float]]]
"""Scalar | gradient list | conditional | list of conditionals | a matrix (dfs ``scales`` only)."""


class InputModel(Frozen):
    """One model of a ``models:`` recipe."""

    model: str = Field(description="Local Hugging Face model folder (config.json + safetensors).")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Per-model parameters (weight, density, ...).")


class InputSlice(Frozen):
    """A contiguous range of one source model's layers."""

    model: str = Field(description="Local Hugging Face model folder.")
    layer_range: tuple[int, int] = Field(description="Half-open range [start, end) of the source's layer indices.")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Per-model parameters for this slice.")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must satisfy 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(Frozen):
    """Consecutive output layers, each merged from the corresponding layer of every source."""

    sources: list[InputSlice] = Field(min_length=1, description="Sources; all span the same number of layers.")
    base_model: str | None = Field(None, description="Base for this slice (default: the recipe's base_model).")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Parameters for this slice.")

    @model_validator(mode="before")
    @classmethod
    def _no_residual(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "residual_weight" in data:
            raise ValueError("slice residual_weight is not supported")
        return data

    @model_validator(mode="after")
    def _equal_lengths(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) != 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class MergeRecipe(Frozen):
    """A merge, as written in mergekit's YAML. Structural checks run here; checks that need the model
    files (layer counts, shapes, vocabularies) run in ``forge_models.merge.plan`` before any tensor is read."""

    merge_method: str = Field(description="Registered method name: " + ", ".join(sorted(METHODS)) + ".")
    base_model: str | None = Field(None, description="Base model folder (task vectors are taken against it).")
    models: list[InputModel] | None = Field(None, description="Models merged over all layers.")
    slices: list[OutputSlice] | None = Field(None, description="Output slices (layer stacking / per-range merges).")
    parameters: dict[str, ParameterSetting] | None = Field(None, description="Top-level parameters.")
    dtype: str | None = Field(None, description="Inputs are rounded to this dtype: float32, float16 or bfloat16.")
    out_dtype: str | None = Field(None, description="Output dtype (default: dtype, else the base tensors' dtype).")
    tokenizer_source: str | None = Field(None, description="'base' (default) or a model folder to copy the tokenizer from.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, why in _UNSUPPORTED.items():
                if data.get(key) is not None:
                    raise ValueError(f"mergekit key {key!r}: {why}")
        return data

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = v.removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not supported; use one of {list(DTYPE_NAMES)}")
        return name

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer(cls, v: str | None) -> str | None:
        if v == "union":
            raise ValueError("tokenizer_source 'union' (a merged vocabulary) is not supported; models must share "
                             "one vocabulary; use 'base' or a model path")
        return v

    @model_validator(mode="after")
    def _structure(self) -> "MergeRecipe":
        method = get_method(self.merge_method)
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (non-empty)")
        base_required = method.base == "required"
        if self.slices:
            if self.merge_method == "dfs":
                raise ValueError("dfs takes 'models' (whose layers the indicator routes), not 'slices'")
            for i, s in enumerate(self.slices):
                base = s.base_model or self.base_model
                names = [src.model for src in s.sources]
                if method.layout and len(names) != 1:
                    raise ValueError(f"{self.merge_method}: slice {i} must have exactly one source, got {len(names)}")
                if base_required:
                    if base is None:
                        raise ValueError(f"{self.merge_method} needs base_model (slice {i} has none)")
                    if base not in names:
                        raise ValueError(f"slice {i}: base_model {base} must be one of the slice's sources")
                    _count_check(method, len([n for n in names if n != base]), f"slice {i}")
                elif not method.layout:
                    _count_check(method, len(names), f"slice {i}")
        else:
            names = [m.model for m in self.models or []]
            if len(set(names)) != len(names):
                raise ValueError(f"a model is listed twice in 'models': {names}")
            if method.layout:
                if self.merge_method == "passthrough" and len(names) != 1:
                    raise ValueError("passthrough with 'models' takes exactly one model; use slices to stack layers")
                if self.merge_method == "dfs" and self.base_model is not None and self.base_model not in names:
                    raise ValueError(f"dfs: base_model {self.base_model} must be one of the models")
            elif base_required:
                if self.base_model is None:
                    raise ValueError(f"{self.merge_method} needs base_model (task vectors are taken against it)")
                _count_check(method, len([n for n in names if n != self.base_model]), "models")
            else:
                if self.base_model is not None and self.base_model not in names:
                    raise ValueError(f"{self.merge_method} takes no base model; base_model {self.base_model} "
                                     f"is not one of the models (list it under models with a weight, or drop it)")
                _count_check(method, len(names), "models")
        self._check_parameter_names(method)
        if self.merge_method == "dfs":
            self._check_dfs()
        return self

    def _check_parameter_names(self, method) -> None:
        if self.merge_method == "dfs":
            allowed_global = set(_DFS_PARAMS)
            allowed_model: set[str] = set()
        else:
            allowed_global = {p.name for p in method.parameters} | {p.name for p in method.tensor_parameters}
            allowed_model = {p.name for p in method.tensor_parameters}
        scopes: list[tuple[str, Mapping[str, Any] | None, set[str]]] = [("parameters", self.parameters, allowed_global)]
        for m in self.models or []:
            scopes.append((f"parameters of {m.model}", m.parameters, allowed_model))
        for i, s in enumerate(self.slices or []):
            scopes.append((f"parameters of slice {i}", s.parameters, allowed_global))
            for src in s.sources:
                scopes.append((f"parameters of {src.model} in slice {i}", src.parameters, allowed_model))
        for where, params, allowed in scopes:
            for key in params or {}:
                if key not in allowed:
                    raise ValueError(f"{where}: {key!r} is not a parameter of {self.merge_method} "
                                     f"(allowed here: {sorted(allowed) or 'none'})")

    def _check_dfs(self) -> None:
        p = self.parameters or {}
        if "indicator" not in p or "repeats" not in p:
            raise ValueError("dfs needs parameters 'indicator' (list of numbers) and 'repeats' (int >= 1)")
        r = p["repeats"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"dfs repeats must be an integer >= 1, got {r!r}")
        ind = p["indicator"]
        if not isinstance(ind, list) or not ind or not all(_is_number(x) for x in ind):
            raise ValueError("dfs indicator must be a non-empty list of numbers")
        scales = p.get("scales")
        if scales is not None and not (isinstance(scales, list) and all(isinstance(row, list) for row in scales)):
            raise ValueError("dfs scales must be a matrix (list of lists of numbers)")

    # ------------------------------------------------------------------------------------- yaml

    def to_yaml(self) -> str:
        """The recipe as mergekit-style YAML (defaults left out; round-trips through :func:`load_recipe`)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "MergeRecipe":
        """Parse YAML text (ConfigError with pydantic's reasons on any problem)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"merge recipe is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"merge recipe must be a YAML mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergeRecipe":
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(f"invalid merge recipe: {exc}") from None

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, base first, in order of appearance, without duplicates."""
        out: list[str] = []
        for name in [self.base_model, *(m.model for m in self.models or []),
                     *(src.model for s in self.slices or [] for src in s.sources),
                     *(s.base_model for s in self.slices or [])]:
            if name is not None and name not in out:
                out.append(name)
        return out


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read a recipe YAML file (ConfigError when missing or invalid)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"merge recipe {path} does not exist")
    return MergeRecipe.from_yaml(path.read_text())


# --------------------------------------------------------------------------------- resolution


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at depth fraction ``t``; None when no filter matches.

    Same rules as mergekit's ``evaluate_setting``: numbers in a list are interpolated linearly at
    ``t * (len - 1)``; other lists pick the element at ``int(t * (len - 1))``; conditionals match by
    substring of the tensor name.
    """
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, ConditionalParameter):
        return evaluate_setting(setting.value, tensor_name, t) if _matches(setting.filter, tensor_name) else None
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(_is_number(e) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        if all(isinstance(e, ConditionalParameter) for e in setting):
            for cond in setting:
                if _matches(cond.filter, tensor_name):
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
    raise ConfigError(f"cannot evaluate parameter setting {setting!r} for {tensor_name}")


def lookup(
    name: str,
    *,
    tensor_name: str,
    t: float,
    scopes: list[Mapping[str, Any] | None],
) -> Any:
    """The first non-None value of parameter ``name`` over ``scopes`` (most specific first), or None."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None


def _matches(filter_: str | None, tensor_name: str) -> bool:
    return filter_ is None or filter_ == "*" or filter_ in tensor_name


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _count_check(method, n: int, where: str) -> None:
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        if method.max_models == method.min_models:
            want = f"exactly {method.min_models}"
        elif method.max_models is None:
            want = f"at least {method.min_models}"
        else:
            want = f"{method.min_models} to {method.max_models}"
        other = " besides the base" if method.base == "required" else ""
        raise ValueError(f"{method.name} takes {want} model(s){other}; {where} gives {n}")
