"""Two-pass inference with an expert library: pick (or mix) experts per prompt, then answer.

First pass (which expert): a registry of dispatchers.

- ``"exemplar"`` — the model itself classifies. Transformer^2 asks the LLM to name the category; a small
  model cannot follow that instruction, so we ask it the same question by likelihood: for each skill,
  ``gain_k = log p(prompt | exemplars of skill k) - log p(prompt)`` (mean over the prompt's tokens, the
  exemplars being a few train examples of that skill in the model's own format). The skill with the largest
  gain wins; if no gain reaches ``margin`` nats the prompt is "unknown" and is answered with the base
  weights (released ``classify_samples``: "other" -> base).
- ``"oracle"`` — the example's own kind (an upper bound for the benchmark; never used by the phase).

Few-shot mixing (the paper's third strategy): ``mask' = sum_k alpha_k * sigmoid(z_k) * max_mult`` with
alpha found by :func:`cem` (population 32, elite 0.2, 50 iterations, alpha clamped to [0, 1], initial std
half the range) on a few examples of the target task. A one-hot alpha gives expert k's masks exactly.

Second pass: prompts are grouped by their dispatch and each group runs through the batched harness with its
expert attached (:func:`forge_models.experts.svf.attached`); the base weights are restored bit for bit when
a group ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from forge_models.data.synthetic import Example
from forge_models.experts.svf import MaskState, TargetBasis, attached, mask_from_z
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tokenizer import eos_token_id

__all__ = ["UNKNOWN", "DISPATCHERS", "classify_prompts", "exemplar_dispatch", "oracle_dispatch", "mix_masks", "expert_masks", "cem",
           "CemResult", "prompt_nll"]

UNKNOWN = "unknown"


def expert_masks(z: Mapping[str, torch.Tensor], max_mult: float) -> dict[str, torch.Tensor]:
    return {n: mask_from_z(t, max_mult) for n, t in z.items()}


def mix_masks(experts: Mapping[str, Mapping[str, torch.Tensor]], alpha: Mapping[str, float], max_mult: float
              ) -> dict[str, torch.Tensor]:
    """``sum_k alpha_k * mask_k`` per target (released few-shot mixing mixes the sigmoid masks, not z)."""
    skills = [k for k in alpha]
    if not skills:
        raise ConfigError("mix_masks needs at least one expert weight")
    targets = next(iter(experts.values())).keys()
    out = {}
    for name in targets:
        acc = None
        for k in skills:
            term = alpha[k] * mask_from_z(experts[k][name], max_mult)
            acc = term if acc is None else acc + term
        out[name] = acc
    return out


def prompt_nll(model: Any, tokenizer: Any, prefixes: Sequence[str], prompts: Sequence[str], ctx: PhaseContext,
               batch_size: int = 16, lengths: list[int] | None = None) -> list[float]:
    """Mean NLL (nats/token) of each prompt's tokens given its prefix (EOS-separated, as in training).
    ``lengths``, when given, receives each row's token count (what the forward pass read)."""
    eos = eos_token_id(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else eos
    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    rows = []
    for prefix, prompt in zip(prefixes, prompts):
        p = list(tokenizer([prompt], add_special_tokens=False)["input_ids"][0])
        pre = [eos] + (list(tokenizer([prefix], add_special_tokens=False)["input_ids"][0]) + [eos] if prefix else [])
        room = max(1, limit - len(p))
        rows.append((pre[-room:] + p, len(p)))
    if lengths is not None:
        lengths.extend(len(t) for t, _ in rows)
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(t) for t, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (t, _) in enumerate(chunk):
                ids[r, : len(t)] = torch.tensor(t)
                mask[r, : len(t)] = 1
            with ctx.autocast():
                logits = model(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device)).logits.float()
            logp = torch.log_softmax(logits, -1)
            for r, (t, n) in enumerate(chunk):
                pos = torch.arange(len(t) - n, len(t), device=logp.device)
                out.append(float(-logp[r, pos - 1].gather(1, ids[r, pos.cpu()].to(logp.device)[:, None]).mean()))
    return out


def exemplar_dispatch(model: Any, tokenizer: Any, examples: Sequence[Example], exemplars: Mapping[str, str],
                      ctx: PhaseContext, margin: float = 0.0) -> list[str]:
    """The skill (or UNKNOWN) of each example, judged by the base model itself (module docstring)."""
    return classify_prompts(model, tokenizer, [ex.prompt or ex.text for ex in examples], exemplars, ctx, margin)


