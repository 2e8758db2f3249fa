"""Dreams: the model samples answers at high temperature, a checker keeps the correct ones, they are replayed.

A dream cycle takes fresh task prompts (arithmetic or tool, from the curriculum's "dream" seed stream at
the current difficulty), samples one continuation per prompt at ``temperature`` with a generator seeded
from (seed, cycle), and keeps a sample only if it is *answer-checked correct*:

- arithmetic: the continuation's "The answer is N" equals the true result;
- tool: the continuation holds a well-formed ``<tool>calculator(EXPR)</tool>`` whose value is the true
  result; the kept episode is completed with the calculator's own output and the final answer line,
  exactly as a real tool call would be.

Kept dreams go into a bounded FIFO buffer; batches of replay stages take ``replay_ratio`` of their rows
from it (the rest stays real corpus data: reality anchoring). Sampling goes through the project's one
generator (KV cache where the model has one, left-padded batches).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from forge_models.data.synthetic import Example
from forge_models.eval.harness import extract_answer, parse_tool_call
from forge_models.generation import GenerationConfig, generate
from forge_models.runtime import PhaseContext

__all__ = ["check_dream", "sample_continuations"]

STOPS = {"arithmetic": ("\n",), "tool": ("</tool>", "\n")}


@torch.no_grad()
def sample_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    stops: Sequence[Sequence[str]],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    ctx: PhaseContext,
    max_positions: int,
) -> list[str]:
    """One sampled continuation per prompt (text only), ending at EOS, a stop string (kept) or the budget.

    Runs :func:`forge_models.generation.generate` once per distinct stop set (in order of first
    appearance), never chat-formatted: a dream is trained on as plain text in the corpus's own format.
    """
    outputs = [""] * len(prompts)
    for stop in dict.fromkeys(tuple(s) for s in stops):
        rows = [i for i, s in enumerate(stops) if tuple(s) == stop]
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                               batch_size=max(1, len(rows)), chat=False)
        for i, g in zip(rows, generate(model, tokenizer, [prompts[i] for i in rows], cfg, ctx, generator=generator,
                                       max_positions=max_positions)):
            outputs[i] = g.text
    return outputs


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def check_dream(task: Example, continuation: str) -> str | None:
    """The training text of a correct dream, or None when the dream fails its answer check."""
    if task.kind == "arithmetic":
        line = continuation.split("\n", 1)[0]
        if extract_answer(line) != task.answer:
            return None
        return f"{task.prompt}{line}\n"
    if task.kind == "tool":
        call = parse_tool_call(continuation)
        if call is None or call[1] is None or _number(call[1]) != task.answer:
            return None
        cut = continuation.index("</tool>") + len("</tool>")
        result = _number(call[1])  # what the calculator returns for the call the model wrote
        return f"{task.prompt}{continuation[:cut]}\nTool: {result}\nAssistant: The answer is {result}.\n"
    return None
