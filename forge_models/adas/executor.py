"""Run one agent configuration on a list of questions, with its cost per question measured.

    answers = run_agent_config(config, client, questions, seed=0)

For every vote (self-consistency: ``config.votes`` samples), every question's prompt is formatted by the
prompt style and sent to the client (batched per vote and per stop set), through the tool loop when the
config has tools; the final text is mapped to a prediction by the extraction rule; the majority of the
votes' predictions is the answer. An :class:`Answer` carries the prediction, every vote's text and the cost:
model calls, prompt and completion tokens (as the client counted them) and seconds (the wall time of each
batched call split evenly over its prompts).

The built-in tool loop speaks the synthetic corpus' syntax: the model writes ``<tool>NAME(ARGS)</tool>``,
the loop appends ``\\nTool: RESULT\\nAssistant:`` and lets it continue, at most ``max_tool_calls`` times. It
concatenates raw text, so it suits plain (non-chat) models; a client with a ``tool_loop`` method (a real
tool runtime, chat formatting) is used instead when it has one.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from forge_models.adas.client import Completion, GenerationClient, ToolRun
from forge_models.adas.config import COT_INSTRUCTION, AgentConfig
from forge_models.adas.questions import Question
from forge_models.adas.rules import EXTRACTORS, TOOL_CALL_END, TOOLS, tool_name
from forge_models.runtime import ConfigError


@dataclass(frozen=True)
class Cost:
    """What answering one question took."""

    model_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.model_calls + other.model_calls, self.prompt_tokens + other.prompt_tokens,
                    self.completion_tokens + other.completion_tokens, self.seconds + other.seconds)


@dataclass(frozen=True)
class Answer:
    """One question's answer: the prediction (None when nothing could be extracted), the votes and the cost."""

    uid: str
    prediction: str | None
    votes: tuple[str | None, ...]
    texts: tuple[str, ...]
    cost: Cost


def format_prompt(question: Question, config: AgentConfig) -> str:
    """The prompt the model sees under ``config.prompt_style``."""
    if config.prompt_style == "cot":
        return question.prompt + COT_INSTRUCTION
    return question.prompt


def majority(predictions: Sequence[str | None]) -> str | None:
    """The most frequent non-None prediction; ties go to the one that reached the count first (None if none)."""
    counts = Counter(p for p in predictions if p is not None)
    if not counts:
        return None
    top = max(counts.values())
    for p in predictions:  # first in vote order among the most frequent: deterministic tie-breaking
        if p is not None and counts[p] == top:
            return p
    return None  # unreachable


def vote_seed(seed: int, vote: int, round_: int = 0) -> int:
    """The decoding seed of one vote (and tool round): the same for every config, so configs share noise."""
    return int(seed) * 1_000_003 + vote * 7_919 + round_


