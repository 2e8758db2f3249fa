"""The tool loop: the model writes a call, the runtime runs it and shows the result, the model goes on.

    turn = run_agent(model, tokenizer, "User: What is 17 times 23?\\nAssistant:",
                     registry=default_registry(), gen=GenerationConfig(max_new_tokens=32))
    turn.answer        # "The answer is 391."
    turn.tool_calls    # [ToolCall(name="calculator", arguments="17 * 23", result="391", ok=True, error=None)]

**Transcript format** (the one the synthetic tool episodes are written in)::

    System: ...                      (plain format only, when there is a system prompt)
    User: What is 17 times 23?
    Assistant: <tool>calculator(17 * 23)</tool>
    Tool: 391
    Assistant: The answer is 391.

Each step generates until ``</tool>``, the end of the turn, or ``gen.max_new_tokens`` tokens. A step that
ends with a call has it run through the registry (:meth:`ToolRegistry.call_text`, never raises) and
``\\nTool: RESULT\\nAssistant:`` appended; the model then continues from the whole transcript. A step
without a call ends the turn, and its text is the answer. On the plain format a turn ends at a newline
(the format's end of turn, added to ``gen.stop``); on a chat template at EOS, and the tool lines are
written inside the assistant's turn. At most ``max_tool_calls`` calls run; a further call is recorded as
refused and ends the turn with an empty answer.

A string prompt is used as written on the plain format (``gen.system``, if set, is put before it as a
``System:`` line) and becomes the user message on a chat template (after ``gen.system``); a list of
messages is rendered by the chat template, or as ``Role: content`` lines on the plain format.

Generation goes through the project's one generator, :func:`forge_models.generation.generate`, with the
transcript passed as token ids; :func:`run_agent_batch` runs many episodes step by step, every episode
still running generating in the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from forge_models.generation import Generation, GenerationConfig, Prompt, generate, start_token, uses_chat
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tools.registry import CALL_CLOSE, CALL_OPEN, ToolCall, ToolRegistry, find_calls, parse_call

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass(frozen=True)
class AgentTurn:
    """One episode: the final answer, every call made, token counts and the whole transcript."""

    answer: str
    tool_calls: list[ToolCall]
    prompt_tokens: int
    completion_tokens: int
    text: str
    steps: tuple[str, ...] = ()  # what the model wrote at each step (the tool lines in between are the runtime's)


def render_plain(messages: Sequence[dict[str, str]]) -> str:
    """Messages as the plain transcript format, ending with ``Assistant:`` for the model to continue."""
    lines = []
    for m in messages:
        role = m.get("role")
        if role not in PLAIN_ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"message {m!r}: expected role in {list(PLAIN_ROLES)} and a string content")
        lines.append(f"{PLAIN_ROLES[role]}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:"


def run_agent(
    model: Any,
    tokenizer: Any,
    prompt: Prompt,
    *,
    registry: ToolRegistry,
    gen: GenerationConfig,
    max_tool_calls: int = 4,
    device: torch.device | str = "cpu",
    seed: int = 0,
    ctx: PhaseContext | None = None,
    generate_fn: Callable[..., list[Generation]] | None = None,
) -> AgentTurn:
    """Run one episode (see the module docstring); the model must already be on ``device``."""
    return run_agent_batch(
        model, tokenizer, [prompt], registry=registry, gen=gen, max_tool_calls=max_tool_calls,
        device=device, seed=seed, ctx=ctx, generate_fn=generate_fn,
    )[0]


@dataclass
class _Episode:
    head_text: str  # the rendered prompt
    head_ids: list[int]  # its token ids (chat: the template's exactly; plain: BOS + text)
    continuation: str = ""  # everything after the prompt: model text and tool lines
    completion_tokens: int = 0
    answer: str | None = None
    calls: list[ToolCall] | None = None
    steps: list[str] | None = None


def run_agent_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    registry: ToolRegistry,
    gen: GenerationConfig,
    max_tool_calls: int = 4,
    device: torch.device | str = "cpu",
    seed: int = 0,
    ctx: PhaseContext | None = None,
    max_positions: int | None = None,
    generate_fn: Callable[..., list[Generation]] | None = None,
) -> list[AgentTurn]:
    """:func:`run_agent` for many prompts, in the same order. ``ctx`` (device, precision) overrides ``device``;
    ``max_positions`` overrides the model config's ``max_position_embeddings`` (as in ``generate``);
    ``generate_fn`` (``generate``'s signature) replaces the generator, e.g. Quiet-STaR's
    :func:`forge_models.quietstar.generation.thought_generate` for a thought budget."""
    if max_tool_calls < 0:
        raise ConfigError(f"max_tool_calls must be >= 0, got {max_tool_calls}")
    if not prompts:
        return []
    ctx = ctx if ctx is not None else PhaseContext(device=torch.device(device), seed=seed)
    chat = uses_chat(tokenizer, gen)
    stops = tuple(dict.fromkeys((*gen.stop, CALL_CLOSE) + (() if chat else ("\n",))))
    step_cfg = gen.model_copy(update={"stop": stops})
    generator = torch.Generator().manual_seed(seed) if gen.temperature > 0 else None
    episodes = [_start(tokenizer, p, gen, chat) for p in prompts]
    for step in range(max_tool_calls + 1):
        active = [e for e in episodes if e.answer is None]
        if not active:
            break
        contexts = [_context_ids(tokenizer, e, chat) for e in active]
        outs = (generate_fn or generate)(model, tokenizer, contexts, step_cfg, ctx, generator=generator,
                                         max_positions=max_positions)
        for e, g in zip(active, outs):
            e.completion_tokens += len(g.token_ids)
            text = g.text
            e.steps.append(text)
            calls = find_calls(text) if g.finish == "stop" and text.endswith(CALL_CLOSE) else []
            if not calls:
                e.continuation += text
                e.answer = _final_text(text, stops)
                continue
            e.continuation += text
            inner = calls[-1]
            if step == max_tool_calls:  # the limit: the call is recorded, not run, and the turn ends
                name, arguments = parse_call(inner) or ("", inner)
                e.calls.append(ToolCall(name=name, arguments=arguments, ok=False,
                                        result=f"error: more than {max_tool_calls} tool calls",
                                        error=f"more than {max_tool_calls} tool calls"))
                e.answer = ""
                continue
            call = registry.call_text(inner)
            e.calls.append(call)
            e.continuation += f"\nTool: {call.result}\nAssistant:"
    return [
        AgentTurn(answer=e.answer or "", tool_calls=list(e.calls or []), prompt_tokens=len(e.head_ids),
                  completion_tokens=e.completion_tokens, text=e.head_text + e.continuation, steps=tuple(e.steps or []))
        for e in episodes
    ]


def _start(tokenizer: Any, prompt: Prompt, gen: GenerationConfig, chat: bool) -> _Episode:
    if not isinstance(prompt, str) and not all(isinstance(m, dict) for m in prompt):
        raise ConfigError("run_agent takes a prompt string or a list of {'role', 'content'} messages")
    if chat:
        if isinstance(prompt, str):
            messages = ([{"role": "system", "content": gen.system}] if gen.system is not None else []) + [
                {"role": "user", "content": prompt}]
        else:
            messages = list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The same ids forge_models.generation.prompt_ids gives (the template writes its own special tokens).
        ids = _encode(tokenizer, text)
        return _Episode(head_text=text, head_ids=ids, calls=[], steps=[])
    if isinstance(prompt, str):
        text = (f"System: {gen.system}\n" if gen.system is not None else "") + prompt
    else:
        text = render_plain(prompt)
    ids = [start_token(tokenizer)] + _encode(tokenizer, text)
    return _Episode(head_text=text, head_ids=ids, calls=[], steps=[])


def _context_ids(tokenizer: Any, e: _Episode, chat: bool) -> list[int]:
    if not e.continuation:
        return e.head_ids
    if chat:
        return e.head_ids + _encode(tokenizer, e.continuation)
    # Plain: prompt and continuation tokenized together, exactly as a training text is.
    return [e.head_ids[0]] + _encode(tokenizer, e.head_text + e.continuation)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # A one-element batch, as forge_models.generation tokenizes (any tokenizer callable on a list works).
    return [int(t) for t in tokenizer([text], add_special_tokens=False)["input_ids"][0]]


def _final_text(text: str, stops: Sequence[str]) -> str:
    """The answer: the step's text without the end-of-turn stop it ended on, stripped."""
    for s in stops:
        if s and s != CALL_CLOSE and text.endswith(s):
            text = text[: -len(s)]
            break
    return text.strip()


__all__ = ["AgentTurn", "CALL_OPEN", "render_plain", "run_agent", "run_agent_batch"]
