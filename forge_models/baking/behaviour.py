"""Behaviour of a baked system prompt: does the model, without the prompt, act as the input did with it?

KL says how close two distributions are; this says whether the behaviour the prompt asks for happens. It needs
a prompt whose rules a checker understands: a system prompt of the corpus's family
(:mod:`forge_models.data.system_prompts`: a persona with checkable rules and a sentence naming the tools).
The phase joins its prompts with a space, in baking order, so baking the persona sentence and then the tool
sentence gives exactly the system prompt the corpus writes (``baked_spec``); any other prompt is not checkable
and gets no behaviour metrics (the report says so).

For held-out questions of the corpus's system dialogues (their system line removed), three runs of the tool
loop (:func:`forge_models.tools.run_agent_batch`, offered the spec's tools, greedy):

- ``input_prompted``: the input model with the system prompt in the system slot (the target behaviour);
- ``input_plain``: the input model without it (what baking must change);
- the candidate (the stored, reloaded baked model, or the compressed one) without it.

Per question: ``persona_adherence`` (the final reply obeys every rule of the spec's persona,
:func:`~forge_models.data.system_prompts.obeys_persona`), ``answer_correct`` (the final number equals the
expected one; questions with a numeric answer under the spec: calculations, and fact questions when lookup is
offered) and ``tool_policy`` (the tools called are exactly the ones the reference reply under the spec calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from forge_models.data.facts import fact_table, normalise_key
from forge_models.data.system_prompts import (
    SystemSpec,
    fact_questions,
    final_number,
    obeys_persona,
    parse_system_prompt,
    split_prompt,
    system_prompt,
)
from forge_models.eval.harness import _as_float, _same_number  # the harness' own answer check, shared
from forge_models.generation import GenerationConfig
from forge_models.runtime import PhaseContext
from forge_models.tools import default_registry, run_agent_batch

__all__ = ["BEHAVIOURS", "Case", "baked_spec", "behaviour_cases", "run_cases"]

BEHAVIOURS = ("persona_adherence", "answer_correct", "tool_policy")


@dataclass(frozen=True)
class Case:
    """One held-out question and what the spec's reference reply does with it."""

    question: str
    answer: str | None  # the expected final number; None when the reply is not a number under the spec
    calls: tuple[str, ...]  # the tools the reference reply calls, in order


def baked_spec(texts: Sequence[str]) -> SystemSpec | None:
    """The checkable spec of prompts baked in this order (joined as the phase joins them), else None."""
    return parse_system_prompt(" ".join(t.strip() for t in texts))


def behaviour_cases(examples: Sequence[Any], spec: SystemSpec, limit: int,
                    facts: Mapping[str, str] | None = None) -> list[Case]:
    """Up to ``limit`` distinct questions of the system dialogues among ``examples``, with the spec's reference.

    A question's reference depends on the spec, not on the system prompt it was asked under in the corpus: a
    fact question is answered through ``lookup`` (its table value) only when the spec offers lookup (else
    declined: no number); a calculation has its value either way, through ``calculator`` when offered.
    """
    facts = fact_table() if facts is None else facts
    fact_keys = fact_questions()
    out: list[Case] = []
    seen: set[str] = set()
    for ex in examples:
        parts = split_prompt(ex.prompt) if getattr(ex, "kind", None) == "system" else None
        if parts is None or parts[1] in seen:
            continue
        question = parts[1]
        seen.add(question)
        key = fact_keys.get(question.strip())
        if key is not None:
            offered = "lookup" in spec.tools
            case = Case(question, facts[normalise_key(key)] if offered else None, ("lookup",) if offered else ())
        elif ex.answer:
            case = Case(question, ex.answer, ("calculator",) if "calculator" in spec.tools else ())
        else:
            case = Case(question, None, ())
        out.append(case)
        if len(out) >= limit:
            break
    return out


