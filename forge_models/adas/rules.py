"""Name registries an agent configuration refers to: answer-extraction rules and tools.

An :class:`~forge_models.adas.config.AgentConfig` names its extraction rule and its tools; the config
validator refuses names that are not here, so a stored configuration can always be run again.

Extraction rules map an agent's final text (and, for tool loops, the tool results it saw) to the answer
that is checked. They never see the gold answer; a multiple-choice question's choices are part of the
question, so ``closest_choice`` may use them.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from forge_models.eval.harness import extract_answer, parse_tool_call

# (final text, tool results in order, the question's choices) -> prediction or None.
Extractor = Callable[[str, Sequence[str], Sequence[str]], "str | None"]

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_WORD_RE = re.compile(r"[a-z0-9]+")


def _answer_is(text: str, tool_results: Sequence[str], choices: Sequence[str]) -> str | None:
    """The number after "The answer is" (the harness' rule, also the synthetic corpus' answer format)."""
    return extract_answer(text)


def _last_number(text: str, tool_results: Sequence[str], choices: Sequence[str]) -> str | None:
    """The last number anywhere in the text (what a worked answer usually ends with)."""
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def _tool_result(text: str, tool_results: Sequence[str], choices: Sequence[str]) -> str | None:
    """The last tool result the agent received; else the value of a tool call written but not run."""
    if tool_results:
        return tool_results[-1]
    call = parse_tool_call(text)
    if call is None or call[1] is None:
        return None
    return _format_number(call[1])


def _first_line(text: str, tool_results: Sequence[str], choices: Sequence[str]) -> str | None:
    """The first non-empty line, stripped (free-form answers)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def _closest_choice(text: str, tool_results: Sequence[str], choices: Sequence[str]) -> str | None:
    """The choice sharing the most words with the text's first line (ties: the earliest); None without choices.

    A generative stand-in for the harness' log-likelihood multiple choice: the model writes a reply, the
    reply is mapped to the nearest choice. An empty reply (no shared word with any choice) is None.
    """
    if not choices:
        return None
    line = _first_line(text, tool_results, choices) or ""
    words = set(_WORD_RE.findall(line.lower()))
    best, best_overlap = None, 0
    for choice in choices:
        cw = set(_WORD_RE.findall(choice.lower()))
        overlap = len(words & cw) / max(1, len(cw | words)) if cw else 0.0
        if overlap > best_overlap:
            best, best_overlap = choice, overlap
    return best.strip() if best is not None else None


def _auto(text: str, tool_results: Sequence[str], choices: Sequence[str]) -> str | None:
    """By question type: closest choice for multiple choice; else answer-is, tool result, last number."""
    if choices:
        return _closest_choice(text, tool_results, choices)
    for rule in (_answer_is, _tool_result, _last_number):
        found = rule(text, tool_results, choices)
        if found is not None:
            return found
    return None


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


EXTRACTORS: dict[str, Extractor] = {
    "auto": _auto,
    "answer_is": _answer_is,
    "last_number": _last_number,
    "tool_result": _tool_result,
    "first_line": _first_line,
    "closest_choice": _closest_choice,
}
"""Answer-extraction rules by name (the ``extraction`` field of an agent configuration)."""


# ------------------------------------------------------------------------------------------- tools

# A tool takes the text of a call the model wrote and returns the observation text, or None when the
# call is malformed (the loop then stops: nothing to feed back).
Tool = Callable[[str], "str | None"]


def _calculator(call_text: str) -> str | None:
    """``<tool>calculator(EXPR)</tool>`` evaluated by the harness' whitelist arithmetic (never eval())."""
    call = parse_tool_call(call_text)
    if call is None or call[1] is None:
        return None
    return _format_number(call[1])


TOOLS: dict[str, Tool] = {"calculator": _calculator}
"""Tools an agent's tool loop may use, by name. The call syntax is the synthetic corpus'
(``<tool>NAME(ARGS)</tool>``, answered on a ``Tool: RESULT`` line); a real tool runtime plugs in through
the client's ``tool_loop`` hook instead (see :mod:`forge_models.adas.executor`)."""

TOOL_CALL_END = "</tool>"


def tool_name(call_text: str) -> str | None:
    """The name in the first ``<tool>NAME(...)`` of ``call_text``, or None."""
    match = re.search(r"<tool>\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(", call_text)
    return match.group(1) if match else None
