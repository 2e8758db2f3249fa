"""Tokenizers: a byte-level BPE trained on the corpus, or a pretrained one loaded from a local folder.

The trained BPE is lossless (every byte is in the alphabet and nothing is normalised), so
``decode(encode(text)) == text`` exactly, and its special ids are fixed: ``<|endoftext|>`` = 0 (used as
BOS and EOS) and ``<|pad|>`` = 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from forge_models.config import TokenizerConfig
from forge_models.runtime import ConfigError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # order fixes their ids: 0 and 1

# Files one of which a Hugging Face tokenizer folder must hold for AutoTokenizer to load it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (fewer if the texts allow no more merges)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"BPE vocab_size {vocab_size} is below the 256 byte tokens + {len(SPECIAL_TOKENS)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    # No prefix space and no normalizer: the byte-level round trip stays exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    corpus = [t for t in texts if t]
    if not corpus:
        raise ConfigError("cannot train a BPE tokenizer: no non-empty training texts")
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Cleaning up spaces (" ." -> ".") would break the exact round trip.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (no network); its pad token falls back to EOS if unset."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"tokenizer folder {folder} holds no tokenizer (expected one of {list(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise ConfigError(f"cannot load the tokenizer in {folder}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer in {folder} has neither a pad nor an eos token; add one and save it")
        # Padding positions are always masked out, so reusing EOS as pad changes no result.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """The tokenizer ``cfg`` asks for: a BPE trained on ``train_texts``, or the one at ``cfg.path``."""
    if cfg.kind == "bpe":
        return train_bpe(train_texts, cfg.vocab_size)
    if not cfg.path:
        raise ConfigError("tokenizer.kind 'pretrained' needs tokenizer.path (a local tokenizer folder)")
    return load_tokenizer(cfg.path)


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id; ConfigError if it has none (documents are separated by EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos token; documents need a separator")
    return int(eos)
