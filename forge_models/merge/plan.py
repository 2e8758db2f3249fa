"""From a recipe to a merge plan: every output tensor, its input tensors and its resolved parameters.

Planning reads only ``config.json``, tokenizer vocabularies and safetensors headers, never tensor data,
and does every check a merge can fail: missing folders, pickled weights, differing architectures or
vocabularies, layer ranges, tensor sets and shapes, every parameter of every tensor. A plan that builds
runs to the end (barring I/O errors); a recipe that is wrong fails here with a :class:`ConfigError` that
names the model, tensor or parameter.

Layout conventions (mergekit's, made generic instead of per-architecture JSON files):

- a layer tensor is ``<prefix>.<index>.<rest>`` with prefix ending in ``layers``, ``h`` or ``blocks``
  (``model.layers.3.mlp.up_proj.weight``); layers are addressed by this real index;
- other tensors are "pre" (names containing ``embed``, ``wte``, ``wpe``: taken from the first slice's
  sources) or "post" (final norm, head, Cognate's ``model.halt``: from the last slice's sources);
- a tied model (``tie_word_embeddings``) may omit ``lm_head.weight``; its embedding stands in for it.
  The output omits the head when every source of the head is tied, and otherwise writes a merged head
  and sets ``tie_word_embeddings: false``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from forge_models.merge.dfs import DFSRoute, dfs_route
from forge_models.merge.recipe import MergeRecipe, lookup
from forge_models.merge.registry import MergeMethod, get_method
from forge_models.merge.safetensors_io import TensorInfo, read_model_index
from forge_models.merge.seeding import tensor_generators, tensor_seed
from forge_models.runtime import ConfigError

__all__ = ["SourceModel", "TensorInput", "PlannedTensor", "MergePlan", "build_plan", "tensor_seed",
           "tensor_generators", "open_source"]

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
HEAD = "lm_head.weight"
EMBED_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
)
_PRE_MARKERS = ("embed", "wte", "wpe")
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer")
# Config keys that must agree for tensors to mean the same thing (shapes alone miss e.g. head counts).
_STRUCTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_attention_heads",
    "num_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "hidden_act",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


# ------------------------------------------------------------------------------------------ sources


@dataclass
class SourceModel:
    """One input model folder, described from its config and safetensors headers."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    layer_prefix: str | None
    layers: dict[int, dict[str, str]]  # layer index -> {rest of the name: full name}
    others: list[str]  # non-layer tensors, head excluded
    tied: bool
    embed_name: str | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_count_key(self) -> str | None:
        for key in _LAYER_KEYS:
            if key in self.config:
                return key
        return None

    def head_input(self) -> str | None:
        """The stored tensor that acts as this model's LM head (the embedding when tied)."""
        if self.tied:
            return self.embed_name
        return HEAD if HEAD in self.tensors else None


