"""Streaming merge: one output tensor at a time from safetensors on disk to shards on disk.

    from forge_models.merge import load_recipe, merge_models
    merge_models(load_recipe("recipe.yaml"), "out/merged", seed=0)

Order of work: plan (every check, no tensor data) -> for each output tensor: read its inputs, merge in
float32, cast, append to its shard -> ``config.json``, tokenizer files, ``mergekit_config.yml`` -> shards
renamed -> ``model.safetensors.index.json`` written last. A folder without the index is incomplete.

Memory: the live tensors are the inputs of one output tensor (N models' copies of one weight, upcast to
float32) plus the method's temporaries (a few more of the same size); nothing is cached between tensors
and shards are never held in memory. Peak memory therefore grows with the largest tensor times the
number of models, not with model size.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forge_models.merge.plan import TOKENIZER_FILES, MergePlan, PlannedTensor, TensorInput, build_plan
from forge_models.merge.recipe import MergeRecipe, load_recipe
from forge_models.merge.safetensors_io import ShardWriter, TensorReader
from forge_models.runtime import ConfigError, ForgeError, NullTracker, Tracker

__all__ = ["MergeResult", "merge_models", "compute_tensor", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 5 * 1000**3
"""mergekit's and Hugging Face's default shard size; memory does not depend on it here."""
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote and how long it took (all measured)."""

    out_dir: Path
    method: str
    num_tensors: int
    num_layers: int
    bytes_read: int
    bytes_written: int
    seconds: float
    files: tuple[str, ...]


def merge_models(
    recipe: MergeRecipe | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    base_dir: str | Path | None = None,
    tracker: Tracker | None = None,
) -> MergeResult:
    """Merge the recipe's models into a Hugging Face model folder ``out_dir``.

    Args:
        recipe: a :class:`MergeRecipe` or the path of a recipe YAML.
        out_dir: output folder; must not exist or be empty (see ``overwrite``).
        seed: seed of the random methods (DARE, DELLA); each tensor draws from its own generator seeded
            by ``tensor_seed(seed, name)``, so results do not depend on the order of work.
        max_shard_bytes: split the weights into shards of at most this size.
        overwrite: replace an existing model folder (one holding config.json or weights) at ``out_dir``.
        base_dir: resolve relative model paths against this folder (default: the working directory,
            as mergekit does).
        tracker: receives ``progress(done, total, tensor name)``.

    Raises:
        ConfigError: the recipe, the models or ``out_dir`` are unusable (raised before any tensor is read).
        ForgeError: a merged tensor came out NaN or infinite (no index is written).
    """
    if not isinstance(recipe, MergeRecipe):
        recipe = load_recipe(recipe)
    plan = build_plan(recipe, seed=seed, base_dir=base_dir)
    out = Path(out_dir)
    _prepare_out_dir(out, plan, overwrite)
    tracker = tracker or NullTracker()

    start = time.perf_counter()
    writer = ShardWriter(out, [(t.name, t.shape, t.dtype) for t in plan.tensors], max_shard_bytes)
    try:
        with TensorReader() as reader:
            for done, planned in enumerate(plan.tensors, start=1):
                merged = compute_tensor(plan, planned, reader)
                writer.write(planned.name, merged)
                del merged
                tracker.progress(done, len(plan.tensors), planned.name)
            bytes_read = reader.bytes_read
        (out / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        if plan.tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (plan.tokenizer_dir / name).is_file():
                    shutil.copyfile(plan.tokenizer_dir / name, out / name)
        (out / "mergekit_config.yml").write_text(f"# merged by forge_models.merge with seed {seed}\n" + recipe.to_yaml())
        writer.finalize()  # renames the shards and writes the index: last, so a complete folder has one
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    return MergeResult(
        out_dir=out,
        method=recipe.merge_method,
        num_tensors=len(plan.tensors),
        num_layers=plan.num_layers,
        bytes_read=bytes_read,
        bytes_written=writer.bytes_written,
        seconds=seconds,
        files=tuple(sorted(p.name for p in out.iterdir())),
    )


def compute_tensor(plan: MergePlan, planned: PlannedTensor, reader: TensorReader) -> torch.Tensor:
    """Read one output tensor's inputs, merge them, return the result in the planned dtype."""
    if planned.copy:
        return _read(plan, reader, planned.inputs[0], cast=False)
    base = _read(plan, reader, planned.base) if planned.base is not None else None
    tensors = [_read(plan, reader, one) for one in planned.inputs]
    generator = torch.Generator().manual_seed(planned.seed) if planned.seed is not None else None
    merged = plan.method.apply(tensors, base, planned.values, planned.per_model, generator)
    del base, tensors
    if not bool(torch.isfinite(merged).all()):
        raise ForgeError(f"{planned.name}: the merge produced NaN or infinite values (check the inputs for "
                         f"non-finite weights and the recipe's weights / lambda); nothing was finalised")
    return merged.to(planned.dtype).contiguous()


def _read(plan: MergePlan, reader: TensorReader, which: TensorInput, cast: bool = True) -> torch.Tensor:
    x = reader.read(plan.sources[which.source].tensors[which.name])
    if not cast or not x.is_floating_point():
        return x
    if plan.input_dtype is not None and x.dtype != plan.input_dtype:
        x = x.to(plan.input_dtype)  # mergekit rounds every input to the recipe's dtype first
    # Arithmetic in float32 (float64 stays float64): bf16/fp16 sums and sorts lose too much, and CPU
    # lacks some half-precision kernels. mergekit computes in the input dtype instead.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prepare_out_dir(out: Path, plan: MergePlan, overwrite: bool) -> None:
    resolved = out.resolve()
    for ref, source in plan.sources.items():
        src = source.path.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ConfigError(f"output folder {out} overlaps the input model {ref} ({src})")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder")
        entries = list(out.iterdir())
        if entries:
            is_model = any((out / f).exists() for f in _MODEL_FILES) or any(out.glob("model-*.safetensors*"))
            if not overwrite:
                raise ConfigError(f"output folder {out} is not empty; pass overwrite=True to replace a model folder")
            if not is_model:
                raise ConfigError(f"output folder {out} is not empty and holds no model; refusing to delete it")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
