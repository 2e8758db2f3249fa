"""The tool loop: the call is run, its result fed back, and the final answer depends on that result."""

from __future__ import annotations

import re

import pytest
import torch

from forge_models.data.facts import fact_table, town_names
from forge_models.generation import GenerationConfig
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tools import AgentTurn, ToolCall, ToolRegistry, default_registry, render_plain, run_agent
from forge_models.tools.agent import run_agent_batch
from tests.factories import ScriptedLM, byte_tokenizer

torch.set_num_threads(1)
GEN = GenerationConfig(max_new_tokens=96, batch_size=4)
CTX = PhaseContext(precision="fp32")


def tool_user(head: str) -> str:
    """A scripted tool user: call the tool the question needs, then answer with the last tool result."""
    results = re.findall(r"Tool: ([^\n]*)", head)
    if results:
        return f" The answer is {results[-1]}.\n"
    question = head.rsplit("User:", 1)[-1] if "User:" in head else head.rsplit("user\n", 1)[-1]
    if m := re.search(r"What is (\d+) times (\d+)", question):
        return f" <tool>calculator({m.group(1)} * {m.group(2)})</tool>"
    if m := re.search(r"population of (\w+)", question):
        return f" <tool>lookup({m.group(1)} population)</tool>"
    if "hostile" in question:
        return " <tool>calculator(9 ** 9 ** 9)</tool>"
    if "unknown" in question:
        return " <tool>python(import os)</tool>"
    if "loop" in question:
        return " <tool>calculator(1 + 1)</tool>"
    return " I can answer that directly.\n"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_the_result_is_fed_back_and_the_answer_uses_it(tok):
    model = ScriptedLM(tok, tool_user)
    turn = run_agent(model, tok, "User: What is 17 times 23?\nAssistant:", registry=default_registry(), gen=GEN,
                     device="cpu")
    assert isinstance(turn, AgentTurn)
    assert turn.tool_calls == [ToolCall("calculator", "17 * 23", "391", True, None)]
    assert turn.answer == "The answer is 391."
    assert turn.text == ("User: What is 17 times 23?\nAssistant: <tool>calculator(17 * 23)</tool>\n"
                         "Tool: 391\nAssistant: The answer is 391.\n")
    assert turn.prompt_tokens == 1 + len("User: What is 17 times 23?\nAssistant:")  # BOS + one token per char
    assert turn.completion_tokens == len(" <tool>calculator(17 * 23)</tool>") + len(" The answer is 391.\n")
    # The model saw the tool line: its second step was conditioned on the result.
    assert any("Tool: 391\nAssistant:" in c for c in model.calls)


def test_a_different_tool_result_changes_the_answer(tok):
    town = town_names()[5]
    prompt = f"User: What is the population of {town}?\nAssistant:"
    real = run_agent(ScriptedLM(tok, tool_user), tok, prompt, registry=default_registry(), gen=GEN)
    assert real.answer == f"The answer is {fact_table()[f'{town.lower()} population']}."
    fake = run_agent(ScriptedLM(tok, tool_user), tok, prompt, gen=GEN,
                     registry=default_registry({f"{town} population": "12"}))
    assert fake.answer == "The answer is 12." and fake.tool_calls[0].ok


@pytest.mark.parametrize("question, error", [
    ("hostile", "exponent"), ("unknown", "unknown tool 'python'"),
])
def test_bad_calls_are_shown_to_the_model_as_errors(tok, question, error):
    turn = run_agent(ScriptedLM(tok, tool_user), tok, f"User: {question}\nAssistant:", registry=default_registry(),
                     gen=GEN)
    (call,) = turn.tool_calls
    assert not call.ok and error in call.error
    assert f"\nTool: error: {call.error}\nAssistant:" in turn.text
    assert turn.answer == f"The answer is error: {call.error}."  # the model read the error line


def test_no_call_means_a_direct_answer(tok):
    turn = run_agent(ScriptedLM(tok, tool_user), tok, "User: Hello\nAssistant:", registry=default_registry(), gen=GEN)
    assert turn.tool_calls == [] and turn.answer == "I can answer that directly."


