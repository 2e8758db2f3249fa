"""Seeds of the random merge methods (DARE, DELLA): one generator per input model and output tensor.

Its own module so that both the per-tensor entry point (``registry.merge_tensors``) and the planner
(``plan``) use it without importing each other.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["tensor_generators", "tensor_seed"]


def tensor_seed(seed: int, tensor_name: str, model_index: int = 0) -> int:
    """The generator seed of one input model's mask for one output tensor: stable across runs and
    processes, independent of the order of work and of chunking."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_generators(seed: int, tensor_name: str, n: int) -> list[torch.Generator]:
    """One seeded generator per input model (besides the base) for the random methods (DARE, DELLA)."""
    return [torch.Generator().manual_seed(tensor_seed(seed, tensor_name, i)) for i in range(n)]