def run_agent_config(
    config: AgentConfig, client: GenerationClient, questions: Sequence[Question], *, seed: int = 0
) -> list[Answer]:
    """Answer every question with the agent ``config`` describes (see the module docstring)."""
    if not questions:
        raise ConfigError("run_agent_config got no questions")
    client.capabilities().check(config)  # before any compute
    extract = EXTRACTORS[config.extraction]
    votes: list[list[str | None]] = [[] for _ in questions]
    texts: list[list[str]] = [[] for _ in questions]
    costs = [Cost() for _ in questions]
    experts: list[dict[str, float] | None] = [config.experts or None] * len(questions)
    if config.dispatch:  # first pass: the model picks each question's expert (the same for every vote)
        start = time.perf_counter()
        routes = client.dispatch([q.prompt for q in questions])  # type: ignore[attr-defined]
        _check_count(routes, questions)
        share = (time.perf_counter() - start) / len(questions)
        for i, r in enumerate(routes):
            experts[i] = {r.expert: 1.0} if r.expert else None
            costs[i] = costs[i] + Cost(r.model_calls, r.prompt_tokens, 0, share)
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault((tuple(q.stops), tuple(sorted((experts[i] or {}).items()))), []).append(i)
    for v in range(config.votes):
        for (stops, weights), idx in groups.items():
            prompts = [format_prompt(questions[i], config) for i in idx]
            group_cfg = config.model_copy(update={"experts": dict(weights), "dispatch": False})  # this group's weights
            if config.tools:
                runs, seconds = _tool_runs(client, prompts, group_cfg, stops, vote_seed(seed, v))
            else:
                start = time.perf_counter()
                outs = client.generate(prompts, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                                       seed=vote_seed(seed, v), thought_budget=config.thought_budget,
                                       expert=group_cfg.experts or None, stop=stops)
                seconds = time.perf_counter() - start
                _check_count(outs, prompts)
                runs = [ToolRun(o.text, (), 1, o.prompt_tokens, o.completion_tokens) for o in outs]
            share = seconds / len(idx)
            for i, run in zip(idx, runs):
                texts[i].append(run.text)
                votes[i].append(extract(run.text, run.tool_results, questions[i].choices))
                costs[i] = costs[i] + Cost(run.model_calls, run.prompt_tokens, run.completion_tokens, share)
    return [Answer(q.uid, majority(votes[i]), tuple(votes[i]), tuple(texts[i]), costs[i]) for i, q in enumerate(questions)]


def _check_count(outs: Sequence[object], prompts: Sequence[str]) -> None:
    if len(outs) != len(prompts):
        raise ConfigError(f"the client returned {len(outs)} completions for {len(prompts)} prompts")


def _tool_runs(
    client: GenerationClient, prompts: list[str], config: AgentConfig, stops: tuple[str, ...], seed: int
) -> tuple[list[ToolRun], float]:
    start = time.perf_counter()
    hook = getattr(client, "tool_loop", None)
    if hook is not None:
        runs = hook(prompts, tools=config.tools, max_tool_calls=config.max_tool_calls, temperature=config.temperature,
                    max_new_tokens=config.max_new_tokens, seed=seed, thought_budget=config.thought_budget,
                    expert=config.experts or None, stop=stops)
        _check_count(runs, prompts)
        return list(runs), time.perf_counter() - start
    return builtin_tool_loop(client, prompts, config, stops, seed), time.perf_counter() - start


def builtin_tool_loop(
    client: GenerationClient, prompts: list[str], config: AgentConfig, stops: tuple[str, ...], seed: int
) -> list[ToolRun]:
    """The synthetic-syntax tool loop (module docstring), batched over the still-active prompts."""
    n = len(prompts)
    texts = [""] * n
    results: list[list[str]] = [[] for _ in range(n)]
    calls, p_tok, c_tok = [0] * n, [0] * n, [0] * n
    active = list(range(n))
    for round_ in range(config.max_tool_calls + 1):
        may_call = round_ < config.max_tool_calls
        round_stops = tuple(dict.fromkeys((*stops, TOOL_CALL_END))) if may_call else stops
        outs: list[Completion] = client.generate(
            [prompts[i] + texts[i] for i in active], temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, seed=seed + round_, thought_budget=config.thought_budget,
            expert=config.experts or None, stop=round_stops)
        _check_count(outs, active)
        still = []
        for i, out in zip(active, outs):
            texts[i] += out.text
            calls[i] += 1
            p_tok[i] += out.prompt_tokens
            c_tok[i] += out.completion_tokens
            if not (may_call and out.text.rstrip().endswith(TOOL_CALL_END)):
                continue
            name = tool_name(out.text)
            observation = TOOLS[name](out.text) if name in config.tools else None
            if observation is None:
                continue  # an unknown tool or a malformed call: nothing to feed back, the reply ends here
            results[i].append(observation)
            texts[i] += f"\nTool: {observation}\nAssistant:"
            still.append(i)
        active = still
        if not active:
            break
    return [ToolRun(texts[i], tuple(results[i]), calls[i], p_tok[i], c_tok[i], tool_calls=len(results[i]))
            for i in range(n)]