def open_source(ref: str, base_dir: Path | None = None) -> SourceModel:
    """Describe a model folder. Raises ConfigError naming what is missing or inconsistent."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_dir():
        raise ConfigError(f"model {ref}: folder {path} does not exist (only local folders are supported)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {ref}: {path} has no config.json")
    if (path / "recipe.json").is_file():  # its index lists only the plain tensors; the rest are encoded
        raise ConfigError(f"model {ref}: {path} is a compressed artifact (phase 8); merge the uncompressed models")
    try:
        tensors = read_model_index(path)
    except FileNotFoundError:
        pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        if pickles:
            raise ConfigError(f"model {ref}: only pickled weights ({pickles[0]}); convert to safetensors "
                              f"(pickles are never loaded)") from None
        raise ConfigError(f"model {ref}: {path} holds no model.safetensors or model.safetensors.index.json") from None
    config = json.loads((path / "config.json").read_text())

    layers: dict[int, dict[str, str]] = {}
    prefixes: set[str] = set()
    others: list[str] = []
    for name in sorted(tensors):
        match = LAYER_RE.match(name)
        if match:
            prefixes.add(match["prefix"])
            layers.setdefault(int(match["index"]), {})[match["rest"]] = name
        elif name != HEAD:
            others.append(name)
    if len(prefixes) > 1:
        raise ConfigError(f"model {ref}: several layer stacks {sorted(prefixes)}; only single-stack decoders are supported")
    if layers and sorted(layers) != list(range(len(layers))):
        raise ConfigError(f"model {ref}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
    embed = next((n for n in EMBED_NAMES if n in tensors), None)
    tie = config.get("tie_word_embeddings")
    tied = (HEAD not in tensors) if tie is None else bool(tie)
    if tied and embed is None and HEAD not in tensors:
        tied = False  # no embedding and no head: nothing to tie (not a causal LM layout we know)
    if not tied and HEAD not in tensors and embed is not None:
        raise ConfigError(f"model {ref}: tie_word_embeddings is false but {HEAD} is missing")
    source = SourceModel(ref, path, config, tensors, next(iter(prefixes), None), layers, others, tied, embed)
    key = source.layer_count_key
    if key is not None and layers and int(config[key]) != len(layers):
        raise ConfigError(f"model {ref}: config.json says {key} = {config[key]} but the weights hold {len(layers)} layers")
    return source


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TensorInput:
    """One input of an output tensor: which source model and which stored tensor."""

    source: str  # model reference as written in the recipe
    name: str


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and everything needed to compute it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: tuple[TensorInput, ...]  # the models besides the base (all models for base-free methods)
    base: TensorInput | None
    values: Mapping[str, Any]  # resolved global parameters
    per_model: tuple[Mapping[str, Any], ...]  # resolved per-model parameters, aligned with inputs
    seed: int | None  # random methods: the merge seed (generators come from tensor_generators)
    copy: bool = False  # non-floating tensor: copied from the first input

    def all_inputs(self) -> tuple[TensorInput, ...]:
        return ((self.base,) if self.base is not None else ()) + self.inputs


@dataclass
class MergePlan:
    """Everything a streaming merge does, decided up front."""

    recipe: MergeRecipe
    method: MergeMethod
    sources: dict[str, SourceModel]
    tensors: list[PlannedTensor]
    config: dict[str, Any]
    tokenizer_dir: Path | None
    tied_output: bool
    num_layers: int
    input_dtype: torch.dtype | None
    route: DFSRoute | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_to_read(self) -> int:
        return sum(self.sources[i.source].tensors[i.name].nbytes for t in self.tensors for i in t.all_inputs())


@dataclass
class _Slice:
    sources: list[tuple[str, int, Mapping[str, Any] | None]]  # (model ref, first source layer, parameters)
    length: int
    base: str | None
    parameters: Mapping[str, Any] | None


def build_plan(recipe: MergeRecipe, *, seed: int = 0, base_dir: str | Path | None = None) -> MergePlan:
    """Check the recipe against the model files and plan every output tensor (no tensor data read)."""
    method = get_method(recipe.merge_method)
    base_path = Path(base_dir) if base_dir is not None else None
    sources = {ref: open_source(ref, base_path) for ref in recipe.referenced_models()}
    _check_structure(sources)
    _check_vocabulary(sources)

    route: DFSRoute | None = None
    if recipe.merge_method == "dfs":
        refs = [m.model for m in recipe.models or []]
        params = recipe.parameters or {}
        try:
            route = dfs_route(params["indicator"], [sources[r].num_layers for r in refs],
                              repeats=params["repeats"], scales=params.get("scales"))
        except ValueError as exc:
            raise ConfigError(f"dfs: {exc}") from None
        if not route.unit_scales:
            joints = [k for k, s in enumerate(route.scales) if s != 1.0]
            raise ConfigError(
                f"dfs: input scales != 1 at output layers {joints} cannot be written as a Hugging Face "
                f"checkpoint (a pre-norm block cannot absorb a scaled residual stream); build the model in "
                f"memory with forge_models.merge.dfs.build_dfs_model, or set those scales to 1")
        head_ref = recipe.base_model or refs[0]
        slices = [_Slice([(refs[m], l, None)], 1, None, None) for m, l in route.layers]
        pre_post = _Slice([(head_ref, 0, None)], 0, None, None)
        pre_slice = post_slice = pre_post
    elif recipe.models:
        entries = [(m.model, m.parameters) for m in recipe.models]
        if method.base == "required" and recipe.base_model not in [e[0] for e in entries]:
            entries.append((recipe.base_model, None))  # mergekit adds an unlisted base the same way
        counts = {ref: sources[ref].num_layers for ref, _ in entries}
        if len(set(counts.values())) != 1:
            raise ConfigError(f"{recipe.merge_method} merges layer by layer, but the models have different layer "
                              f"counts: {counts}; use slices to pick matching ranges")
        n = next(iter(counts.values()))
        single = _Slice([(ref, 0, params) for ref, params in entries], n, recipe.base_model, None)
        slices = [single]
        pre_slice = post_slice = single
    else:
        slices = []
        for i, s in enumerate(recipe.slices or []):
            for src in s.sources:
                have = sources[src.model].num_layers
                if src.layer_range[1] > have:
                    raise ConfigError(f"slice {i}: layer_range {list(src.layer_range)} of {src.model} exceeds its "
                                      f"{have} layers")
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            slices.append(_Slice([(src.model, src.layer_range[0], src.parameters) for src in s.sources], length,
                                 s.base_model or recipe.base_model, s.parameters))
        pre_slice, post_slice = slices[0], slices[-1]

    planner = _Planner(recipe, method, sources, seed)
    donor = sources[recipe.base_model] if recipe.base_model else sources[pre_slice.sources[0][0]]
    prefix = donor.layer_prefix or "model.layers"

    pre_names = [n for n in donor.others if _is_pre(n)]
    post_names = [n for n in donor.others if not _is_pre(n)]
    _check_same_names(sources, pre_slice, pre_names, _is_pre, "embedding")
    _check_same_names(sources, post_slice, post_names, lambda n: not _is_pre(n), "final")
    for name in pre_names:
        planner.add(name, [(ref, name, params) for ref, _, params in pre_slice.sources], pre_slice, t=0.0)

    out_layer = 0
    layer_types: list[Any] = []
    for i, sl in enumerate(slices):
        for idx in range(sl.length):
            t = idx / (sl.length - 1) if sl.length > 1 else 1.0
            rests = None
            for ref, start, _ in sl.sources:
                have = sorted(sources[ref].layers[start + idx])
                if rests is None:
                    rests, first = have, (ref, start + idx)
                elif have != rests:
                    raise ConfigError(f"layer {start + idx} of {ref} has tensors {sorted(set(have) ^ set(rests))[:4]} "
                                      f"that layer {first[1]} of {first[0]} does not (or the reverse)")
            for rest in rests or []:
                inputs = [(ref, sources[ref].layers[start + idx][rest], params) for ref, start, params in sl.sources]
                planner.add(f"{prefix}.{out_layer}.{rest}", inputs, sl, t=t)
            ref0, start0, _ = sl.sources[0]
            types = sources[ref0].config.get("layer_types")
            if isinstance(types, list):
                layer_types.append(types[start0 + idx])
            out_layer += 1

    for name in post_names:
        planner.add(name, [(ref, name, params) for ref, _, params in post_slice.sources], post_slice, t=0.0)
    head_sources = [sources[ref] for ref, _, _ in post_slice.sources]
    tied_output = all(s.tied or s.head_input() is None for s in head_sources)
    if not tied_output:
        inputs = []
        for ref, _, params in post_slice.sources:
            name = sources[ref].head_input()
            if name is None:
                raise ConfigError(f"model {ref} has neither {HEAD} nor a known embedding to stand in for it")
            inputs.append((ref, name, params))
        planner.add(HEAD, inputs, post_slice, t=0.0)

    config = _output_config(donor, out_layer, layer_types, tied_output, planner, recipe)
    return MergePlan(
        recipe=recipe,
        method=method,
        sources=sources,
        tensors=planner.tensors,
        config=config,
        tokenizer_dir=_tokenizer_dir(recipe, donor, base_path),
        tied_output=tied_output,
        num_layers=out_layer,
        input_dtype=_torch_dtype(recipe.dtype),
        route=route,
    )


class _Planner:
    """Resolves parameters and checks shapes for one output tensor at a time."""

    def __init__(self, recipe: MergeRecipe, method: MergeMethod, sources: dict[str, SourceModel], seed: int) -> None:
        self.recipe = recipe
        self.method = method
        self.sources = sources
        self.seed = seed
        self.tensors: list[PlannedTensor] = []
        self.out_dtype = _torch_dtype(recipe.out_dtype or recipe.dtype)

    def add(self, out_name: str, inputs: Sequence[tuple[str, str, Mapping[str, Any] | None]], sl: _Slice, t: float) -> None:
        infos = [self.sources[ref].tensors[name] for ref, name, _ in inputs]
        shapes = {(ref, info.shape) for (ref, _, _), info in zip(inputs, infos)}
        if len({s for _, s in shapes}) != 1:
            detail = ", ".join(f"{ref}: {list(shape)}" for ref, shape in sorted(shapes))
            if out_name == HEAD or any(n in out_name for n in _PRE_MARKERS):
                raise ConfigError(f"vocabulary / embedding sizes differ for {out_name}: {detail}; models must share "
                                  f"one vocabulary")
            raise ConfigError(f"tensor shapes differ for {out_name}: {detail}")
        shape = infos[0].shape

        base_ref = sl.base if self.method.base == "required" else None
        if base_ref is not None and base_ref not in [ref for ref, _, _ in inputs]:
            raise ConfigError(f"{out_name}: base model {base_ref} is not among the inputs")
        base_in = next((TensorInput(ref, name) for ref, name, _ in inputs if ref == base_ref), None)
        others = [(ref, name, params) for ref, name, params in inputs if ref != base_ref]

        if not all(info.dtype.is_floating_point for info in infos):
            first = base_in or TensorInput(others[0][0], others[0][1])
            self.tensors.append(PlannedTensor(out_name, shape, infos[0].dtype, (first,), None, {}, ({},), None, copy=True))
            return

        values: dict[str, Any] = {}
        if self.recipe.merge_method != "dfs":
            for p in self.method.parameters:
                v = lookup(p.name, tensor_name=out_name, t=t, scopes=[sl.parameters, self.recipe.parameters])
                if v is not None:
                    values[p.name] = v
        per_model: list[dict[str, Any]] = []
        for ref, name, params in others:
            one: dict[str, Any] = {}
            for p in self.method.tensor_parameters:
                v = lookup(p.name, tensor_name=name, t=t, scopes=[params, sl.parameters, self.recipe.parameters])
                if v is not None:
                    one[p.name] = v
            per_model.append(one)
        try:
            values, per_model = self.method.resolve(values, per_model, _numel(shape), out_name)
        except ValueError as exc:
            names = ", ".join(ref for ref, _, _ in others)
            raise ConfigError(f"{self.recipe.merge_method}: {exc} (input models in order: {names})") from None

        # Like mergekit, the result takes the base's dtype (the first input's without a base) unless the
        # recipe sets out_dtype or dtype.
        ref_in = base_in or TensorInput(others[0][0], others[0][1])
        dtype = self.out_dtype or self.sources[ref_in.source].tensors[ref_in.name].dtype
        self.tensors.append(PlannedTensor(
            name=out_name,
            shape=shape,
            dtype=dtype,
            inputs=tuple(TensorInput(ref, name) for ref, name, _ in others),
            base=base_in,
            values=values,
            per_model=tuple(per_model),
            seed=self.seed if self.method.random else None,
        ))


# ------------------------------------------------------------------------------------------- checks


def _check_structure(sources: Mapping[str, SourceModel]) -> None:
    items = list(sources.items())
    ref0, first = items[0]
    for key in _STRUCTURE_KEYS:
        values = {ref: s.config.get(key) for ref, s in items}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            what = "architectures" if key in ("model_type", "architectures") else f"config {key}"
            raise ConfigError(f"models differ in {what}: " + ", ".join(f"{r}: {v}" for r, v in values.items()))
    for ref, s in items[1:]:
        if s.layer_prefix != first.layer_prefix and s.layers and first.layers:
            raise ConfigError(f"models name their layers differently: {ref0}: {first.layer_prefix}, {ref}: {s.layer_prefix}")


def _vocabulary(path: Path) -> dict[str, int] | None:
    """token -> id from tokenizer.json (model vocabulary plus added tokens) or vocab.json; None if absent."""
    tj = path / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        vocab = data.get("model", {}).get("vocab")
        out: dict[str, int] = {}
        if isinstance(vocab, dict):
            out.update(vocab)
        elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
            out.update({piece[0]: i for i, piece in enumerate(vocab)})
        for tok in data.get("added_tokens", []):
            out[tok["content"]] = tok["id"]
        return out
    vj = path / "vocab.json"
    if vj.is_file():
        return json.loads(vj.read_text())
    return None


def _check_vocabulary(sources: Mapping[str, SourceModel]) -> None:
    vocabs = {ref: _vocabulary(s.path) for ref, s in sources.items()}
    known = [(ref, v) for ref, v in vocabs.items() if v is not None]
    for ref, vocab in known[1:]:
        ref0, vocab0 = known[0]
        if vocab != vocab0:
            if len(vocab) != len(vocab0):
                raise ConfigError(f"vocabularies differ: {ref0} has {len(vocab0)} tokens, {ref} has {len(vocab)}")
            token = next(t for t in sorted(set(vocab0) | set(vocab)) if vocab0.get(t) != vocab.get(t))
            raise ConfigError(f"vocabularies differ: token {token!r} has id {vocab0.get(token)} in {ref0} and "
                              f"{vocab.get(token)} in {ref}")


def _check_same_names(sources: Mapping[str, SourceModel], sl: _Slice, names: list[str], keep, what: str) -> None:
    want = set(names)
    for ref, _, _ in sl.sources:
        have = {n for n in sources[ref].others if keep(n)}
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ConfigError(f"model {ref} does not have the same {what} tensors as the base/first model: "
                              f"missing {missing[:4]}, extra {extra[:4]}")


# ------------------------------------------------------------------------------------------- output


def _output_config(donor: SourceModel, num_layers: int, layer_types: list[Any], tied: bool, planner: _Planner,
                   recipe: MergeRecipe) -> dict[str, Any]:
    config = json.loads(json.dumps(donor.config))  # deep copy, JSON-clean
    key = donor.layer_count_key
    if key is not None:
        config[key] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = layer_types
    # Always explicit: a missing key falls back to a per-architecture default (False for Llama, True for
    # PretrainedConfig), and a wrong guess either drops the merged head or leaves it randomly initialised.
    config["tie_word_embeddings"] = tied
    dtypes = {t.dtype for t in planner.tensors if t.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(next(iter(dtypes))).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return config


def _tokenizer_dir(recipe: MergeRecipe, donor: SourceModel, base_dir: Path | None) -> Path | None:
    if recipe.tokenizer_source in (None, "base"):
        path = donor.path
    else:
        path = Path(recipe.tokenizer_source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_dir():
            raise ConfigError(f"tokenizer_source {recipe.tokenizer_source}: folder {path} does not exist")
    return path if any((path / f).is_file() for f in TOKENIZER_FILES) else None


def _is_pre(name: str) -> bool:
    return any(marker in name for marker in _PRE_MARKERS)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
