"""The merge methods by name: which function, which parameters (with defaults and checks), which inputs.

A :class:`MergeMethod` binds a pure per-tensor function from ``forge_models.merge.methods`` to its
parameter schema, like mergekit's ``merge_methods/registry.py``: one function serves several names with
different defaults (``ties``, ``dare_ties``, ``task_arithmetic``, ... are all generalized task
arithmetic). Parameters are of two kinds, as in mergekit:

- ``parameters``: one value per output tensor (``normalize``, ``lambda``, ``t``, ...);
- ``tensor_parameters``: one value per input model and output tensor (``weight``, ``density``, ...).

Both may vary by layer depth and tensor-name filter; the recipe resolves them to plain numbers before
the function is called. Checks run on the resolved values *before* any tensor is read, so a bad recipe
fails with the tensor name in the message and no work done.

``passthrough`` and ``dfs`` are *layout* methods: the recipe decides which source layer feeds each output
layer (slices, or the DFS indicator) and the per-tensor function only copies (and may scale).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from forge_models.merge import methods as m
from forge_models.merge.seeding import tensor_generators

__all__ = ["Param", "MergeMethod", "METHODS", "get_method", "merge_tensors", "method_names"]

REQUIRED = object()
"""Marker for a parameter without a default."""


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    Attributes:
        name: the name in the recipe YAML (``lambda`` is passed to Python as ``lambda_``).
        kind: value type; numbers given for ``bool`` are refused, ints are accepted for ``float``.
        default: the default, or :data:`REQUIRED`.
        choices: allowed values for ``str`` parameters.
        doc: one line for error messages and docs.
    """

    name: str
    kind: type
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def kwarg(self) -> str:
        return "lambda_" if self.name == "lambda" else self.name

    def coerce(self, value: Any, where: str) -> Any:
        """Type-check one resolved value (ValueError naming ``where``)."""
        if value is None and not self.required and self.default is None:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {self.name} must be true or false, got {value!r}")
            return value
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {self.name} must be a number, got {value!r}")
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{where}: {self.name} must be finite, got {value}")
            return value
        if self.kind is str:
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {self.name} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{where}: {self.name} must be one of {list(self.choices)}, got {value!r}")
            return value
        raise TypeError(f"unsupported parameter kind {self.kind}")


