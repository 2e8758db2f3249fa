"""Corpus generation, real-corpus reading, splitting and token batching."""

from forge_models.data.keys import calc_key, canonical_keys
from forge_models.data.stream import TokenSampler, mask_unscored, unscored_spans
from forge_models.data.synthetic import (
    SPLITS,
    Corpus,
    Example,
    build_corpus,
    describe,
    example_split,
    generate_synthetic,
    held_out_keys,
    key_split,
    read_source,
    split_examples,
)

__all__ = [
    "SPLITS",
    "Corpus",
    "Example",
    "TokenSampler",
    "build_corpus",
    "calc_key",
    "canonical_keys",
    "example_split",
    "held_out_keys",
    "key_split",
    "mask_unscored",
    "unscored_spans",
    "describe",
    "generate_synthetic",
    "read_source",
    "split_examples",
]
