"""The one evaluation harness every phase runs before and after itself.

It works on any Hugging Face-style causal LM: something called as ``model(input_ids=...,
attention_mask=...)`` that returns an object with ``.logits`` of shape ``[batch, length, vocab]``.
Generation goes through :mod:`forge_models.generation` (KV cache where the model has one, full recompute
otherwise, so models without one such as Cognate work too; chat template when the tokenizer has one).
The model must already be on ``ctx.device``; inputs are put there.

Metrics (all measured on the given held-out examples, deterministic):

- ``loss`` / ``ppl`` / ``ppl_tokens``: mean next-token cross-entropy (nats/token) over held-out text.
- ``arith_em``: exact match of the final number of a greedy worked answer (arithmetic examples).
- ``tool_valid`` / ``tool_correct``: the greedy reply contains a parseable calculator call / one whose
  value equals the expected answer (tool examples).
- ``choice_acc`` (and ``persona_acc`` / ``narrative_acc``): multiple choice by summed log-likelihood of
  each choice given the prompt (persona and narrative examples).
- ``n_arith`` / ``n_tool`` / ``n_choice``: how many examples each task used. A task with no examples
  reports its count as 0 and omits its score (a missing task is not a score of zero).
- ``<accuracy>_lo`` / ``<accuracy>_hi``: the seeded 95% bootstrap interval of every accuracy
  (:mod:`forge_models.eval.stats`). Pass an ``outcomes`` dict to get the per-example 0/1 vectors too, for
  paired differences between two models on the same examples (:func:`forge_models.eval.paired_metrics`).

Perplexity skips the tokens of tool output lines (``Tool: N``): they are the calculator's, not the model's
(the same mask training uses, :func:`forge_models.data.stream.unscored_spans`).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from forge_models.config import EvalConfig
from forge_models.data.stream import unscored_spans
from forge_models.data.synthetic import Example
from forge_models.eval.stats import bootstrap_interval
from forge_models.generation import GenerationConfig, generate
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tokenizer import eos_token_id

# Generation stops: an arithmetic answer is one line; a tool reply ends with its call.
ARITH_STOPS = ("\n",)
TOOL_STOPS = ("</tool>", "\n")

# Longest calculator expression the safe evaluator accepts (bounds the work an input can cause).
MAX_EXPRESSION_CHARS = 200

_ANSWER_RE = re.compile(r"[Tt]he answer is\s+(-?\d+(?:\.\d+)?)")
_TOOL_RE = re.compile(r"<tool>\s*calculator\((.*?)\)\s*</tool>")


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: EvalConfig,
    ctx: PhaseContext,
    outcomes: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """All harness metrics of ``model`` on ``examples`` (a held-out split); see the module docstring.

    ``outcomes``, when given, receives each accuracy's per-example 0/1 vector (same example order for
    every model evaluated with the same examples and config, so two of them can be compared pairwise).
    """
    if not examples:
        raise ConfigError("evaluate() got no examples; pass a non-empty held-out split")
    metrics: dict[str, float] = {}
    vectors: dict[str, list[float]] = {}
    with _eval_mode(model), torch.no_grad():
        metrics.update(_perplexity(model, tokenizer, examples, cfg, ctx))
        metrics.update(_arithmetic(model, tokenizer, examples, cfg, ctx, vectors))
        metrics.update(_tool_use(model, tokenizer, examples, cfg, ctx, vectors))
        metrics.update(_multiple_choice(model, tokenizer, examples, cfg, ctx, vectors))
    for name, values in vectors.items():
        low, high = bootstrap_interval(values, cfg.bootstrap_samples, cfg.bootstrap_seed)
        metrics[f"{name}_lo"], metrics[f"{name}_hi"] = low, high
    if outcomes is not None:
        outcomes.update(vectors)
    return metrics


class _eval_mode:
    """Put a module in eval mode and restore its previous mode afterwards (a phase may be mid-training)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# ------------------------------------------------------------------------------------------ helpers


