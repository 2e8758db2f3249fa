"""Training one SVF expert per skill: the skills, their rewards and the two objectives.

A skill is a task family the evaluation harness checks (:mod:`forge_models.eval.harness`):

| skill | examples | harness metric | objective |
|---|---|---|---|
| arithmetic | kind "arithmetic" | ``arith_em`` | REINFORCE, +1 if the sampled worked answer's final number is right, else -1 |
| tool | kind "tool" | ``tool_correct`` | REINFORCE, +1 if the sampled reply's calculator call evaluates to the answer, else -1 |
| persona | kind "persona" | ``persona_acc`` | choice cross-entropy (differentiable) |
| narrative | kind "narrative" | ``narrative_acc`` | choice cross-entropy (differentiable) |

``experts.objectives`` may switch arithmetic or tool to **answer** cross-entropy (:func:`skill_with`).

**REINFORCE** (the paper's objective, Transformer^2 eq. 1): sample ``samples`` replies per prompt at
``temperature`` with the expert attached, reward each with the same checker the harness uses (+1 / -1),
and maximise ``mean((r - b) * log pi_W'(y|x)) - kl_coeff * KL(pi_W' || pi_W)``. Deviation: ``b`` is the
batch-mean reward (the paper and released code use none); with +-1 rewards on a small model most batches
are all -1 or all +1 and the baseline removes that constant push. The KL is the exact per-token KL of the
full next-token distributions on the sampled positions (the released code sets its coefficient to 0).

**Choice cross-entropy** for the multiple-choice skills: the harness picks the choice with the largest
summed log-likelihood, which is a differentiable function of z; the loss is the cross-entropy of the
softmax over those summed log-likelihoods against the label, plus the same KL penalty on the correct
choice's tokens. REINFORCE over sampled choices would follow the same gradient in expectation, with more
variance, so where the task allows the exact gradient we take it (the issue allows it; the paper has no
multiple-choice experts).

**Answer cross-entropy** (opt-in for arithmetic and tool): the mean negative log-likelihood of the corpus's
reference reply (the example's text after its prompt), teacher-forced after exactly the prompt generation sees,
plus the same KL penalty on those positions. REINFORCE with +-1 rewards has zero advantage when every sampled
reply fails (a base that never produces the corpus's answer format, e.g. SmolLM2-135M on ``The answer is N``):
no signal at all. The reference reply is a differentiable target there. It is a deviation from the paper (its
experts are trained by RL only), used where RL cannot start.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from forge_models.data.synthetic import Example
from forge_models.eval.harness import ARITH_STOPS, TOOL_STOPS, extract_answer, parse_tool_call
from forge_models.experts.config import TrainSettings
from forge_models.experts.svf import MaskState, TargetBasis, attached, init_z, mask_from_z
from forge_models.generation import GenerationConfig, generate, prompt_ids
from forge_models.runtime import ConfigError, PhaseContext, check_finite
from forge_models.tokenizer import eos_token_id

__all__ = ["Skill", "SKILLS", "TrainSettings", "train_expert", "skill_examples", "skill_with", "reference_reply"]


def _arith_reward(reply: str, ex: Example) -> float:
    return 1.0 if extract_answer(reply) == ex.answer else -1.0


def _tool_reward(reply: str, ex: Example) -> float:
    # The harness' tool_correct: a parseable calculator call whose value equals the expected answer.
    call = parse_tool_call(reply)
    try:
        expected = float(ex.answer)
    except ValueError:
        return -1.0
    ok = call is not None and call[1] is not None and math.isclose(call[1], expected, rel_tol=1e-9, abs_tol=1e-9)
    return 1.0 if ok else -1.0


@dataclass(frozen=True)
class Skill:
    """A task family: which examples, which harness metric measures it, how its expert is trained."""

    name: str
    kind: str
    metric: str
    objective: str  # "reinforce" or "choice"
    stops: tuple[str, ...] = ()
    reward: Callable[[str, Example], float] | None = None


SKILLS: dict[str, Skill] = {
    "arithmetic": Skill("arithmetic", "arithmetic", "arith_em", "reinforce", ARITH_STOPS, _arith_reward),
    "tool": Skill("tool", "tool", "tool_correct", "reinforce", TOOL_STOPS, _tool_reward),
    "persona": Skill("persona", "persona", "persona_acc", "choice"),
    "narrative": Skill("narrative", "narrative", "narrative_acc", "choice"),
}
"""Skills by name (the registry the phase config's ``skills`` refers to)."""


def skill_with(name: str, objective: str | None = None) -> Skill:
    """The registered skill ``name``, with its objective replaced by ``objective`` when given (only a generation
    skill may take ``answer`` or ``reinforce``; a choice skill keeps ``choice``)."""
    if name not in SKILLS:
        raise ConfigError(f"unknown skill {name!r}; choose from {sorted(SKILLS)}")
    skill = SKILLS[name]
    if objective is None or objective == skill.objective:
        return skill
    if skill.objective == "choice" or objective not in ("reinforce", "answer"):
        raise ConfigError(f"skill {name!r} ({skill.objective}) cannot be trained with objective {objective!r}")
    return dataclasses.replace(skill, objective=objective)


def reference_reply(ex: Example, stops: Sequence[str] = ()) -> str:
    """The corpus's reply to ``ex.prompt``: the example's text after its prompt, up to and including the first
    of ``stops`` (what one model call generates before the harness stops it: a tool reply ends at its call)."""
    if not ex.prompt or not ex.text.startswith(ex.prompt) or len(ex.text) == len(ex.prompt):
        raise ConfigError(f"a {ex.kind} example has no reference reply after its prompt: {ex.text[:80]!r}")
    reply = ex.text[len(ex.prompt):]
    cuts = [reply.index(st) + len(st) for st in stops if st in reply]
    return reply[: min(cuts)] if cuts else reply


def skill_examples(skill: Skill, examples: Sequence[Example]) -> list[Example]:
    """The examples of ``skill`` a checker can score (prompt and answer, or choices and label)."""
    if skill.objective == "choice":
        return [e for e in examples if e.kind == skill.kind and e.choices and 0 <= e.label < len(e.choices)]
    return [e for e in examples if e.kind == skill.kind and e.prompt and e.answer]


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_logprobs(model: Any, rows: Sequence[tuple[list[int], int]], pad: int, ctx: PhaseContext
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per row (tokens, n tail tokens): log-probs of the tail tokens and the full log-distributions there."""
    ids, mask = _pad([t for t, _ in rows], pad)
    with ctx.autocast():
        logits = model(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device)).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked, dists = [], []
    for i, (tokens, n) in enumerate(rows):
        pos = torch.arange(len(tokens) - n, len(tokens), device=logp.device)
        d = logp[i, pos - 1]
        dists.append(d)
        picked.append(d.gather(1, ids[i, pos.cpu()].to(d.device)[:, None]).squeeze(1))
    return picked, dists


def _expert_and_base(model: Any, rows: Sequence[tuple[list[int], int]], state: MaskState, masks, pad: int,
                     ctx: PhaseContext) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The tail tokens' log-probs and log-distributions with the expert (``masks``, differentiable), and the base's
    log-distributions there (no gradient): what every objective's loss and KL penalty read."""
    state.masks = None
    with torch.no_grad(), parametrize.cached():
        _, base_d = _token_logprobs(model, rows, pad, ctx)
    state.masks = masks
    with parametrize.cached():
        logps, dists = _token_logprobs(model, rows, pad, ctx)
    return logps, dists, base_d


def _kl(adapted: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of KL(pi_W' || pi_W) of the full next-token distributions."""
    total = sum(((a.exp() * (a - b)).sum(-1)).sum() for a, b in zip(adapted, base))
    count = sum(a.shape[0] for a in adapted)
    return total / max(count, 1)


def _context(tokenizer: Any, ex: Example, limit: int, gen_cfg: GenerationConfig) -> list[int] | None:
    ids = prompt_ids(tokenizer, ex.prompt, gen_cfg)
    return ids if len(ids) < limit else None


def train_expert(
    model: Any,
    tokenizer: Any,
    bases: Mapping[str, TargetBasis],
    skill: Skill,
    examples: Sequence[Example],
    s: TrainSettings,
    ctx: PhaseContext,
    *,
    seed: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train one expert's z on ``examples`` (train split) of ``skill``; returns (z per target, step log).

    Only z is optimised: every base parameter is frozen (``requires_grad`` False) for the duration and
    restored after; the model's weights are never written.
    """
    pool = skill_examples(skill, examples)
    if not pool:
        raise ConfigError(f"skill {skill.name!r}: no training examples of kind {skill.kind!r} in the train split")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    z = {n: t.to(ctx.device).requires_grad_(True) for n, t in init_z(bases, s.init_value, s.init_std, gen).items()}
    opt = torch.optim.Adam(list(z.values()), lr=s.lr)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else eos_token_id(tokenizer)
    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    gen_cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, stop=skill.stops,
                               batch_size=max(1, s.batch_size * s.samples))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    state = MaskState()
    log: list[dict[str, float]] = []
    was_training = model.training
    model.eval()  # no dropout: the only randomness is the seeded sampling
    try:
        with attached(model, bases, state):
            for step in range(s.steps):
                batch = [pool[rng.randrange(len(pool))] for _ in range(s.batch_size)]
                masks = {n: mask_from_z(t, s.max_mult) for n, t in z.items()}
                if skill.objective == "reinforce":
                    loss, stats = _reinforce_loss(model, tokenizer, skill, batch, state, masks, s, gen_cfg, gen,
                                                  pad, limit, ctx)
                elif skill.objective == "answer":
                    loss, stats = _answer_loss(model, tokenizer, skill, batch, state, masks, s, gen_cfg, pad, limit, ctx)
                else:
                    loss, stats = _choice_loss(model, tokenizer, batch, state, masks, s, pad, limit, ctx)
                check_finite(loss, step, f"SVF {skill.name} loss")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(z.values()), s.max_grad_norm))
                opt.step()
                stats["loss"] = float(loss.detach())
                log.append(stats)
                if on_step is not None:
                    on_step(step, stats)
    finally:
        state.masks = None
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: t.detach().cpu().clone() for n, t in z.items()}, log


def _reinforce_loss(model, tokenizer, skill: Skill, batch, state: MaskState, masks, s: TrainSettings,
                    gen_cfg, gen, pad, limit, ctx) -> tuple[torch.Tensor, dict[str, float]]:
    prompts = [ex for ex in batch for _ in range(s.samples)]
    state.masks = {n: m.detach() for n, m in masks.items()}
    with parametrize.cached():
        outs = generate(model, tokenizer, [ex.prompt for ex in prompts], gen_cfg, ctx, generator=gen)
    rewards = torch.tensor([skill.reward(o.text, ex) for o, ex in zip(outs, prompts)])  # type: ignore[misc]
    rows, keep = [], []
    for i, (o, ex) in enumerate(zip(outs, prompts)):
        ctx_ids = _context(tokenizer, ex, limit, gen_cfg)
        if ctx_ids is None or not o.token_ids or len(ctx_ids) + len(o.token_ids) > limit:
            continue
        rows.append((ctx_ids + list(o.token_ids), len(o.token_ids)))
        keep.append(i)
    stats = {"reward": float(rewards.mean()), "accuracy": float((rewards > 0).float().mean())}
    if not rows:
        zero = sum(m.sum() for m in masks.values()) * 0.0
        return zero, {**stats, "kl": 0.0}
    r = rewards[keep].to(ctx.device)
    advantage = r - r.mean()
    logps, dists, base_d = _expert_and_base(model, rows, state, masks, pad, ctx)
    seq_logp = torch.stack([lp.sum() for lp in logps])
    kl = _kl(dists, base_d)
    loss = -(advantage * seq_logp).mean() + s.kl_coeff * kl
    return loss, {**stats, "kl": float(kl.detach())}


def _answer_loss(model, tokenizer, skill: Skill, batch, state: MaskState, masks, s: TrainSettings, gen_cfg, pad, limit, ctx
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    rows = []
    for ex in batch:
        ctx_ids = _context(tokenizer, ex, limit, gen_cfg)  # None, or shorter than limit
        if ctx_ids is None:
            continue
        reply = tokenizer(reference_reply(ex, skill.stops), add_special_tokens=False)["input_ids"]
        reply = list(reply)[: limit - len(ctx_ids)]
        if reply:
            rows.append((ctx_ids + reply, len(reply)))
    if not rows:
        raise ConfigError("answer objective: no training example's prompt and reply fit the model's positions")
    logps, dists, base_d = _expert_and_base(model, rows, state, masks, pad, ctx)
    nll = torch.cat(logps).neg().mean()
    kl = _kl(dists, base_d)
    # Batch accuracy: every reply token is the expert's argmax under teacher forcing (the reply greedy decoding
    # would produce, if it stops where the reference does).
    acc = float(np.mean([bool((d.argmax(-1) == torch.tensor(t[-n:], device=d.device)).all())
                         for d, (t, n) in zip(dists, rows)]))
    return nll + s.kl_coeff * kl, {"reward": 2 * acc - 1, "accuracy": acc, "kl": float(kl.detach()),
                                   "ce": float(nll.detach())}


def _choice_rows(tokenizer, ex: Example, limit: int) -> list[tuple[list[int], int]]:
    from forge_models.generation import start_token

    prompt = list(tokenizer([ex.prompt], add_special_tokens=False)["input_ids"][0])
    rows = []
    for choice in tokenizer(list(ex.choices), add_special_tokens=False)["input_ids"]:
        choice = list(choice)
        keep = max(0, limit - len(choice) - 1)
        rows.append(([start_token(tokenizer)] + (prompt[-keep:] if keep else []) + choice, len(choice)))
    return rows


def _choice_loss(model, tokenizer, batch, state: MaskState, masks, s: TrainSettings, pad, limit, ctx
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    rows, spans = [], []
    for ex in batch:
        r = _choice_rows(tokenizer, ex, limit)
        spans.append((len(rows), len(r), ex.label))
        rows.extend(r)
    logps, dists, base_d = _expert_and_base(model, rows, state, masks, pad, ctx)
    scores = [lp.sum() for lp in logps]
    ce, hits, kl_a, kl_b = [], 0, [], []
    for start, n, label in spans:
        sc = torch.stack(scores[start : start + n])
        ce.append(F.cross_entropy(sc[None], torch.tensor([label], device=sc.device)))
        hits += int(int(sc.argmax()) == label)
        kl_a.append(dists[start + label])
        kl_b.append(base_d[start + label])
    kl = _kl(kl_a, kl_b)
    loss = torch.stack(ce).mean() + s.kl_coeff * kl
    acc = hits / len(batch)
    return loss, {"reward": 2 * acc - 1, "accuracy": acc, "kl": float(kl.detach()),
                  "ce": float(torch.stack(ce).mean().detach())}