def test_calls_beyond_the_limit_are_refused_and_end_the_turn(tok):
    always_call = lambda head: " <tool>calculator(1 + 1)</tool>"  # noqa: E731
    turn = run_agent(ScriptedLM(tok, always_call), tok, "User: loop\nAssistant:", registry=default_registry(),
                     gen=GEN, max_tool_calls=2)
    assert [c.ok for c in turn.tool_calls] == [True, True, False]
    assert "more than 2 tool calls" in turn.tool_calls[-1].error
    assert turn.answer == "" and turn.text.count("Tool: 2\n") == 2
    with pytest.raises(ConfigError):
        run_agent(ScriptedLM(tok, always_call), tok, "x", registry=default_registry(), gen=GEN, max_tool_calls=-1)


def test_batch_equals_one_by_one(tok):
    towns = town_names()[:3]
    prompts = [f"User: What is {a} times {b}?\nAssistant:" for a, b in [(3, 4), (12, 11)]]
    prompts += [f"User: What is the population of {t}?\nAssistant:" for t in towns] + ["User: Hi\nAssistant:"]
    reg = default_registry()
    batch = run_agent_batch(ScriptedLM(tok, tool_user), tok, prompts, registry=reg, gen=GEN, ctx=CTX)
    alone = [run_agent(ScriptedLM(tok, tool_user), tok, p, registry=reg, gen=GEN) for p in prompts]
    assert batch == alone
    assert [len(t.tool_calls) for t in batch] == [1, 1, 1, 1, 1, 0]


def test_messages_and_system_prompts(tok):
    seen: list[str] = []

    def policy(head: str) -> str:
        seen.append(head)
        return tool_user(head)

    messages = [{"role": "system", "content": "Tools: calculator."}, {"role": "user", "content": "What is 2 times 8?"}]
    assert render_plain(messages) == "System: Tools: calculator.\nUser: What is 2 times 8?\nAssistant:"
    turn = run_agent(ScriptedLM(tok, policy), tok, messages, registry=default_registry(), gen=GEN)
    assert turn.answer == "The answer is 16." and turn.text.startswith("System: Tools: calculator.\nUser:")
    sys_gen = GEN.model_copy(update={"system": "Tools: calculator."})
    same = run_agent(ScriptedLM(tok, policy), tok, "User: What is 2 times 8?\nAssistant:", registry=default_registry(),
                     gen=sys_gen)
    assert same.text == turn.text
    with pytest.raises(ConfigError, match="role"):
        render_plain([{"role": "robot", "content": "x"}])


def test_chat_template_episodes():
    tok = byte_tokenizer(chat=True)
    messages = [{"role": "system", "content": "Tools: lookup."}, {"role": "user", "content": "What is 6 times 7?"}]
    turn = run_agent(ScriptedLM(tok, tool_user), tok, messages, registry=default_registry(), gen=GEN)
    head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert turn.text.startswith(head) and turn.prompt_tokens == len(tok(head, add_special_tokens=False)["input_ids"])
    assert turn.tool_calls[0].result == "42"
    # On a chat template the turn ends at EOS (a newline does not end it), after the fed-back result.
    assert turn.answer == "The answer is 42."
    assert turn.text.endswith("<tool>calculator(6 * 7)</tool>\nTool: 42\nAssistant: The answer is 42.\n")


def test_a_real_cached_model_runs_batched_like_one_by_one(tok):
    from tests.factories import tiny_llama

    model = tiny_llama(seed=3, vocab=len(tok)).eval()
    prompts = ["User: What is 3 times 4?\nAssistant:", "User: Hi\nAssistant:", "User: a much longer question here?\nAssistant:"]
    gen = GenerationConfig(max_new_tokens=12, batch_size=3)
    batch = run_agent_batch(model, tok, prompts, registry=default_registry(), gen=gen, ctx=CTX)
    alone = [run_agent(model, tok, p, registry=default_registry(), gen=gen, ctx=CTX) for p in prompts]
    assert batch == alone
    assert all(0 < t.completion_tokens <= 12 for t in batch)