def _max_positions(model: Any, fallback: int) -> int:
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or fallback)


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, ctx: PhaseContext) -> torch.Tensor:
    """fp32 logits ``[batch, length, vocab]``; the forward pass runs under the context's autocast."""
    with ctx.autocast():
        out = model(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device))
    return out.logits.float()


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _start_token(tokenizer: Any) -> int:
    """The token a prompt is conditioned on first: BOS if the tokenizer has one, else EOS.

    Our training streams put EOS before every document, so a prompt after it is in-distribution.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else eos_token_id(tokenizer)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def _batched(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _pad_right(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask; causal models never attend to the later padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_stream(texts: Iterable[str], tokenizer: Any, limit: int) -> list[int]:
    """Texts tokenized, each followed by EOS, concatenated and cut at ``limit`` tokens."""
    return _scored_stream(texts, tokenizer, limit)[0]


def _scored_stream(texts: Iterable[str], tokenizer: Any, limit: int) -> tuple[list[int], list[bool]]:
    """:func:`_token_stream` plus, per token, whether it is scored (False on tool output lines)."""
    eos = eos_token_id(tokenizer)
    stream: list[int] = []
    scored: list[bool] = []
    for chunk in _batched(list(texts), 256):  # tokenize lazily: only as many texts as the limit needs
        masked = any(unscored_spans(t) for t in chunk)
        enc = tokenizer(list(chunk), add_special_tokens=False, **({"return_offsets_mapping": True} if masked else {}))
        for n, ids in enumerate(enc["input_ids"]):
            stream.extend(ids)
            stream.append(eos)
            spans = unscored_spans(chunk[n]) if masked else []
            offsets = enc["offset_mapping"][n] if masked else [(0, 0)] * len(ids)
            scored.extend(not any(a < e and b > s for s, e in spans) for a, b in offsets)
            scored.append(True)
        if len(stream) >= limit:
            break
    return stream[:limit], scored[:limit]


# --------------------------------------------------------------------------------------- perplexity


def _perplexity(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext
) -> dict[str, float]:
    """Cross-entropy over non-overlapping windows of the held-out stream (each window's first token unscored,
    and every token of a tool output line)."""
    stream, scored = _scored_stream((ex.text for ex in examples), tokenizer, cfg.ppl_max_tokens)
    window = min(cfg.seq_len, _max_positions(model, cfg.seq_len))
    starts = [i for i in range(0, len(stream), window) if len(stream[i : i + window]) >= 2]
    windows = [(stream[i : i + window], scored[i : i + window]) for i in starts]
    total, count = 0.0, 0
    for chunk in _batched(windows, cfg.batch_size):
        rows = [w for w, _ in chunk]
        ids, mask = _pad_right(rows, _pad_id(tokenizer))
        keep, _ = _pad_right([[int(k) for k in flags] for _, flags in chunk], 0)
        logits = _logits(model, ids, mask, ctx)
        drop = (mask[:, 1:] == 0) | (keep[:, 1:] == 0)
        targets = ids[:, 1:].masked_fill(drop, -100).to(logits.device)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((targets != -100).sum())
    if count == 0:
        raise ConfigError("held-out examples yield fewer than 2 tokens; perplexity is undefined")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "ppl_tokens": float(count)}


def unigram_loss(
    train: Sequence[Example], held_out: Sequence[Example], tokenizer: Any, max_tokens: int
) -> float:
    """Held-out cross-entropy (nats/token) under add-one-smoothed unigram frequencies of the train tokens.

    The context-free baseline a trained LM must clearly beat. Both sides are tokenized like the
    perplexity stream (each text followed by EOS); the held-out side is cut at ``max_tokens``.
    """
    if not train or not held_out:
        raise ConfigError("unigram_loss needs non-empty train and held-out examples")
    train_ids = np.asarray(_token_stream((ex.text for ex in train), tokenizer, limit=2**62), dtype=np.int64)
    held, scored = _scored_stream((ex.text for ex in held_out), tokenizer, limit=max_tokens)
    held_ids = np.asarray(held, dtype=np.int64)
    vocab = max(len(tokenizer), int(train_ids.max()) + 1, int(held_ids.max()) + 1)
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64)
    log_probs = np.log(counts + 1.0) - math.log(len(train_ids) + vocab)
    # The same tokens the harness' perplexity scores (a window's first token aside): not tool output.
    return float(-log_probs[held_ids[np.asarray(scored, dtype=bool)]].mean())


# --------------------------------------------------------------------------------------- generation


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    ctx: PhaseContext,
    *,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    max_positions: int | None = None,
) -> list[str]:
    """Greedy continuation of each prompt (the generated text only, special tokens dropped).

    A thin call of :func:`forge_models.generation.generate`, the project's one generator: a prompt is
    chat-formatted (user role) when the tokenizer has a chat template, else conditioned on BOS (else EOS);
    the KV cache is used where the model has one; prompts of different lengths are left-padded. A
    continuation ends at EOS, after ``max_new_tokens`` tokens, or right after the first ``stop`` string
    (kept). Prompts are truncated from the left so prompt + continuation fit ``max_positions`` (default:
    the model config's ``max_position_embeddings``).
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(stop), batch_size=batch_size)
    return [g.text for g in generate(model, tokenizer, prompts, cfg, ctx, max_positions=max_positions)]


