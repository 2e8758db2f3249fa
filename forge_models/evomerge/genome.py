"""The genome of a merge: a method plus its hyperparameters per model and per layer group.

A :class:`Genome` is a method name and a flat, ordered tuple of gene values. Which genes a method has is
fixed by :func:`gene_specs` from the merge registry's schema:

- ``weight[m][g]`` for every method with a per-model weight (all but SLERP and Model Stock), in [0, 1];
- ``density[m][g]`` for the sparsifying methods (TIES, DARE, breadcrumbs, DELLA), in [0.1, 1] intersected
  with the merge registry's own limits for that method (DELLA, epsilon 0.15: [0.1501, 0.8499], because
  its MagPrune needs 0 < density - epsilon and density + epsilon < 1);
- ``lambda`` for the methods that normalise by the agreeing weights (TIES, DELLA), in [0.5, 1.5] (for the
  others a common scale of the weights already plays that role, so a lambda gene would be redundant);
- ``t[g]`` for SLERP, in [0, 1];
- ``slot[t]`` for DFS (data-flow-space layer routing, Akiba et al. 2024 section 3.2), in [-1, 1]: the
  merged models' layers laid out in order and repeated ``dfs_repeats`` times give T slots, and slot t's
  layer is used when its gene is > 0. Weights stay frozen; the paper's joint scaling matrix W is held at 1
  (a plain Hugging Face folder cannot store a scale on the residual stream; see forge_models.merge.dfs), a
  deviation the paper measured at "more than 20%" of DFS's gain.

``m`` runs over the merged models, ``g`` over ``layer_groups`` groups of layers; with more than one group a
gene becomes a list that mergekit interpolates over depth (a "gradient"), so every output layer gets its
own value. Gene values are rounded to :data:`DECIMALS` places, so the recipe written to disk reproduces the
evaluated candidate exactly and the fitness cache key (:meth:`Genome.key`) is stable.

Every gene range is the search range of its kind (:data:`RANGES`) intersected with the limits the merge
registry's checks enforce (``MergeMethod.limits``), so a proposed genome never fails those checks for a
range reason. A genome can still be invalid as a whole (e.g. ``linear`` with every weight 0 cannot be
normalised): :meth:`Genome.invalid_reason` runs the registry's checks without merging, and the search
scores such a candidate -inf with the reason logged instead of aborting.
"""

from __future__ import annotations

import hashlib
import json
import math
import random as _random
from dataclasses import dataclass
from typing import Any, Sequence

from forge_models.merge.registry import METHODS, get_method
from forge_models.runtime import ConfigError

__all__ = ["GeneSpec", "Genome", "MergeSpace", "gene_range", "gene_specs", "DECIMALS"]

DECIMALS = 4
"""Gene values are rounded to this many decimals (a 1e-4 weight change is far below fitness noise)."""

RANGES = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "lambda": (0.5, 1.5), "t": (0.0, 1.0), "slot": (-1.0, 1.0)}
"""Search range of each gene kind. Density > 0.1: at lower densities a tiny model's task vectors vanish."""


@dataclass(frozen=True)
class GeneSpec:
    """One gene: its name (``weight.math.0``), kind, and range."""

    name: str
    kind: str
    low: float
    high: float

    def clip(self, value: float) -> float:
        return round(min(max(float(value), self.low), self.high), DECIMALS)

    def unit(self, value: float) -> float:
        """The value mapped to [0, 1] over the gene's range (for distances and CMA-ES scaling)."""
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class MergeSpace:
    """What is merged: the models (folder names in the input artifact), the base, and the layer groups."""

    models: tuple[str, ...]
    base: str | None
    layer_groups: int = 1
    layers: tuple[int, ...] = ()
    """Decoder layers of each merged model, in ``models`` order (needed by DFS only; empty = unknown)."""
    dfs_repeats: int = 2
    """DFS: how often the layer layout is repeated (Akiba et al.'s r)."""

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ConfigError(f"merging needs at least two models, got {list(self.models)}")
        if self.base is not None and self.base in self.models:
            raise ConfigError(f"the base model {self.base!r} must not also be one of the merged models")
        if self.layers and (len(self.layers) != len(self.models) or min(self.layers) < 1):
            raise ConfigError(f"layers {list(self.layers)} must give each of {list(self.models)} at least one layer")
        if self.dfs_repeats < 1:
            raise ConfigError(f"dfs_repeats must be >= 1, got {self.dfs_repeats}")

    @property
    def dfs_slots(self) -> int:
        """T = M * r: the DFS indicator's length (M = all merged models' layers)."""
        return sum(self.layers) * self.dfs_repeats

    def usable(self, method: str) -> str | None:
        """None if ``method`` can merge these models, else the reason it cannot."""
        spec = get_method(method)
        if method == "slerp":
            return None if len(self.models) == 2 else f"slerp merges exactly two models, not {len(self.models)}"
        if method == "dfs":
            return None if self.layers else "dfs needs the merged models' layer counts (none were given)"
        if spec.base == "required" and self.base is None:
            return f"{method} takes task vectors against a base model and none is configured"
        if spec.layout:
            return f"{method} is a layer-layout method, not searched"
        return None


