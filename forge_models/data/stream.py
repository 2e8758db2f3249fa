"""Training batches: token windows drawn from per-kind streams, a pure function of (seed, step).

Because batch ``step`` depends on nothing but the seed and the step number, a training run resumed
from a checkpoint at step k sees exactly the batches k, k+1, ... the uninterrupted run would have seen.

**Loss masks.** The model is trained on what it must produce, never on what a tool writes: the tokens of
a ``Tool: N`` line (the calculator's output in a tool episode) get label -100 in :meth:`TokenSampler.labels`
and :func:`mask_unscored`, so no phase learns, or is judged on, predicting the calculator.

**Chat.** With ``chat=True`` (a pretrained instruct model whose tokenizer has a chat template) the
answer-checked kinds (arithmetic, tool, system, and the choice kinds persona and narrative) are rendered
exactly as the harness prompts or scores them: the
prompt's ids are :func:`forge_models.generation.prompt_ids` of the prompt (a system example's prompt as
system + user messages, as the harness's tool loop passes it), followed by the reference continuation and
EOS (the template's end of turn). The prompt tokens are not scored (the model is taught its reply, as in
supervised fine-tuning); tool output lines stay unscored. Real text stays plain, because the harness scores
perplexity on plain text.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, Sequence

import torch

from forge_models.config import DATA_KINDS
from forge_models.data.synthetic import Example
from forge_models.runtime import ConfigError
from forge_models.tokenizer import eos_token_id


# A tool's output line: written by the calculator, not by the model, so never in a loss or a success check.
UNSCORED_LINE = re.compile(r"(?m)^Tool:[^\n]*\n?")


def unscored_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` the model does not produce (tool output lines, newline included)."""
    return [m.span() for m in UNSCORED_LINE.finditer(text)]


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < s_end and end > s_start for s_start, s_end in spans)


def mask_unscored(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """``ids`` with every token of a tool output line replaced by -100 (labels for a causal LM loss).

    For rows that start at a document boundary (packed rows: EOS, text, EOS, ...): each row is decoded
    token by token and the tool lines are found in the decoded text. A row cut inside a tool line cannot
    be recognised from its tokens alone; :meth:`TokenSampler.labels` masks such rows exactly.
    """
    table = _token_strings(tokenizer)
    labels = ids.clone()
    for r, row in enumerate(ids.tolist()):
        pieces = [table[t] if 0 <= t < len(table) else "" for t in row]
        text = "".join(pieces)
        spans = unscored_spans(text)
        if not spans:
            continue
        at = 0
        for c, piece in enumerate(pieces):
            if _overlaps(at, at + len(piece), spans):
                labels[r, c] = -100
            at += len(piece)
    return labels


def _token_strings(tokenizer: Any) -> list[str]:
    cached = getattr(tokenizer, "_forge_token_strings", None)
    if cached is None:
        cached = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        try:
            tokenizer._forge_token_strings = cached
        except AttributeError:  # a tokenizer that refuses attributes just decodes again next time
            pass
    return cached


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
        chat: bool = False,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"TokenSampler needs seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
        _check_mix(mix)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.streams, self.scored = _kind_streams(examples, tokenizer, chat)
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
        return self._draw(step)[0]

    def labels(self, step: int) -> torch.Tensor:
        """Labels of batch ``step``: its tokens, with -100 on every token of a tool output line."""
        ids, scored = self._draw(step)
        return ids.masked_fill(~scored, -100)

    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        kind_index = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen)
        offsets = torch.arange(self.seq_len)
        rows, scored = [], []
        for i in kind_index.tolist():
            kind = self.kinds[i]
            stream = self.streams[kind]
            start = int(torch.randint(len(stream), (1,), generator=gen))
            index = (start + offsets) % len(stream)
            rows.append(stream[index])
            scored.append(self.scored[kind][index])
        return torch.stack(rows), torch.stack(scored)


def _check_mix(mix: Mapping[str, float]) -> None:
    unknown = sorted(set(mix) - set(DATA_KINDS))
    if unknown:
        raise ConfigError(f"unknown data kinds {unknown} in the mix; use {list(DATA_KINDS)}")
    if any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
        raise ConfigError(f"mix weights must be >= 0 with at least one > 0, got {dict(mix)}")