def _context(tokenizer: Any, prompt_ids: list[int], max_len: int) -> list[int]:
    """Start token + the last ``max_len - 1`` prompt tokens (the end of a prompt matters most)."""
    keep = max(0, max_len - 1)
    return [_start_token(tokenizer)] + (prompt_ids[-keep:] if keep else [])


# ------------------------------------------------------------------------------ answer-checked tasks


def extract_answer(text: str) -> str | None:
    """The number after the first "The answer is" ("The answer is 11." -> "11"), else None."""
    match = _ANSWER_RE.search(text)
    return match.group(1) if match else None


def parse_tool_call(text: str) -> tuple[str, float | None] | None:
    """The first ``<tool>calculator(EXPR)</tool>`` in ``text`` as (EXPR, value).

    Returns None when there is no call or EXPR is not plain arithmetic (numbers, + - * /, parentheses);
    the value is None when a well-formed EXPR cannot be evaluated (division by zero, overflow).
    EXPR is never passed to eval(): a whitelist walk of its syntax tree computes it.
    """
    match = _TOOL_RE.search(text)
    if not match:
        return None
    expr = match.group(1).strip()
    if not expr or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None
    if not _is_arithmetic(tree.body):
        return None
    try:
        value = float(_evaluate_node(tree.body))
    except (ZeroDivisionError, OverflowError):
        return expr, None
    return expr, value if math.isfinite(value) else None


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _is_arithmetic(node: ast.AST) -> bool:
    """True if the tree holds only int/float literals, + - * / and unary +/- (names, calls, ... are not)."""
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float)  # bool is an int subclass; type() excludes it
    if isinstance(node, ast.BinOp):
        return type(node.op) in _BINARY and _is_arithmetic(node.left) and _is_arithmetic(node.right)
    if isinstance(node, ast.UnaryOp):
        return type(node.op) in _UNARY and _is_arithmetic(node.operand)
    return False


def _evaluate_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate_node(node.left), _evaluate_node(node.right))
    assert isinstance(node, ast.UnaryOp)  # _is_arithmetic admitted nothing else
    return _UNARY[type(node.op)](_evaluate_node(node.operand))


def _same_number(value: float | None, answer: str) -> bool:
    try:
        expected = float(answer)
    except ValueError:
        return False
    return value is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9)


def _arithmetic(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext,
    vectors: dict[str, list[float]],
) -> dict[str, float]:
    tasks = [ex for ex in examples if ex.kind == "arithmetic" and ex.prompt and ex.answer][: cfg.max_examples]
    metrics = {"n_arith": float(len(tasks))}
    if tasks:
        replies = _generate(model, tokenizer, tasks, cfg, ctx, ARITH_STOPS)
        metrics["arith_em"] = _record(vectors, "arith_em", (extract_answer(r) == ex.answer for r, ex in zip(replies, tasks)))
    return metrics


def _tool_use(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext,
    vectors: dict[str, list[float]],
) -> dict[str, float]:
    tasks = [ex for ex in examples if ex.kind == "tool" and ex.prompt and ex.answer][: cfg.max_examples]
    metrics = {"n_tool": float(len(tasks))}
    if tasks:
        calls = [parse_tool_call(r) for r in _generate(model, tokenizer, tasks, cfg, ctx, TOOL_STOPS)]
        metrics["tool_valid"] = _record(vectors, "tool_valid", (c is not None for c in calls))
        metrics["tool_correct"] = _record(
            vectors, "tool_correct", (c is not None and _same_number(c[1], ex.answer) for c, ex in zip(calls, tasks))
        )
    return metrics


