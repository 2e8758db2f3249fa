"""The one evaluation harness every phase runs before and after itself.

It works on any Hugging Face-style causal LM: something called as ``model(input_ids=...,
attention_mask=...)`` that returns an object with ``.logits`` of shape ``[batch, length, vocab]``.
Generation goes through :mod:`forge_models.generation` (KV cache where the model has one, full recompute
otherwise, so models without one such as Cognate work too; chat template when the tokenizer has one).
The model must already be on ``ctx.device``; inputs are put there.

Metrics (all measured on the given held-out examples, deterministic):

- ``loss`` / ``ppl`` / ``ppl_tokens``: mean next-token cross-entropy (nats/token) over held-out text,
  pooled over every example but eval-source units (so adding an eval source never moves it).
- ``loss_<kind>`` / ``ppl_<kind>`` / ``ppl_tokens_<kind>``: the same pass's scored tokens, split by the kind
  of the example each target token belongs to (its token-weighted mean is the pooled loss); reported for
  every kind with scored tokens. Pooled alone hides real text under the templated synthetic kinds.
- ``loss_src_<name>`` / ``ppl_src_<name>`` / ``ppl_tokens_src_<name>``: each held-out-only eval source
  (``data.eval_sources``) on its own, windows never spanning two of its units, at most ``ppl_max_tokens``
  tokens per source (:mod:`forge_models.eval.real_text`).
- ``arith_em``: exact match of the final number of a greedy worked answer (arithmetic examples).
- ``tool_valid`` / ``tool_correct``: the greedy reply contains a parseable calculator call / one whose
  value equals the expected answer (tool examples; read from the first step of the tool loop, cut where
  the reply's line ends).
- Through the tool loop (:mod:`forge_models.tools`: the call is run, its result fed back, the model goes
  on to a final answer; at most ``MAX_TOOL_CALLS`` calls), over every episode whose reference reply calls
  a tool (tool examples and system examples needing an offered tool; ``n_tool_loop``):
  ``tool_call_valid`` (at least one call, every call names an offered tool with arguments its parser
  accepts), ``tool_success`` (at least one call, every call ran without error) and
  ``tool_answer_correct`` (the final answer's "the answer is N" equals the expected number).
- System-prompt dialogues (kind ``system``, ``n_system``; on a chat template the system prompt goes in
  its system slot): ``persona_rule_adherence`` (the final reply obeys every rule of the prompt's persona,
  :func:`forge_models.data.system_prompts.obeys_persona`; ``n_persona`` episodes with a persona),
  ``system_tool_policy`` (the tools called are exactly the reference reply's: none when the prompt offers
  no tool the question needs) and ``system_answer_correct`` (the final number, ``n_system_answer``).
- ``choice_acc`` (and ``persona_acc`` / ``narrative_acc``): multiple choice by summed log-likelihood of
  each choice given the prompt (persona and narrative examples; on a chat template the prompt is the user
  turn and the choice the assistant's reply, see :func:`choice_scores`). Perplexity stays plain text.
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
from forge_models.data.synthetic import Example, is_eval_unit, without_eval_units
from forge_models.data.system_prompts import final_number, obeys_persona, parse_system_prompt, prompt_messages, split_prompt
from forge_models.eval.real_text import token_windows
from forge_models.eval.stats import bootstrap_interval
from forge_models.generation import GenerationConfig, generate, prompt_ids, uses_chat
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tokenizer import eos_token_id
from forge_models.tools import AgentTurn, ToolRegistry, default_registry, find_calls, parse_call, run_agent_batch

# Generation stops: an arithmetic answer is one line; a tool reply ends with its call.
ARITH_STOPS = ("\n",)
TOOL_STOPS = ("</tool>", "\n")

# Tool calls one episode may make in the harness: the synthetic episodes need one; a second allows a retry
# after an error, and bounds the work a model that keeps calling can cause.
MAX_TOOL_CALLS = 2

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
        if "perplexity" in cfg.tasks:
            metrics.update(_perplexity(model, tokenizer, examples, cfg, ctx))
            metrics.update(_source_perplexities(model, tokenizer, examples, cfg, ctx))
        if "arithmetic" in cfg.tasks:
            metrics.update(_arithmetic(model, tokenizer, examples, cfg, ctx, vectors))
        if {"tool", "tool_loop", "system"} & set(cfg.tasks):
            metrics.update(_tool_use(model, tokenizer, examples, cfg, ctx, vectors))
        if "choice" in cfg.tasks:
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
    stream, scored, _ = _attributed_stream(texts, tokenizer, limit)
    return stream, scored


def _attributed_stream(texts: Iterable[str], tokenizer: Any, limit: int) -> tuple[list[int], list[bool], list[int]]:
    """:func:`_scored_stream` plus, per token, the index of the text it belongs to (its EOS included)."""
    eos = eos_token_id(tokenizer)
    stream: list[int] = []
    scored: list[bool] = []
    owner: list[int] = []
    done = 0
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
            owner.extend([done + n] * (len(ids) + 1))
        done += len(chunk)
        if len(stream) >= limit:
            break
    return stream[:limit], scored[:limit], owner[:limit]


# --------------------------------------------------------------------------------------- perplexity


def _perplexity(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext
) -> dict[str, float]:
    """Cross-entropy over non-overlapping windows of the held-out stream (each window's first token unscored,
    and every token of a tool output line): pooled, and per kind of the example each scored token belongs to.

    Eval-source units are left out of both (they are scored per source, :func:`_source_perplexities`), so
    adding an eval source changes neither number.
    """
    examples = without_eval_units(examples)
    if not examples:
        raise ConfigError(
            "the held-out examples are all eval-source units; pooled perplexity needs the split's other examples"
        )
    stream, scored, owner = _attributed_stream((ex.text for ex in examples), tokenizer, cfg.ppl_max_tokens)
    kinds = sorted({ex.kind for ex in examples})
    kind_of = torch.tensor([kinds.index(ex.kind) for ex in examples], dtype=torch.long)
    window = min(cfg.seq_len, _max_positions(model, cfg.seq_len))
    starts = [i for i in range(0, len(stream), window) if len(stream[i : i + window]) >= 2]
    windows = [(stream[i : i + window], scored[i : i + window], owner[i : i + window]) for i in starts]
    total, count = 0.0, 0
    kind_total = [0.0] * len(kinds)
    kind_count = [0] * len(kinds)
    for chunk in _batched(windows, cfg.batch_size):
        rows = [w for w, _, _ in chunk]
        ids, mask = _pad_right(rows, _pad_id(tokenizer))
        keep, _ = _pad_right([[int(k) for k in flags] for _, flags, _ in chunk], 0)
        owners, _ = _pad_right([o for _, _, o in chunk], 0)
        logits = _logits(model, ids, mask, ctx)
        drop = (mask[:, 1:] == 0) | (keep[:, 1:] == 0)
        targets = ids[:, 1:].masked_fill(drop, -100).to(logits.device)
        flat_logits, flat_targets = logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)
        # The pooled sum is computed exactly as before per-kind attribution existed, so its value (and every
        # golden number, cache and fitness built on it) is unchanged to the bit.
        nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((targets != -100).sum())
        # Per kind: the target token at position t + 1 belongs to the example that owns that token.
        per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none").double().cpu()
        token_kind = kind_of[owners[:, 1:].reshape(-1)]
        counted = (flat_targets != -100).cpu()
        for k in range(len(kinds)):
            here = counted & (token_kind == k)
            kind_total[k] += float(per_token[here].sum())
            kind_count[k] += int(here.sum())
    if count == 0:
        raise ConfigError("held-out examples yield fewer than 2 tokens; perplexity is undefined")
    loss = total / count
    metrics = {"loss": loss, "ppl": math.exp(loss), "ppl_tokens": float(count)}
    for kind, k_total, k_count in zip(kinds, kind_total, kind_count):
        if k_count:  # a kind whose tokens all fell past the budget has no score (not a score of zero)
            metrics[f"loss_{kind}"] = k_total / k_count
            metrics[f"ppl_{kind}"] = math.exp(k_total / k_count)
            metrics[f"ppl_tokens_{kind}"] = float(k_count)
    return metrics


def _source_perplexities(
    model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig, ctx: PhaseContext
) -> dict[str, float]:
    """``loss_src_<name>`` / ``ppl_src_<name>`` / ``ppl_tokens_src_<name>`` of every eval source among
    ``examples``: its units in order, windows inside one unit (:func:`~forge_models.eval.real_text.document_windows`), each window's first
    token unscored, at most ``cfg.ppl_max_tokens`` tokens per source."""
    units: dict[str, list[str]] = {}
    for ex in examples:
        if is_eval_unit(ex):
            units.setdefault(ex.source, []).append(ex.text)
    metrics: dict[str, float] = {}
    window = min(cfg.seq_len, _max_positions(model, cfg.seq_len))
    for name, texts in units.items():
        tokenized = (ids for batch in _batched(texts, 256) for ids in _encode(tokenizer, batch))
        windows = token_windows(tokenized, window, cfg.ppl_max_tokens)
        if not windows:
            raise ConfigError(f"eval source {name!r}: its held-out units yield no window of 2 or more tokens")
        total, count = 0.0, 0
        for rows in _batched(windows, cfg.batch_size):
            ids, mask = _pad_right(rows, _pad_id(tokenizer))
            logits = _logits(model, ids, mask, ctx)
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(logits.device)
            total += float(F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            ))
            count += int((targets != -100).sum())
        loss = total / count
        metrics.update({f"loss_src_{name}": loss, f"ppl_src_{name}": math.exp(loss), f"ppl_tokens_src_{name}": float(count)})
    return metrics


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
    # The pooled loss leaves eval-source units out, so the baseline it is compared with does too.
    held, scored = _scored_stream((ex.text for ex in without_eval_units(held_out)), tokenizer, limit=max_tokens)
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
    """Tool episodes (kind ``tool``) and system-prompt dialogues (kind ``system``), all run through the loop.

    ``tool_valid`` / ``tool_correct`` read the first step, cut where the old single-step generation
    stopped (``TOOL_STOPS``), so they keep their meaning; the loop metrics read the whole episode.
    """
    tool_tasks = [ex for ex in examples if ex.kind == "tool" and ex.prompt and ex.answer][: cfg.max_examples]
    system_tasks = [ex for ex in examples if ex.kind == "system" and split_prompt(ex.prompt)][: cfg.max_examples]
    looping = "tool_loop" in cfg.tasks
    if not ({"tool", "tool_loop"} & set(cfg.tasks)):
        tool_tasks = []
    if "system" not in cfg.tasks:
        system_tasks = []
    metrics = {"n_tool": float(len(tool_tasks)), "n_system": float(len(system_tasks))}
    if not tool_tasks and not system_tasks:
        metrics["n_tool_loop"] = 0.0
        return metrics
    registry = default_registry()
    # Without 'tool_loop' an episode ends at its first call (recorded, not run): the first step is all
    # tool_valid / tool_correct read, so the second generation would be spent for nothing.
    calls = MAX_TOOL_CALLS if looping else 0
    tool_turns = _episodes(model, tokenizer, tool_tasks, registry, cfg, ctx, calls)
    system_turns = _episodes(model, tokenizer, system_tasks, registry, cfg, ctx)  # a dialogue is its whole loop
    if tool_tasks and "tool" in cfg.tasks:
        calls = [parse_tool_call(_cut_at_stops(t.steps[0] if t.steps else "", TOOL_STOPS)) for t in tool_turns]
        metrics["tool_valid"] = _record(vectors, "tool_valid", (c is not None for c in calls))
        metrics["tool_correct"] = _record(
            vectors, "tool_correct", (c is not None and _same_number(c[1], ex.answer) for c, ex in zip(calls, tool_tasks))
        )
    # The loop's metrics: every episode whose reference reply calls a tool (all tool examples, and the
    # system dialogues that need an offered tool), scored on the whole episode.
    loop = [(ex, t, registry) for ex, t in zip(tool_tasks, tool_turns)] if looping else []
    loop += [(ex, t, _offered(registry, ex)) for ex, t in zip(system_tasks, system_turns)
             if looping and _reference_calls(ex)]
    metrics["n_tool_loop"] = float(len(loop))
    if loop:
        metrics["tool_call_valid"] = _record(vectors, "tool_call_valid", (
            bool(t.tool_calls) and all(reg.validate(c.name, c.arguments) is None for c in t.tool_calls)
            for _, t, reg in loop))
        metrics["tool_success"] = _record(vectors, "tool_success", (
            bool(t.tool_calls) and all(c.ok for c in t.tool_calls) for _, t, _ in loop))
        metrics["tool_answer_correct"] = _record(vectors, "tool_answer_correct", (
            _same_number(_as_float(final_number(t.answer)), ex.answer) for ex, t, _ in loop))
    if system_tasks:
        metrics.update(_system_metrics(system_tasks, system_turns, vectors))
    return metrics


def _system_metrics(tasks: Sequence[Example], turns: Sequence[AgentTurn], vectors: dict[str, list[float]]) -> dict[str, float]:
    """Persona rules, tool policy and answers of system-prompt dialogues (see forge_models.data.system_prompts)."""
    specs = [parse_system_prompt(split_prompt(ex.prompt)[0]) for ex in tasks]
    questions = [split_prompt(ex.prompt)[1] for ex in tasks]
    metrics: dict[str, float] = {}
    adherence = [obeys_persona(spec.persona, q, t.answer)
                 for spec, q, t in zip(specs, questions, turns) if spec is not None and spec.persona is not None]
    metrics["n_persona"] = float(len(adherence))
    if adherence:
        metrics["persona_rule_adherence"] = _record(vectors, "persona_rule_adherence", adherence)
    # Policy: the tools called are exactly the reference's (none when the system prompt offers no tool the
    # question needs), so a call of a tool the prompt does not offer, or a missing call, is a violation.
    metrics["system_tool_policy"] = _record(vectors, "system_tool_policy", (
        [c.name for c in t.tool_calls] == _reference_calls(ex) for ex, t in zip(tasks, turns)))
    numeric = [(ex, t) for ex, t in zip(tasks, turns) if ex.answer]
    metrics["n_system_answer"] = float(len(numeric))
    if numeric:
        metrics["system_answer_correct"] = _record(vectors, "system_answer_correct", (
            _same_number(_as_float(final_number(t.answer)), ex.answer) for ex, t in numeric))
    return metrics


def _reference_calls(ex: Example) -> list[str]:
    """The names of the tools the reference reply calls (the completion only: the system prompt's own
    "<tool>name(input)</tool>" instruction is not a call)."""
    completion = ex.text[len(ex.prompt):] if ex.text.startswith(ex.prompt) else ex.text
    return [(parse_call(c) or ("",))[0] for c in find_calls(completion)]


def _offered(registry: ToolRegistry, ex: Example) -> ToolRegistry:
    """The tools a system example's prompt offers (all of the registry for an example without one)."""
    parts = split_prompt(ex.prompt)
    spec = parse_system_prompt(parts[0]) if parts else None
    return registry if spec is None else registry.subset(spec.tools)


