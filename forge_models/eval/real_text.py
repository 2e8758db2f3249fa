"""Perplexity on held-out-only real text, reported per source (never pooled with the synthetic kinds).

Pooled held-out perplexity hides real text: on the tiny preset, templated synthetic examples dominate the
pool, so adding a real corpus barely moves it. Here each source is scored on its own:

- every document is tokenized alone and cut into consecutive windows of at most ``seq_len`` tokens, so a
  window never spans two documents (nor, when sources are split by document, two splits);
- every token but a window's first is predicted from the window before it;
- ``ppl = exp(total NLL / predicted tokens)`` per source, over at most ``ppl_max_tokens`` tokens (documents
  in file order).

A held-out-only source is never trained on; the caller keeps it out of every training mix.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn.functional as F

from forge_models.config import EvalConfig, SourceConfig
from forge_models.runtime import ConfigError, PhaseContext


def document_windows(docs: Sequence[str], tokenizer: Any, seq_len: int, max_tokens: int) -> list[list[int]]:
    """Windows of at most ``seq_len`` tokens, each inside one document, ``max_tokens`` in all."""
    return token_windows((list(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in docs), seq_len, max_tokens)


def token_windows(docs: Iterable[Sequence[int]], seq_len: int, max_tokens: int) -> list[list[int]]:
    """:func:`document_windows` of already tokenized documents (read lazily: only up to ``max_tokens``)."""
    windows: list[list[int]] = []
    total = 0
    for ids in docs:
        ids = list(ids)
        for i in range(0, len(ids), seq_len):
            w = ids[i : i + seq_len][: max_tokens - total]
            if len(w) >= 2:
                windows.append(w)
                total += len(w)
            if total >= max_tokens:
                return windows
    return windows


@torch.no_grad()
def text_perplexity(model: Any, tokenizer: Any, docs: Sequence[str], cfg: EvalConfig, ctx: PhaseContext) -> dict[str, float]:
    """``loss`` (nats/token), ``ppl`` and ``ppl_tokens`` of ``model`` on ``docs`` (see the module docstring)."""
    limit = int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or cfg.seq_len)
    windows = document_windows(docs, tokenizer, min(cfg.seq_len, limit), cfg.ppl_max_tokens)
    if not windows:
        raise ConfigError("the held-out documents yield no window of 2 or more tokens; perplexity is undefined")
    nll = _window_nll(model, windows, ctx.device, ctx.autocast)
    total, count = sum(nll), sum(len(w) - 1 for w in windows)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "ppl_tokens": float(count)}


def _window_nll(model: Any, windows: Sequence[Sequence[int]], device: torch.device,
                autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> list[float]:
    """Summed NLL of each window's tokens but its first, one window per forward pass: no padding, so every
    model sees exactly its unbatched input. The model's train/eval mode is restored afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    out: list[float] = []
    try:
        for w in windows:
            ids = torch.tensor([list(w)], device=device)
            with autocast():
                logits = model(input_ids=ids).logits.float()
            out.append(float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def window_losses(model: Any, tokenizer: Any, docs: Sequence[str], seq_len: int, max_tokens: int,
                  device: torch.device) -> list[float]:
    """Mean NLL (nats/token) of every window of ``docs`` (:func:`document_windows`), one window per forward
    pass in fp32: the unit of a paired before/after interval (the same docs and settings give the same
    windows for any two models with the same tokenizer and position limit)."""
    limit = int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or seq_len)
    windows = document_windows(docs, tokenizer, min(seq_len, limit), max_tokens)
    if not windows:
        raise ConfigError("the held-out documents yield no window of 2 or more tokens; their loss is undefined")
    return [total / (len(w) - 1) for total, w in zip(_window_nll(model, windows, device), windows)]


def source_name(src: SourceConfig) -> str:
    return Path(src.path.removeprefix("file://")).stem


def eval_source_metrics(
    model: Any,
    tokenizer: Any,
    sources: Sequence[SourceConfig],
    cfg: EvalConfig,
    ctx: PhaseContext,
    paths: Sequence[Path] | None = None,
) -> dict[str, float]:
    """``{"<source>/ppl", "<source>/loss", "<source>/ppl_tokens"}`` for every held-out-only source.

    ``paths`` (one per source, same order) replaces the sources' paths with local copies (s3:// sources are
    downloaded by the orchestration layer). The source name is its file stem; two sources with one stem
    are refused, so no metric silently overwrites another.
    """
    from forge_models.data.synthetic import read_source

    if paths is not None and len(paths) != len(sources):
        raise ConfigError(f"eval sources: {len(paths)} local paths for {len(sources)} sources")
    names = [source_name(s) for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval sources share a file name ({names}); rename one so each reports its own perplexity")
    metrics: dict[str, float] = {}
    for i, (name, src) in enumerate(zip(names, sources)):
        docs = [ex.text for ex in read_source(src, paths[i] if paths is not None else None)]
        for key, value in text_perplexity(model, tokenizer, docs, cfg, ctx).items():
            metrics[f"{name}/{key}"] = value
    return metrics
