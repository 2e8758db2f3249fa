"""Training batches: token windows drawn from per-kind streams, a pure function of (seed, step).

Because batch ``step`` depends on nothing but the seed and the step number, a training run resumed
from a checkpoint at step k sees exactly the batches k, k+1, ... the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch

from forge_models.config import DATA_KINDS
from forge_models.data.synthetic import Example
from forge_models.runtime import ConfigError
from forge_models.tokenizer import eos_token_id


class TokenSampler:
    """Samples ``[batch_size, seq_len]`` token batches from examples, mixing kinds by weight.

    Each example's text is tokenized once with EOS appended, and the token lists of one kind are
    concatenated into one stream. A row picks a kind with probability proportional to its mix weight
    (kinds absent from the data are dropped), then a window of ``seq_len`` tokens starting at a uniform
    position of that stream, read circularly: a stream shorter than a window simply repeats, and every
    token is equally likely to be covered.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        mix: Mapping[str, float],
        seq_len: int,
        batch_size: int,
        seed: int,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"TokenSampler needs seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
        _check_mix(mix)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.streams = _kind_streams(examples, tokenizer)
        self.kinds = [k for k in DATA_KINDS if mix.get(k, 0) > 0 and k in self.streams]
        if not self.kinds:
            wanted = sorted(k for k, w in mix.items() if w > 0)
            raise ConfigError(
                f"data mix {wanted} selects no kind present in the data; kinds present: {sorted(self.streams)}"
            )
        self.weights = torch.tensor([float(mix[k]) for k in self.kinds], dtype=torch.float64)

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch (batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    def batch(self, step: int) -> torch.Tensor:
        """The batch of training step ``step``: a CPU LongTensor ``[batch_size, seq_len]``."""
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        kind_index = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen)
        offsets = torch.arange(self.seq_len)
        rows = []
        for i in kind_index.tolist():
            stream = self.streams[self.kinds[i]]
            start = int(torch.randint(len(stream), (1,), generator=gen))
            rows.append(stream[(start + offsets) % len(stream)])
        return torch.stack(rows)


def _check_mix(mix: Mapping[str, float]) -> None:
    unknown = sorted(set(mix) - set(DATA_KINDS))
    if unknown:
        raise ConfigError(f"unknown data kinds {unknown} in the mix; use {list(DATA_KINDS)}")
    if any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
        raise ConfigError(f"mix weights must be >= 0 with at least one > 0, got {dict(mix)}")


def _kind_streams(examples: Sequence[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
    """One concatenated token stream (each text followed by EOS) per kind present in ``examples``."""
    if not examples:
        raise ConfigError("TokenSampler got no examples to sample from")
    eos = eos_token_id(tokenizer)
    by_kind: dict[str, list[str]] = {}
    for ex in examples:
        by_kind.setdefault(ex.kind, []).append(ex.text)
    streams = {}
    for kind, texts in by_kind.items():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        flat = [t for doc in ids for t in (*doc, eos)]
        streams[kind] = torch.tensor(flat, dtype=torch.long)
    return streams


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed derived from (seed, step); sha256 keeps nearby steps uncorrelated."""
    digest = hashlib.sha256(f"forge-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
