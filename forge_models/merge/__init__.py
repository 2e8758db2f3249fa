"""Model merging (Phase 2's operators): per-tensor merge methods, mergekit-format recipes, streaming merges.

Modules, one concern each:

- ``methods``: the merge arithmetic, pure functions of one tensor position (linear, generalized task
  arithmetic = task arithmetic / TIES / DARE / breadcrumbs / DELLA, SLERP, Model Stock, passthrough);
- ``sparsify``: trimming and dropping of task vectors (magnitude, breadcrumbs, DARE, DELLA) and rescaling;
- ``registry``: the methods by name with their parameter schemas and checks (``METHODS``, ``merge_tensors``);
- ``recipe``: the mergekit YAML format as a frozen pydantic model; gradients and filters;
- ``plan``: recipe + model folders -> every output tensor with its inputs and resolved parameters,
  with every check done before any tensor is read;
- ``safetensors_io``: tensor-at-a-time (and row-range) reading and pre-planned shard writing;
- ``chunked``: row-chunked kernels that merge one tensor with bounded memory, equal to ``methods``;
- ``streaming``: ``merge_models``, the streaming merge to a Hugging Face folder;
- ``dfs``: data-flow-space layer routing (Akiba et al. 2024).

Quick use::

    from forge_models.merge import merge_tensors, merge_models, load_recipe
    merged = merge_tensors("ties", [a, b], base, weight=[1.0, 1.0], density=0.5)
    merge_models(load_recipe("recipe.yaml"), "out/merged")

or from the shell: ``python -m forge_models.merge --config recipe.yaml --out out/merged``.
"""

from forge_models.merge.dfs import DFSRoute, build_dfs_model, dfs_route
from forge_models.merge.plan import MergePlan, build_plan, tensor_generators, tensor_seed
from forge_models.merge.recipe import MergeRecipe, evaluate_setting, load_recipe
from forge_models.merge.registry import METHODS, MergeMethod, get_method, merge_tensors, method_names
from forge_models.merge.streaming import MergeResult, compute_tensor, merge_models, merge_tensor_into

__all__ = [
    "METHODS",
    "MergeMethod",
    "get_method",
    "method_names",
    "merge_tensors",
    "MergeRecipe",
    "load_recipe",
    "evaluate_setting",
    "MergePlan",
    "build_plan",
    "tensor_seed",
    "tensor_generators",
    "MergeResult",
    "merge_models",
    "merge_tensor_into",
    "compute_tensor",
    "DFSRoute",
    "dfs_route",
    "build_dfs_model",
]