def gene_range(method: str, kind: str) -> tuple[float, float]:
    """The search range of gene ``kind`` of ``method``: :data:`RANGES` within the registry's limits."""
    low, high = RANGES[kind]
    limit = METHODS[method].limits.get(kind)
    if limit is not None:
        # One rounding unit inside an open end, so the rounded value is still strictly inside.
        lo, hi = limit.closed(10.0**-DECIMALS)
        low, high = max(low, lo), min(high, hi)
    if not low < high:
        raise ConfigError(f"{method}: the {kind} search range {RANGES[kind]} and the merge's limits leave nothing")
    return round(low, DECIMALS), round(high, DECIMALS)


def gene_specs(method: str, space: MergeSpace) -> tuple[GeneSpec, ...]:
    """The ordered genes of ``method`` on ``space`` (see module docstring)."""
    spec = METHODS[method]
    tensor_params = {p.name for p in spec.tensor_parameters}
    groups = range(space.layer_groups)
    genes: list[GeneSpec] = []
    for kind in ("weight", "density"):
        if kind in tensor_params:
            low, high = gene_range(method, kind)
            genes += [GeneSpec(f"{kind}.{m}.{g}", kind, low, high) for m in space.models for g in groups]
    normalize = spec.param("normalize")
    if spec.param("lambda") is not None and normalize is not None and normalize.default is True:
        genes.append(GeneSpec("lambda", "lambda", *gene_range(method, "lambda")))
    if method == "slerp":
        genes += [GeneSpec(f"t.{g}", "t", *gene_range(method, "t")) for g in groups]
    if method == "dfs":
        genes += [GeneSpec(f"slot.{t}", "slot", *RANGES["slot"]) for t in range(space.dfs_slots)]
    return tuple(genes)


