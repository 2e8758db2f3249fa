"""Streaming merge: one output tensor at a time from safetensors on disk to shards on disk.

    from forge_models.merge import load_recipe, merge_models
    merge_models(load_recipe("recipe.yaml"), "out/merged", seed=0)

Order of work: plan (every check, no tensor data) -> for each output tensor: read its inputs, merge in
float32, cast, append to its shard -> ``config.json``, tokenizer files, ``mergekit_config.yml`` -> shards
renamed -> ``model.safetensors.index.json`` written last. A folder without the index is incomplete.

Memory: a tensor is merged in row chunks of ``chunk_bytes`` (``forge_models.merge.chunked``): the live
data are the N inputs' rows of one chunk plus the method's temporaries; TIES / breadcrumbs also hold one
model's |delta| of the current tensor while finding its thresholds. Task-vector methods with a
norm-matching rescale (no chunked kernel) hold the N inputs of one whole tensor. Nothing is cached between
tensors and shards are never held in memory, so peak memory does not grow with model size.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forge_models.merge import chunked
from forge_models.merge.plan import TOKENIZER_FILES, MergePlan, PlannedTensor, TensorInput, build_plan, tensor_generators
from forge_models.merge.recipe import MergeRecipe, load_recipe
from forge_models.merge.safetensors_io import ShardWriter, TensorReader
from forge_models.runtime import ConfigError, ForgeError, NullTracker, Tracker

__all__ = ["MergeResult", "merge_models", "merge_tensor_into", "compute_tensor", "DEFAULT_SHARD_BYTES"]

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
    input_bytes: int  # bytes of the source tensors merged, each counted once
    bytes_read: int  # bytes actually read (TIES / breadcrumbs / two-pass methods read some inputs twice)
    bytes_written: int
    seconds: float
    files: tuple[str, ...]


def merge_models(
    recipe: MergeRecipe | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_bytes: int = chunked.DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    base_dir: str | Path | None = None,
    tracker: Tracker | None = None,
) -> MergeResult:
    """Merge the recipe's models into a Hugging Face model folder ``out_dir``.

    Args:
        recipe: a :class:`MergeRecipe` or the path of a recipe YAML.
        out_dir: output folder; must not exist or be empty (see ``overwrite``).
        seed: seed of the random methods (DARE, DELLA); each tensor and input model draws from its own
            generator (``tensor_generators(seed, name, n)``), so results depend neither on the order of
            work nor on chunking.
        max_shard_bytes: split the weights into shards of at most this size (memory does not depend on it).
        chunk_bytes: merge tensors in row chunks of about this many working bytes per input (results do
            not depend on it, except slerp's float64 sums in the last bits).
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
                merge_tensor_into(plan, planned, reader, writer, chunk_bytes)
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
        input_bytes=plan.bytes_to_read,
        bytes_read=bytes_read,
        bytes_written=writer.bytes_written,
        seconds=seconds,
        files=tuple(sorted(p.name for p in out.iterdir())),
    )


def merge_tensor_into(plan: MergePlan, planned: PlannedTensor, reader: TensorReader, writer: ShardWriter,
                      chunk_bytes: int = chunked.DEFAULT_CHUNK_BYTES) -> None:
    """Merge one output tensor and append it to ``writer``: in row chunks when the method has a chunked
    kernel, else as a whole with the reference function (:func:`compute_tensor`)."""
    generators = _generators(planned)
    kernel = None
    if not planned.copy and planned.shape:
        kernel = chunked.kernel_for(plan.method, planned.values, planned.per_model, generators)
    ranges: list[tuple[int, int]] = []
    if kernel is not None:
        wide = any(plan.sources[i.source].tensors[i.name].dtype == torch.float64 for i in planned.all_inputs())
        ranges = chunked.row_ranges(planned.shape, chunk_bytes, 8 if wide else 4,
                                    whole=kernel.whole_1d and len(planned.shape) == 1)
    if kernel is None or (len(ranges) == 1 and getattr(kernel, "reference_when_whole", False)):
        writer.write(planned.name, compute_tensor(plan, planned, reader))
        return
    inputs = list(planned.inputs)

    def read(index: int, start: int, stop: int) -> torch.Tensor:
        which = planned.base if index < 0 else inputs[index]
        return _cast(plan, reader.read_rows(plan.sources[which.source].tensors[which.name], start, stop))

    kernel.prepare(read, ranges)
    for start, stop in ranges:
        rows = kernel.rows(read, start, stop)
        _check_finite(planned, rows)
        writer.write_rows(planned.name, rows.to(planned.dtype).contiguous())
        del rows


def compute_tensor(plan: MergePlan, planned: PlannedTensor, reader: TensorReader) -> torch.Tensor:
    """Read one output tensor's inputs whole, merge them with the method's reference function, return the
    result in the planned dtype."""
    if planned.copy:
        return _read(plan, reader, planned.inputs[0], cast=False)
    base = _read(plan, reader, planned.base) if planned.base is not None else None
    tensors = [_read(plan, reader, one) for one in planned.inputs]
    merged = plan.method.apply(tensors, base, planned.values, planned.per_model, _generators(planned))
    del base, tensors
    _check_finite(planned, merged)
    return merged.to(planned.dtype).contiguous()


def _generators(planned: PlannedTensor) -> list[torch.Generator] | None:
    if planned.seed is None:
        return None
    return tensor_generators(planned.seed, planned.name, len(planned.inputs))


def _check_finite(planned: PlannedTensor, merged: torch.Tensor) -> None:
    if not bool(torch.isfinite(merged).all()):
        raise ForgeError(f"{planned.name}: the merge produced NaN or infinite values (check the inputs for "
                         f"non-finite weights and the recipe's weights / lambda); nothing was finalised")


def _read(plan: MergePlan, reader: TensorReader, which: TensorInput, cast: bool = True) -> torch.Tensor:
    x = reader.read(plan.sources[which.source].tensors[which.name])
    if not cast:
        return x
    return _cast(plan, x)


def _cast(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
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