def _kind_streams(
    examples: Sequence[Example], tokenizer: Any, chat: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per kind present in ``examples``: one concatenated token stream (each text followed by EOS), and
    a same-length bool stream that is False on tokens of tool output lines (see :func:`unscored_spans`)
    and, with ``chat``, on the chat-formatted prompts of :data:`CHAT_KINDS`."""
    if not examples:
        raise ConfigError("TokenSampler got no examples to sample from")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat-formatted training needs a tokenizer with a chat template")
    eos = eos_token_id(tokenizer)
    by_kind: dict[str, list[str]] = {}
    chats: dict[str, list[Example]] = {}
    for ex in examples:
        if chat and ex.kind in CHAT_KINDS and ex.prompt and ex.text.startswith(ex.prompt):
            chats.setdefault(ex.kind, []).append(ex)
        else:
            by_kind.setdefault(ex.kind, []).append(ex.text)
    streams, scored = {}, {}
    for kind, exs in chats.items():
        flat, keep = [], []
        for ex in exs:
            ids, flags = chat_training_ids(ex, tokenizer)
            flat.extend(ids)
            keep.extend(flags)
        streams[kind] = torch.tensor(flat, dtype=torch.long)
        scored[kind] = torch.tensor(keep, dtype=torch.bool)
    for kind, texts in by_kind.items():
        masked = any(unscored_spans(t) for t in texts)
        enc = tokenizer(texts, add_special_tokens=False, **({"return_offsets_mapping": True} if masked else {}))
        flat: list[int] = []
        keep: list[bool] = []
        for n, doc in enumerate(enc["input_ids"]):
            flat.extend((*doc, eos))
            if masked:
                spans = unscored_spans(texts[n])
                keep.extend(not _overlaps(a, b, spans) for a, b in enc["offset_mapping"][n])
            else:
                keep.extend([True] * len(doc))
            keep.append(True)
        # A chat kind with some prompt-less examples keeps both forms in its one stream.
        streams[kind] = torch.cat([streams.get(kind, torch.empty(0, dtype=torch.long)), torch.tensor(flat, dtype=torch.long)])
        scored[kind] = torch.cat([scored.get(kind, torch.empty(0, dtype=torch.bool)), torch.tensor(keep, dtype=torch.bool)])
    return streams, scored


def trains_in_chat(tokenizer: Any) -> bool:
    """Whether training streams are chat-formatted for this tokenizer: exactly when the harness's generation
    is (the tokenizer has a chat template), so a model is taught in the format it is judged in."""
    return bool(getattr(tokenizer, "chat_template", None))


CHAT_KINDS = ("arithmetic", "tool", "system", "persona", "narrative")
"""Kinds the harness answer-checks by generation or scores as multiple choice on a chat template:
chat-formatted in chat training (see the module docstring)."""


def chat_training_ids(ex: Example, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """One answer-checked example as the harness prompts a chat model, plus its reference reply and EOS.

    Returns the ids and, per id, whether it is scored (False on the prompt and on tool output lines).
    """
    from forge_models.data.system_prompts import prompt_messages
    from forge_models.generation import GenerationConfig, prompt_ids

    prompt = (prompt_messages(ex.prompt) if ex.kind == "system" else None) or ex.prompt
    head = prompt_ids(tokenizer, prompt, GenerationConfig(chat=True))
    reply = ex.text[len(ex.prompt):].strip()
    spans = unscored_spans(reply + "\n")  # a last "Tool:" line ends the reply without its newline
    enc = tokenizer([reply], add_special_tokens=False, return_offsets_mapping=True)
    body = [int(t) for t in enc["input_ids"][0]]
    flags = [not _overlaps(a, b, spans) for a, b in enc["offset_mapping"][0]]
    return head + body + [eos_token_id(tokenizer)], [False] * len(head) + flags + [True]


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed derived from (seed, step); sha256 keeps nearby steps uncorrelated."""
    digest = hashlib.sha256(f"forge-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