@dataclass(frozen=True)
class Genome:
    """A merge recipe in gene form: ``method`` and one value per gene of :func:`gene_specs`."""

    method: str
    values: tuple[float, ...]

    @classmethod
    def make(cls, method: str, values: Sequence[float], space: MergeSpace) -> "Genome":
        specs = gene_specs(method, space)
        if len(values) != len(specs):
            raise ValueError(f"{method} on {len(space.models)} models x {space.layer_groups} groups has "
                             f"{len(specs)} genes, got {len(values)} values")
        return cls(method, tuple(s.clip(v) for s, v in zip(specs, values)))

    @classmethod
    def random(cls, method: str, space: MergeSpace, rng: _random.Random) -> "Genome":
        return cls.make(method, [rng.uniform(s.low, s.high) for s in gene_specs(method, space)], space)

    @classmethod
    def center(cls, method: str, space: MergeSpace) -> "Genome":
        """Mid-range weights and densities, lambda 1, t 0.5 (the published CMA-ES start: 0.5). DFS starts at
        the first model as it is: its layers in the first repeat at +0.5, every other slot at -0.5."""
        if method == "dfs":
            first = space.layers[0] if space.layers else 0
            return cls.make(method, [0.5 if t < first else -0.5 for t in range(space.dfs_slots)], space)
        return cls.make(method, [(s.low + s.high) / 2 if s.kind != "density" else 0.5
                                 for s in gene_specs(method, space)], space)

    def genes(self, space: MergeSpace) -> dict[str, float]:
        return {s.name: v for s, v in zip(gene_specs(self.method, space), self.values)}

    def invalid_reason(self, space: MergeSpace) -> str | None:
        """None if the merge registry accepts this genome's values, else its reason (no tensors are touched).

        Runs the method's own parameter checks (``MergeMethod.resolve``) once per layer group; values
        between groups are interpolations of the groups' values, which every check here accepts when
        both ends pass (the limits are intervals).
        """
        why = space.usable(self.method)
        if why is not None:
            return why
        specs = gene_specs(self.method, space)
        if len(self.values) != len(specs):
            return f"{self.method} on this space has {len(specs)} genes, the genome {len(self.values)}"
        if self.method == "dfs":
            return None
        genes = self.genes(space)
        spec = get_method(self.method)
        for g in range(space.layer_groups):
            if self.method == "slerp":
                values: dict[str, Any] = {"t": genes[f"t.{g}"]}
                per_model: list[dict[str, Any]] = [{}]
            else:
                values = {"lambda": genes["lambda"]} if "lambda" in genes else {}
                per_model = [{k: genes[f"{k}.{m}.{g}"] for k in ("weight", "density") if f"{k}.{m}.{g}" in genes}
                             for m in space.models]
            try:
                spec.resolve(values, per_model, 1, f"{self.describe(space)} (layer group {g})")
            except ValueError as exc:
                return str(exc)
        return None

    def key(self) -> str:
        """Fitness-cache key: sha256 of the method and the rounded gene values (16 hex characters)."""
        payload = json.dumps({"method": self.method, "values": [round(v, DECIMALS) for v in self.values]})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Genome":
        return cls(str(d["method"]), tuple(float(v) for v in d["values"]))

    def unit_vector(self, space: MergeSpace) -> list[float]:
        return [s.unit(v) for s, v in zip(gene_specs(self.method, space), self.values)]

    def recipe(self, space: MergeSpace, paths: dict[str, str], dtype: str = "float32") -> dict[str, Any]:
        """The mergekit-format recipe (a mapping for ``MergeRecipe.model_validate`` / YAML).

        Args:
            paths: model name -> folder or URI written into the recipe.
        """
        genes = self.genes(space)

        def per_model(kind: str, model: str) -> float | list[float] | None:
            vals = [genes[f"{kind}.{model}.{g}"] for g in range(space.layer_groups) if f"{kind}.{model}.{g}" in genes]
            if not vals:
                return None
            return vals[0] if len(vals) == 1 else vals

        method = get_method(self.method)
        recipe: dict[str, Any] = {"merge_method": self.method}
        if self.method == "dfs":
            indicator = [genes[f"slot.{t}"] for t in range(space.dfs_slots)]
            if max(indicator) <= 0:  # a route needs a layer: the slot closest to being used is used
                indicator[indicator.index(max(indicator))] = 1.0
            # Embeddings, final norm and head come from the first model (Akiba et al.'s "model A").
            recipe["base_model"] = paths[space.models[0]]
            recipe["models"] = [{"model": paths[m]} for m in space.models]
            recipe["parameters"] = {"repeats": space.dfs_repeats, "indicator": indicator}
            recipe["dtype"] = dtype
            return recipe
        if self.method == "slerp":
            a, b = space.models
            t = [genes[f"t.{g}"] for g in range(space.layer_groups)]
            recipe["base_model"] = paths[a]
            recipe["models"] = [{"model": paths[a]}, {"model": paths[b]}]
            recipe["parameters"] = {"t": t[0] if len(t) == 1 else t}
        else:
            if method.base == "required":
                recipe["base_model"] = paths[space.base]
            models = []
            for m in space.models:
                params = {k: v for k in ("weight", "density") if (v := per_model(k, m)) is not None}
                models.append({"model": paths[m], **({"parameters": params} if params else {})})
            recipe["models"] = models
            if "lambda" in genes:
                recipe["parameters"] = {"lambda": genes["lambda"]}
        recipe["dtype"] = dtype
        return recipe

    def describe(self, space: MergeSpace) -> str:
        genes = self.genes(space)
        return self.method + (" " + " ".join(f"{k}={v:g}" for k, v in genes.items()) if genes else "")


def distance(a: Genome, b: Genome, space: MergeSpace) -> float:
    """1 between different methods; else the RMS difference of the genes in units of their ranges."""
    if a.method != b.method:
        return 1.0
    ua, ub = a.unit_vector(space), b.unit_vector(space)
    if not ua:
        return 0.0
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(ua, ub)) / len(ua))


def diversity(genomes: Sequence[Genome], space: MergeSpace) -> float:
    """Mean pairwise :func:`distance` of a population (0 = all identical)."""
    pairs = [(i, j) for i in range(len(genomes)) for j in range(i + 1, len(genomes))]
    if not pairs:
        return 0.0
    return sum(distance(genomes[i], genomes[j], space) for i, j in pairs) / len(pairs)