def classify_prompts(model: Any, tokenizer: Any, prompts: Sequence[str], exemplars: Mapping[str, str],
                     ctx: PhaseContext, margin: float = 0.0, tokens: list[int] | None = None) -> list[str]:
    """:func:`exemplar_dispatch` of plain prompt texts (an agent's questions, a served request): the skill whose
    exemplars make the prompt likeliest, or UNKNOWN when no gain reaches ``margin``. Run on the base weights.
    ``tokens``, when given, receives per prompt the tokens its 1 + len(exemplars) forward passes read."""
    if not exemplars:
        raise ConfigError("dispatch needs exemplars (one text per skill); the library stores none")
    read: list[list[int]] = [[]]
    base = prompt_nll(model, tokenizer, [""] * len(prompts), prompts, ctx, lengths=read[0])
    gains = {}
    for skill, text in exemplars.items():
        read.append([])
        nll = prompt_nll(model, tokenizer, [text] * len(prompts), prompts, ctx, lengths=read[-1])
        gains[skill] = [b - n for b, n in zip(base, nll)]
    if tokens is not None:
        tokens.extend(sum(r[i] for r in read) for i in range(len(prompts)))
    out = []
    for i in range(len(prompts)):
        skill, gain = max(((k, g[i]) for k, g in gains.items()), key=lambda kv: kv[1])
        out.append(skill if gain >= margin else UNKNOWN)
    return out


def oracle_dispatch(model: Any, tokenizer: Any, examples: Sequence[Example], exemplars: Mapping[str, str],
                    ctx: PhaseContext, margin: float = 0.0) -> list[str]:
    return [ex.kind if ex.kind in exemplars else UNKNOWN for ex in examples]


DISPATCHERS: dict[str, Callable[..., list[str]]] = {"exemplar": exemplar_dispatch, "oracle": oracle_dispatch}
"""First-pass classifiers by name."""


@dataclass(frozen=True)
class CemResult:
    best: np.ndarray
    best_score: float  # the objective's (first) value at ``best``
    history: list[float]
    best_key: tuple[float, ...] = ()  # the full value at ``best`` (score, tie-breakers...)


def cem(objective: Callable[[np.ndarray], float | tuple[float, ...]], dim: int, *, population: int = 32,
        elite: float = 0.2, iterations: int = 50, low: float = 0.0, high: float = 1.0, seed: int = 0) -> CemResult:
    """Cross-entropy method maximising ``objective`` over [low, high]^dim (released ``optim_modules.CEM``):
    Gaussian proposals clamped to the box, mean/std refit on the top ``elite`` share each iteration, initial
    mean the box centre and initial std half the range. ``objective`` may return a tuple, compared in order
    (a few-shot accuracy, then a tie-breaker such as the log-likelihood of the correct answers): with a handful
    of shots accuracies tie often, and the first of a tie would otherwise win and the elite be arbitrary."""
    if population < 2 or not 0 < elite <= 1 or iterations < 1 or dim < 1:
        raise ConfigError("cem needs population >= 2, 0 < elite <= 1, iterations >= 1, dim >= 1")
    rng = np.random.default_rng(seed)
    mean = np.full(dim, (low + high) / 2)
    std = np.full(dim, (high - low) / 2)
    n_elite = max(1, int(round(population * elite)))
    best, best_key, history = mean.copy(), (-np.inf,), []
    for _ in range(iterations):
        cand = np.clip(rng.normal(mean, std, size=(population, dim)), low, high)
        keys = [tuple(float(v) for v in k) if isinstance(k, tuple) else (float(k),)
                for k in (objective(c) for c in cand)]
        order = sorted(range(population), key=lambda i: keys[i], reverse=True)
        top = cand[order[:n_elite]]
        if keys[order[0]] > best_key:
            best, best_key = cand[order[0]].copy(), keys[order[0]]
        mean, std = top.mean(0), top.std(0) + 1e-6
        history.append(best_key[0])
    return CemResult(best, best_key[0], history, best_key)


def run_grouped(model: Any, bases: Mapping[str, TargetBasis], dispatch: Sequence[str],
                masks_for: Mapping[str, Mapping[str, torch.Tensor]], fn: Callable[[list[int]], list[float]]
                ) -> list[float]:
    """Second pass: ``fn(indices)`` per dispatch group with that group's masks attached (UNKNOWN: base);
    returns the per-example results back in the original order. The base is restored after every group."""
    out: list[float | None] = [None] * len(dispatch)
    for group in sorted(set(dispatch)):
        idx = [i for i, d in enumerate(dispatch) if d == group]
        if group == UNKNOWN:
            values = fn(idx)
        else:
            state = MaskState()
            state.masks = masks_for[group]
            with attached(model, bases, state, check=False):
                values = fn(idx)
        for i, v in zip(idx, values):
            out[i] = v
    return out  # type: ignore[return-value]