@torch.no_grad()
def run_cases(
    model: Any, tokenizer: Any, cases: Sequence[Case], spec: SystemSpec, *, prompted: bool, ctx: PhaseContext,
    max_new_tokens: int = 48, batch_size: int = 8, max_positions: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-case outcomes (1.0 / 0.0) of ``model`` on ``cases`` through the tool loop, with or without the spec's
    system prompt. ``answer_correct`` holds the cases with a numeric answer only (the same subset for every
    model, so comparisons stay paired)."""
    messages = [([{"role": "system", "content": system_prompt(spec.persona, spec.tools)}] if prompted else [])
                + [{"role": "user", "content": c.question}] for c in cases]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    turns = run_agent_batch(model, tokenizer, messages, registry=default_registry().subset(spec.tools), gen=gen,
                            ctx=ctx, max_positions=max_positions)
    return {
        "persona_adherence": np.asarray([float(obeys_persona(spec.persona, c.question, t.answer))
                                         for c, t in zip(cases, turns)]),
        "answer_correct": np.asarray([float(_same_number(_as_float(final_number(t.answer)), c.answer))
                                      for c, t in zip(cases, turns) if c.answer is not None]),
        "tool_policy": np.asarray([float(tuple(k.name for k in t.tool_calls) == c.calls)
                                   for c, t in zip(cases, turns)]),
    }


def compare(runs: Mapping[str, Mapping[str, np.ndarray]], candidate: str, prefix: str, seed: int) -> dict[str, float]:
    """Rates of every run and the candidate's paired differences, with bootstrap 95% intervals over questions.

    ``runs`` maps a run name (``input_prompted``, ``input_plain``, the candidate) to :func:`run_cases`'s
    outcomes. The goal (the candidate without the prompt reaches the prompted input, within interval) is met
    for a behaviour when the upper end of ``candidate - input_prompted`` is >= 0. A behaviour the prompt does
    not measurably change in the input (``input_prompted - input_plain`` has a lower end <= 0, so
    ``{b}/informative`` is 0) meets that goal without any bake, so it is reported but left out of
    ``{prefix}/goal_met``, which is 1 when the goal holds for every informative one of persona adherence and
    answer correctness (``{prefix}/goal_informative`` counts them; no ``goal_met`` when it is 0). Without an
    ``input_plain`` run every behaviour counts.
    """
    from forge_models.eval.stats import bootstrap_interval, paired_difference

    out: dict[str, float] = {}
    met = []
    for b in BEHAVIOURS:
        out[f"{prefix}/{b}/n"] = float(len(runs[candidate][b]))
        if not len(runs[candidate][b]):
            continue
        for name, r in runs.items():
            lo, hi = bootstrap_interval(r[b], seed=seed)
            out.update({f"{prefix}/{b}/{name}": float(r[b].mean()), f"{prefix}/{b}/{name}_lo": lo,
                        f"{prefix}/{b}/{name}_hi": hi})
        pairs = [(candidate, ref) for ref in ("input_prompted", "input_plain") if ref in runs and ref != candidate]
        if "input_prompted" in runs and "input_plain" in runs:
            pairs.append(("input_prompted", "input_plain"))
        for a, ref in pairs:
            d, lo, hi = paired_difference(runs[a][b], runs[ref][b], seed=seed)
            out.update({f"{prefix}/{b}/{a}_minus_{ref}": d, f"{prefix}/{b}/{a}_minus_{ref}_lo": lo,
                        f"{prefix}/{b}/{a}_minus_{ref}_hi": hi})
        informative = out.get(f"{prefix}/{b}/input_prompted_minus_input_plain_lo", 1.0) > 0
        out[f"{prefix}/{b}/informative"] = float(informative)
        if b != "tool_policy" and "input_prompted" in runs and informative:
            met.append(out[f"{prefix}/{b}/{candidate}_minus_input_prompted_hi"] >= 0)
    out[f"{prefix}/goal_informative"] = float(len(met))
    if met:
        out[f"{prefix}/goal_met"] = float(all(met))
    return out
