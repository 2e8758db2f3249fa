"""Dreams: the model samples answers at high temperature, a checker keeps the correct ones, they are replayed.

A dream cycle takes fresh task prompts (arithmetic or tool, from the curriculum's "dream" seed stream at
the current difficulty), samples one continuation per prompt at ``temperature`` with a generator seeded
from (seed, cycle), and keeps a sample only if it is *answer-checked correct*:

- arithmetic: the continuation's "The answer is N" equals the true result;
- tool: the continuation holds a well-formed ``<tool>calculator(EXPR)</tool>`` whose value is the true
  result; the kept episode is completed with the calculator's own output and the final answer line,
  exactly as a real tool call would be.

Kept dreams go into a bounded FIFO buffer; batches of replay stages take ``replay_ratio`` of their rows
from it (the rest stays real corpus data: reality anchoring). Sampling uses no KV cache (every model in
the pipeline works), and prompts of equal token length are batched together, so no padding is needed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from forge_models.data.synthetic import Example
from forge_models.eval.harness import extract_answer, parse_tool_call
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import eos_token_id

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
    """One sampled continuation per prompt (text only), ending at EOS, a stop string (kept) or the budget."""
    eos = eos_token_id(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    start = int(bos) if bos is not None else eos
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    keep = max(1, max_positions - max_new_tokens - 1)
    contexts = [[start] + list(ids)[-keep:] for ids in encoded]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(contexts):
        groups[len(c)].append(i)
    outputs = [""] * len(prompts)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        for length in sorted(groups):
            rows = groups[length]
            ids = torch.tensor([contexts[i] for i in rows], dtype=torch.long)
            generated: list[list[int]] = [[] for _ in rows]
            active = list(range(len(rows)))
            for _ in range(max_new_tokens):
                x = ids[active]
                with ctx.autocast():
                    logits = model(input_ids=x.to(ctx.device), attention_mask=torch.ones_like(x).to(ctx.device)).logits
                probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1).cpu()
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                column = torch.full((len(rows), 1), eos, dtype=torch.long)
                column[active, 0] = next_ids
                ids = torch.cat([ids, column], dim=1)
                still = []
                for r, token in zip(active, next_ids.tolist()):
                    if token == eos:
                        continue
                    generated[r].append(token)
                    text = tokenizer.decode(generated[r], skip_special_tokens=True)
                    ends = [text.find(s) + len(s) for s in stops[rows[r]] if s in text]
                    outputs[rows[r]] = text[: min(ends)] if ends else text
                    if not ends:
                        still.append(r)
                active = still
                if not active:
                    break
    finally:
        model.train(was_training)
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
