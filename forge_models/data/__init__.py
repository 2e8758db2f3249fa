"""Corpus generation, real-corpus reading, splitting and token batching."""

from forge_models.data.keys import calc_key, canonical_keys
from forge_models.data.stream import TokenSampler, mask_unscored, unscored_spans
from forge_models.data.synthetic import (
    SPLITS,
    Corpus,
    Example,
    build_corpus,
    chunk_text,
    describe,
    eval_source_units,
    eval_unit_split,
    example_split,
    generate_synthetic,
    held_out_keys,
    key_split,
    is_eval_unit,
    read_source,
    split_examples,
    without_eval_units,
)

__all__ = [
    "SPLITS",
    "Corpus",
    "Example",
    "TokenSampler",
    "build_corpus",
    "chunk_text",
    "eval_source_units",
    "eval_unit_split",
    "is_eval_unit",
    "without_eval_units",
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