def _record(vectors: dict[str, list[float]], name: str, flags: Iterable[bool]) -> float:
    """Keep the per-example outcomes of ``name`` (for intervals) and return their mean."""
    vectors[name] = [float(f) for f in flags]
    return _mean(vectors[name])


def _generate(
    model: Any, tokenizer: Any, tasks: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext, stop: Sequence[str]
) -> list[str]:
    return greedy_generate(
        model,
        tokenizer,
        [ex.prompt for ex in tasks],
        cfg.max_new_tokens,
        ctx,
        stop=stop,
        batch_size=cfg.batch_size,
        max_positions=_max_positions(model, cfg.seq_len),
    )


def _mean(flags: Iterable[bool]) -> float:
    values = [float(f) for f in flags]
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------- multiple choice


def _multiple_choice(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext,
    vectors: dict[str, list[float]],
) -> dict[str, float]:
    tasks = [ex for ex in examples if ex.choices and 0 <= ex.label < len(ex.choices)][: cfg.max_examples]
    metrics = {"n_choice": float(len(tasks))}
    if not tasks:
        return metrics
    picks = [_argmax_first(s) for s in choice_scores(model, tokenizer, tasks, cfg, ctx)]
    metrics["choice_acc"] = _record(vectors, "choice_acc", (p == ex.label for p, ex in zip(picks, tasks)))
    for kind in ("persona", "narrative"):
        hits = [p == ex.label for p, ex in zip(picks, tasks) if ex.kind == kind]
        if hits:
            metrics[f"{kind}_acc"] = _record(vectors, f"{kind}_acc", hits)
    return metrics


def _argmax_first(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the lowest index."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def choice_scores(
    model: Any, tokenizer: Any, tasks: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext
) -> list[list[float]]:
    """Per example, the summed log-probability of each choice's tokens given the prompt.

    Prompt and choice are tokenized separately and concatenated, so each choice is scored on the same
    tokens whatever the prompt; the prompt is truncated from the left to fit the model.
    """
    limit = _max_positions(model, cfg.seq_len)
    sequences: list[tuple[list[int], int]] = []  # (tokens, number of trailing choice tokens)
    for ex in tasks:
        prompt_ids = _encode(tokenizer, [ex.prompt])[0]
        for choice_ids in _encode(tokenizer, list(ex.choices)):
            if not choice_ids or len(choice_ids) >= limit:
                raise ConfigError(
                    f"choice {ex.choices!r} of a {ex.kind} example has {len(choice_ids)} tokens; "
                    f"it must have 1 to {limit - 1} (the model's max positions - 1)"
                )
            context = _context(tokenizer, prompt_ids, limit - len(choice_ids))
            sequences.append((context + choice_ids, len(choice_ids)))
    flat: list[float] = []
    with _eval_mode(model), torch.no_grad():
        for rows in _batched(sequences, cfg.batch_size):
            flat.extend(_score_tails(model, tokenizer, rows, ctx))
    scores, at = [], 0
    for ex in tasks:
        scores.append(flat[at : at + len(ex.choices)])
        at += len(ex.choices)
    return scores


def _score_tails(
    model: Any, tokenizer: Any, rows: Sequence[tuple[list[int], int]], ctx: PhaseContext
) -> list[float]:
    """Summed log-probability of the last ``n`` tokens of each row, given the tokens before them."""
    ids, mask = _pad_right([tokens for tokens, _ in rows], _pad_id(tokenizer))
    logits = _logits(model, ids, mask, ctx)
    scores = []
    for i, (tokens, n) in enumerate(rows):
        positions = torch.arange(len(tokens) - n, len(tokens))
        # The token at position p is predicted by the logits at position p - 1; normalising only those
        # rows keeps memory at n x vocab instead of length x vocab.
        log_probs = torch.log_softmax(logits[i, positions - 1], dim=-1)
        targets = ids[i, positions].to(log_probs.device)
        scores.append(float(log_probs.gather(1, targets[:, None]).sum()))
    return scores