@dataclass(frozen=True)
class Limits:
    """An interval of accepted values: ``low`` / ``high`` with open or closed ends."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = True

    def closed(self, margin: float) -> tuple[float, float]:
        """The largest closed sub-interval whose open ends are moved in by ``margin``."""
        return (self.low if self.low_closed else self.low + margin, self.high if self.high_closed else self.high - margin)

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


Check = Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]], int], None]
"""check(global values, per-model values, numel) -> None; raises ValueError with a reason."""


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method.

    Attributes:
        name: registry key (the recipe's ``merge_method``).
        fn: ``fn(tensors, [base,] **values)``; per-model values arrive as lists aligned with ``tensors``.
        reference_url: the paper or page that defines the method.
        base: "required": ``fn`` gets the base tensor separately and ``tensors`` are the other models;
            "none": no base, ``tensors`` are all listed models.
        parameters / tensor_parameters: the schema (see module docstring).
        min_models / max_models: how many tensors ``fn`` takes besides the base.
        layout: output layers are routed from single source layers (passthrough, dfs).
        random: ``fn`` takes a ``generator`` (DARE, DELLA).
        check: cross-parameter checks on resolved values.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    reference_url: str
    base: Literal["required", "none"]
    parameters: tuple[Param, ...] = ()
    tensor_parameters: tuple[Param, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    layout: bool = False
    random: bool = False
    check: Check | None = None
    description: str = ""
    limits: Mapping[str, "Limits"] = field(default_factory=dict, hash=False, compare=False)
    """Numeric limits the method's ``check`` enforces, per parameter (with the other parameters at their
    defaults): what a search may propose without its merge raising (see forge_models.evomerge.genome)."""

    def param(self, name: str) -> Param | None:
        for p in (*self.parameters, *self.tensor_parameters):
            if p.name == name or p.kwarg == name:
                return p
        return None

    def resolve(
        self, values: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]], numel: int, where: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Fill defaults, type-check and run the method's checks. Raises ValueError naming ``where``."""
        known = {p.name for p in self.parameters} | {p.kwarg for p in self.parameters}
        for key in values:
            if key not in known:
                raise ValueError(f"{where}: {key!r} is not a parameter of {self.name} "
                                 f"(global parameters: {[p.name for p in self.parameters]})")
        known_t = {p.name for p in self.tensor_parameters}
        for one in per_model:
            for key in one:
                if key not in known_t:
                    raise ValueError(f"{where}: {key!r} is not a per-model parameter of {self.name} "
                                     f"(per-model parameters: {[p.name for p in self.tensor_parameters]})")
        g: dict[str, Any] = {}
        for p in self.parameters:
            raw = values.get(p.name, values.get(p.kwarg, p.default))
            if raw is REQUIRED:
                raise ValueError(f"{where}: {self.name} needs the parameter {p.name!r} ({p.doc})")
            g[p.name] = p.coerce(raw, where)
        models: list[dict[str, Any]] = []
        for i, one in enumerate(per_model):
            vals: dict[str, Any] = {}
            for p in self.tensor_parameters:
                raw = one.get(p.name, p.default)
                if raw is REQUIRED:
                    raise ValueError(f"{where}: {self.name} needs {p.name!r} for input model {i} ({p.doc})")
                vals[p.name] = p.coerce(raw, where)
            models.append(vals)
        if self.check is not None:
            try:
                self.check(g, models, numel)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return g, models

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None = None,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Merge one tensor position. Per-model parameters are lists aligned with ``tensors`` (a scalar
        is broadcast); missing parameters take their defaults; everything is checked first."""
        if self.base == "required" and base is None:
            raise ValueError(f"{self.name} needs a base tensor")
        if self.base == "none" and base is not None:
            raise ValueError(f"{self.name} takes no base tensor")
        n = len(tensors)
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            most = "any number of" if self.max_models is None else f"at most {self.max_models}"
            raise ValueError(f"{self.name} takes at least {self.min_models} and {most} tensors besides the base, got {n}")
        values = {k: v for k, v in params.items() if not self._is_tensor_param(k)}
        per_model: list[dict[str, Any]] = [{} for _ in range(n)]
        for key, val in params.items():
            if self._is_tensor_param(key):
                seq = list(val) if isinstance(val, (list, tuple)) else [val] * n
                if len(seq) != n:
                    raise ValueError(f"{key}: {len(seq)} values for {n} tensors")
                for i, v in enumerate(seq):
                    per_model[i][key] = v
        numel = tensors[0].numel() if tensors else (base.numel() if base is not None else 0)
        g, models = self.resolve(values, per_model, numel, self.name)
        return self.apply(tensors, base, g, models, generator)

    def apply(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        values: Mapping[str, Any],
        per_model: Sequence[Mapping[str, Any]],
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """Call ``fn`` with already resolved values (the streaming merge's entry point)."""
        kwargs: dict[str, Any] = {}
        for p in self.parameters:
            if p.name in ("int8_mask",):
                continue  # accepted for mergekit YAML compatibility; a memory option with no effect here
            kwargs[p.kwarg] = values[p.name]
        for p in self.tensor_parameters:
            kwargs[p.kwarg] = [one[p.name] for one in per_model]
        if self.random:
            kwargs["generator"] = generator
        if self.base == "required":
            return self.fn(tensors, base, **kwargs)
        return self.fn(tensors, **kwargs)

    def _is_tensor_param(self, key: str) -> bool:
        return any(p.name == key for p in self.tensor_parameters)


# ------------------------------------------------------------------------------------------ checks


def _check_linear(g: Mapping[str, Any], models: Sequence[Mapping[str, Any]], numel: int) -> None:
    if g["normalize"] and sum(x["weight"] for x in models) == 0:
        raise ValueError("linear with normalize: true needs weights that do not sum to 0")


def _check_gta(sparsification: str | None) -> Check:
    def check(g: Mapping[str, Any], models: Sequence[Mapping[str, Any]], numel: int) -> None:
        if g["rescale"] and g["rescale_norm"] == "inverse" and sparsification in ("magnitude", "magnitude_outliers"):
            raise ValueError("rescale_norm 'inverse' divides by a keep probability, which only random "
                             "sparsifiers (DARE, DELLA) have; use l1, l2 or linf")
        for i, x in enumerate(models):
            d = x.get("density", 1.0)
            if not 0 < d <= 1:
                raise ValueError(f"density of input model {i} must be in (0, 1], got {d}")
            if sparsification == "magnitude_outliers":
                gamma = x["gamma"]
                if not 0 <= gamma < 1:
                    raise ValueError(f"gamma of input model {i} must be in [0, 1), got {gamma}")
            if sparsification == "della_magprune" and d < 1:
                eps = x["epsilon"]
                if not (0 < d - eps and d + eps < 1):
                    raise ValueError(f"DELLA needs 0 < density - epsilon and density + epsilon < 1; input "
                                     f"model {i} has density {d}, epsilon {eps}")
    return check


def _check_slerp(g: Mapping[str, Any], models: Sequence[Mapping[str, Any]], numel: int) -> None:
    if not 0 <= g["t"] <= 1:
        raise ValueError(f"slerp t must lie in [0, 1], got {g['t']}")


# ---------------------------------------------------------------------------------------- registry

_WEIGHT = Param("weight", float, doc="per-model weight")
_DENSITY = Param("density", float, 1.0, doc="fraction of each task vector kept, in (0, 1]")
_LAMBDA = Param("lambda", float, 1.0, doc="scale of the merged task vector")
_INT8 = Param("int8_mask", bool, False, doc="mergekit memory option; accepted and ignored")
_NORMS = ("inverse", "l1", "l2", "linf")


def _gta(
    name: str,
    url: str,
    *,
    sparsification: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    rescale_norm: str,
    description: str,
) -> MergeMethod:
    tensor_params = [_WEIGHT, _DENSITY]
    if sparsification == "magnitude_outliers":
        tensor_params.append(Param("gamma", float, 0.01, doc="fraction of largest-magnitude entries dropped"))
    if sparsification == "della_magprune":
        tensor_params.append(Param("epsilon", float, 0.15, doc="half-width of the keep-probability range"))
    if sparsification is None:
        tensor_params.remove(_DENSITY)
    limits: dict[str, Limits] = {}
    if sparsification == "della_magprune":
        # _check_gta: 0 < density - epsilon and density + epsilon < 1 (or density exactly 1, a point).
        eps = next(p for p in tensor_params if p.name == "epsilon").default
        limits = {"density": Limits(eps, 1.0 - eps, False, False), "epsilon": Limits(0.0, 0.5, False, False)}
    elif sparsification is not None:
        limits = {"density": Limits(0.0, 1.0, False, True)}
    if sparsification == "magnitude_outliers":
        limits["gamma"] = Limits(0.0, 1.0, True, False)
    return MergeMethod(
        name=name,
        fn=functools.partial(m.generalized_task_arithmetic, sparsification=sparsification, consensus=consensus),
        reference_url=url,
        base="required",
        parameters=(
            Param("normalize", bool, normalize, doc="divide by the (agreeing) weights"),
            Param("rescale", bool, rescale, doc="rescale sparsified task vectors"),
            Param("rescale_norm", str, rescale_norm, _NORMS,
                  doc="inverse = divide by keep probability (papers); l1/l2/linf = match the norm (mergekit)"),
            _LAMBDA,
            _INT8,
        ),
        tensor_parameters=tuple(tensor_params),
        min_models=1,
        random=sparsification in ("random", "della_magprune"),
        check=_check_gta(sparsification),
        description=description,
        limits=limits,
    )


METHODS: dict[str, MergeMethod] = {}


def _register(method: MergeMethod) -> None:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method


_register(MergeMethod(
    name="linear",
    fn=m.linear,
    reference_url="https://arxiv.org/abs/2203.05482",
    base="none",
    parameters=(Param("normalize", bool, True, doc="divide by the sum of the weights"),),
    tensor_parameters=(_WEIGHT,),
    check=_check_linear,
    description="weighted average of the models",
))
_register(_gta("task_arithmetic", "https://arxiv.org/abs/2212.04089", sparsification=None, consensus=None,
               normalize=False, rescale=False, rescale_norm="l1",
               description="base + lambda * sum of weighted task vectors"))
_register(_gta("ties", "https://arxiv.org/abs/2306.01708", sparsification="magnitude", consensus="sum",
               normalize=True, rescale=False, rescale_norm="l1",
               description="trim to top-k by magnitude, elect signs by summed mass, disjoint mean"))
_register(_gta("dare_linear", "https://arxiv.org/abs/2311.03099", sparsification="random", consensus=None,
               normalize=False, rescale=True, rescale_norm="inverse",
               description="random drop with rescale, then task arithmetic"))
_register(_gta("dare_ties", "https://arxiv.org/abs/2311.03099", sparsification="random", consensus="sum",
               normalize=False, rescale=True, rescale_norm="inverse",
               description="random drop with rescale, then TIES sign consensus"))
_register(_gta("breadcrumbs", "https://arxiv.org/abs/2312.06795", sparsification="magnitude_outliers",
               consensus=None, normalize=False, rescale=False, rescale_norm="l1",
               description="drop the largest outliers and the smallest entries, then task arithmetic"))
_register(_gta("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", sparsification="magnitude_outliers",
               consensus="sum", normalize=False, rescale=False, rescale_norm="l1",
               description="breadcrumbs trimming with TIES sign consensus"))
_register(_gta("della", "https://arxiv.org/abs/2406.11617", sparsification="della_magprune", consensus="sum",
               normalize=True, rescale=True, rescale_norm="inverse",
               description="magnitude-ranked random drop (MagPrune), rescale, TIES sign consensus"))
_register(_gta("della_linear", "https://arxiv.org/abs/2406.11617", sparsification="della_magprune",
               consensus=None, normalize=False, rescale=True, rescale_norm="inverse",
               description="MagPrune, rescale, task arithmetic"))
_register(MergeMethod(
    name="slerp",
    fn=m.slerp,
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    base="required",
    parameters=(Param("t", float, doc="interpolation from the base (0) to the other model (1)"),),
    min_models=1,
    max_models=1,
    check=_check_slerp,
    description="spherical interpolation between the base and one model",
    limits={"t": Limits(0.0, 1.0)},
))
_register(MergeMethod(
    name="model_stock",
    fn=m.model_stock,
    reference_url="https://arxiv.org/abs/2403.19522",
    base="required",
    parameters=(Param("filter_wise", bool, False, doc="one ratio per row instead of per tensor"),),
    min_models=2,
    description="average pulled towards the base by the angle between task vectors",
))
_register(MergeMethod(
    name="passthrough",
    fn=m.passthrough,
    reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    base="none",
    tensor_parameters=(Param("scale", float, None, doc="multiply the copied tensor"),),
    min_models=1,
    max_models=1,
    layout=True,
    description="copy layers from sources by slices (frankenmerge / layer stacking)",
))
_register(MergeMethod(
    name="dfs",
    fn=m.passthrough,
    reference_url="https://arxiv.org/abs/2403.13187",
    base="none",
    min_models=1,
    max_models=1,
    layout=True,
    description="data-flow-space routing: an indicator over the sources' layers, scaling at joints",
))


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name`` (ValueError listing the known names)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {method_names()}") from None


def method_names() -> list[str]:
    return sorted(METHODS)


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seed: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """Merge one tensor position with a registered method, e.g.
    ``merge_tensors("ties", [a, b], base, weight=[1, 1], density=0.5)``.

    Random methods draw from ``generator`` (one shared, or one per input model); without it, ``seed``
    makes one generator per model (``tensor_generators(seed, "", n)``).
    """
    spec = get_method(method)
    if spec.random and generator is None and seed is not None:
        generator = tensor_generators(seed, "", len(tensors))
    return spec(tensors, base, generator=generator, **params)