def _episodes(
    model: Any, tokenizer: Any, tasks: Sequence[Example], registry: ToolRegistry, cfg: EvalConfig, ctx: PhaseContext,
    max_tool_calls: int = MAX_TOOL_CALLS,
) -> list[AgentTurn]:
    """Every task through the tool loop, offered the tools its system prompt names; same order as ``tasks``.

    On a chat template a system example's prompt becomes system + user messages (the template's system
    slot); any other prompt is passed as it is, as the single-step harness always did.
    """
    if not tasks:
        return []
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    chat = uses_chat(tokenizer, gen)
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for i, ex in enumerate(tasks):
        parts = split_prompt(ex.prompt)
        spec = parse_system_prompt(parts[0]) if parts else None
        groups.setdefault(None if spec is None else spec.tools, []).append(i)
    turns: list[AgentTurn | None] = [None] * len(tasks)
    for tools, indices in groups.items():
        prompts = [(prompt_messages(tasks[i].prompt) if chat and tools is not None else None) or tasks[i].prompt
                   for i in indices]
        offered = registry if tools is None else registry.subset(tools)
        for i, turn in zip(indices, run_agent_batch(
            model, tokenizer, prompts, registry=offered, gen=gen, max_tool_calls=max_tool_calls, ctx=ctx,
            max_positions=_max_positions(model, cfg.seq_len),
        )):
            turns[i] = turn
    return turns  # type: ignore[return-value]


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to and including the first of ``stops`` (as generation with those stops would end)."""
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text


def _as_float(value: str | None) -> float | None:
    return None if value is None else float(value)


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
    tokens whatever the prompt; the prompt is truncated from the left to fit the model. When the tokenizer
    has a chat template (as for generation), the prompt is the user turn and the choice, stripped of its
    leading space, is the start of the assistant's reply: the ids generation would condition on
    (:func:`forge_models.generation.prompt_ids`) followed by the choice's ids.
    """
    limit = _max_positions(model, cfg.seq_len)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    chat = uses_chat(tokenizer, gen)
    sequences: list[tuple[list[int], int]] = []  # (tokens, number of trailing choice tokens)
    for ex in tasks:
        head = prompt_ids(tokenizer, ex.prompt, gen) if chat else _encode(tokenizer, [ex.prompt])[0]
        choices = [c.strip() for c in ex.choices] if chat else list(ex.choices)
        for choice_ids in _encode(tokenizer, choices):
            if not choice_ids or len(choice_ids) >= limit:
                raise ConfigError(
                    f"choice {ex.choices!r} of a {ex.kind} example has {len(choice_ids)} tokens; "
                    f"it must have 1 to {limit - 1} (the model's max positions - 1)"
                )
            room = limit - len(choice_ids)
            context = head[-room:] if chat else _context(tokenizer, head, room)
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
