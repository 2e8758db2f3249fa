"""Canonical content keys: what makes two examples "the same item" for splitting and exclusion.

A split chosen by the hash of the exact prompt leaks: "What is 7 times 13?" and "Compute 7 * 13." are one
calculation in two wordings, and an arithmetic problem's worked step "7 * 13 = 91." teaches the same fact.
So an example is reduced to the set of *canonical keys* it shows, and splitting and held-out exclusion work
on those keys, never on the wording:

- a calculation ``a op b`` (a worked step of an arithmetic problem, a tool call, the persona's "what is
  a plus b") -> ``calc:a op b`` with the operands of ``+`` and ``*`` sorted (they commute);
- a persona turn -> ``persona:<question>`` with the user's greeting stripped (the reply is a function of the
  question alone, so held-out replies can never appear verbatim in training);
- a narrative -> ``story:<story>`` (every question about a story shares its split);
- a system-prompt dialogue -> the calculation it shows, else ``fact:<town> <attribute>`` for a fact
  question, else ``persona:<question>``: the system prompt is ignored, so a held-out question is held out
  under every persona and tool set (see :mod:`forge_models.data.system_prompts`);
- anything else -> its prompt, else its text.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # synthetic.py imports this module
    from forge_models.data.synthetic import Example

QUESTION_MARK = "\nQuestion:"

_STEP_RE = re.compile(r"(-?\d+) ([+\-*]) (-?\d+) = ")
_CALL_RE = re.compile(r"calculator\(\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*\)")
_PERSONA_RE = re.compile(r"^User: (?:Hi! |Hello\. |Hey! |Hi, I am [A-Za-z]+\. )?(.*)\nAssistant:$", re.S)
_PERSONA_SUM_RE = re.compile(r"^Quick question: what is (-?\d+) plus (-?\d+)\?$")


def calc_key(a: int | str, op: str, b: int | str) -> str:
    """The canonical key of the calculation ``a op b`` (commutative operands sorted)."""
    x, y = int(a), int(b)
    if op in "+*" and x > y:
        x, y = y, x
    return f"calc:{x} {op} {y}"


def canonical_keys(ex: "Example") -> frozenset[str]:
    """Every canonical key ``ex`` shows (never empty); see the module docstring."""
    keys: set[str] = set()
    if ex.kind == "arithmetic":
        answer_part = ex.text[len(ex.prompt):] if ex.prompt and ex.text.startswith(ex.prompt) else ex.text
        keys.update(calc_key(a, op, b) for a, op, b in _STEP_RE.findall(answer_part))
    elif ex.kind == "tool":
        keys.update(calc_key(a, op, b) for a, op, b in _CALL_RE.findall(ex.text))
    elif ex.kind == "persona":
        match = _PERSONA_RE.match(ex.prompt)
        if match:
            question = match.group(1)
            summed = _PERSONA_SUM_RE.match(question)
            keys.add(calc_key(summed.group(1), "+", summed.group(2)) if summed else f"persona:{question}")
    elif ex.kind == "system":
        keys.update(_system_keys(ex))
    elif ex.kind == "narrative" and QUESTION_MARK in ex.prompt:
        keys.add("story:" + ex.prompt.split(QUESTION_MARK, 1)[0])
    if not keys:
        keys.add(f"{ex.kind}:" + (ex.prompt or ex.text))
    return frozenset(keys)


def _system_keys(ex: "Example") -> set[str]:
    from forge_models.data.system_prompts import fact_key, split_prompt

    parts = split_prompt(ex.prompt)
    if parts is None:
        return set()
    answer_part = ex.text[len(ex.prompt):] if ex.text.startswith(ex.prompt) else ex.text
    calcs = {calc_key(a, op, b) for a, op, b in _CALL_RE.findall(answer_part) + _STEP_RE.findall(answer_part)}
    if calcs:
        return calcs
    fact = fact_key(parts[1])
    return {fact} if fact else {f"persona:{parts[1]}"}
