"""Corpus generation, real-corpus reading, splitting and token batching."""

from forge_models.data.stream import TokenSampler
from forge_models.data.synthetic import (
    SPLITS,
    Corpus,
    Example,
    build_corpus,
    describe,
    generate_synthetic,
    read_source,
    split_examples,
)

__all__ = [
    "SPLITS",
    "Corpus",
    "Example",
    "TokenSampler",
    "build_corpus",
    "describe",
    "generate_synthetic",
    "read_source",
    "split_examples",
]
