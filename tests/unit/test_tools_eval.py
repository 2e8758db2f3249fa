"""The harness' tool-loop and system-prompt metrics, on scripted models whose right answers are known."""

from __future__ import annotations

import re
from typing import Sequence

import pytest
import torch

from forge_models.config import EvalConfig, SyntheticConfig
from forge_models.data import Example, generate_synthetic
from forge_models.data.system_prompts import PERSONAS, parse_system_prompt, split_prompt
from forge_models.eval import evaluate
from forge_models.runtime import PhaseContext
from tests.factories import ScriptedLM, byte_tokenizer

torch.set_num_threads(1)
CTX = PhaseContext(precision="fp32")
CFG = EvalConfig(max_examples=40, ppl_max_tokens=64, max_new_tokens=96, batch_size=8, seq_len=512)


def _tool(a: int, op: str, b: int) -> Example:
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    prompt = f"User: Compute {a} {op} {b}.\nAssistant:"
    text = f"{prompt} <tool>calculator({a} {op} {b})</tool>\nTool: {value}\nAssistant: The answer is {value}.\n"
    return Example(kind="tool", text=text, prompt=prompt, answer=str(value))


TOOL_EXAMPLES = [_tool(17, "*", 23), _tool(5, "-", 9), _tool(12, "+", 30)]


def caller(answer_with_result: bool, tool: str = "calculator"):
    def policy(head: str) -> str:
        results = re.findall(r"Tool: ([^\n]*)", head)
        if results:
            return f" The answer is {results[-1] if answer_with_result else 7}.\n"
        a, op, b = re.search(r"Compute (\d+) (.) (\d+)\.", head).groups()
        return f" <tool>{tool}({a} {op} {b})</tool>"
    return policy


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_the_loop_checks_the_final_answer_not_the_call_alone(tok):
    good = evaluate(ScriptedLM(tok, caller(True)), tok, TOOL_EXAMPLES, CFG, CTX)
    assert {k: good[k] for k in ("tool_valid", "tool_correct", "tool_call_valid", "tool_success",
                                  "tool_answer_correct", "n_tool", "n_tool_loop")} == {
        "tool_valid": 1.0, "tool_correct": 1.0, "tool_call_valid": 1.0, "tool_success": 1.0,
        "tool_answer_correct": 1.0, "n_tool": 3.0, "n_tool_loop": 3.0}
    # The right call, then an answer that ignores the result: the single-step metrics cannot tell.
    ignores = evaluate(ScriptedLM(tok, caller(False)), tok, TOOL_EXAMPLES, CFG, CTX)
    assert (ignores["tool_correct"], ignores["tool_success"], ignores["tool_answer_correct"]) == (1.0, 1.0, 0.0)
    assert ignores["tool_answer_correct_lo"] == ignores["tool_answer_correct_hi"] == 0.0


def test_unknown_tools_and_no_calls_fail_validity(tok):
    unknown = evaluate(ScriptedLM(tok, caller(True, tool="python")), tok, TOOL_EXAMPLES, CFG, CTX)
    assert (unknown["tool_call_valid"], unknown["tool_success"], unknown["tool_valid"]) == (0.0, 0.0, 0.0)
    # It answers with what it saw ("error: unknown tool ..."), which is not the number.
    assert unknown["tool_answer_correct"] == 0.0
    direct = evaluate(ScriptedLM(tok, lambda head: " The answer is 391.\n"), tok, TOOL_EXAMPLES, CFG, CTX)
    assert (direct["tool_call_valid"], direct["tool_success"]) == (0.0, 0.0)
    assert direct["tool_answer_correct"] == pytest.approx(1 / 3)  # right without a tool for 17 * 23 only


@pytest.fixture(scope="module")
def system_examples() -> list[Example]:
    return generate_synthetic(SyntheticConfig(n_examples=120, kinds={"system": 1.0}), seed=5)[:40]


def oracle(examples: Sequence[Example], transform=lambda reply: reply):
    """Writes each example's reference reply (step by step), final replies passed through ``transform``."""
    texts = [ex.text for ex in examples]

    def policy(head: str) -> str:
        text = next(t for t in texts if t.startswith(head))
        rest = text[len(head):]
        end = min(i + len(s) for s in ("</tool>", "\n") if (i := rest.find(s)) >= 0)
        step = rest[:end]
        return step if "</tool>" in step else " " + transform(step.strip()) + "\n"

    return policy


def test_reference_replies_obey_every_rule_and_policy(tok, system_examples):
    m = evaluate(ScriptedLM(tok, oracle(system_examples)), tok, system_examples, CFG, CTX)
    assert m["n_system"] == 40 and m["n_persona"] > 10 and m["n_tool_loop"] > 5 and m["n_system_answer"] > 5
    for key in ("persona_rule_adherence", "system_tool_policy", "system_answer_correct", "tool_call_valid",
                "tool_success", "tool_answer_correct"):
        assert m[key] == 1.0, key


def _unstyled(reply: str) -> str:
    """The reply of an assistant that ignores the persona: no greeting, no sign-off, lower case."""
    for prefix in ("Hey! ", "Certainly. "):
        reply = reply.removeprefix(prefix)
    return reply.removesuffix(" - Nova").lower()


def test_ignoring_the_persona_is_caught(tok, system_examples):
    m = evaluate(ScriptedLM(tok, oracle(system_examples, _unstyled)), tok, system_examples, CFG, CTX)
    assert m["persona_rule_adherence"] == 0.0 and m["persona_rule_adherence_hi"] == 0.0
    assert m["system_tool_policy"] == 1.0 and m["system_answer_correct"] == 1.0  # the rest is still right


def test_calling_a_tool_the_prompt_does_not_offer_breaks_the_policy(tok, system_examples):
    def always_lookup(head: str) -> str:
        results = re.findall(r"Tool: ([^\n]*)", head)
        return f" The answer is {results[-1]}.\n" if results else " <tool>lookup(Taimora population)</tool>"

    m = evaluate(ScriptedLM(tok, always_lookup), tok, system_examples, CFG, CTX)
    offered = [parse_system_prompt(split_prompt(ex.prompt)[0]).tools for ex in system_examples]
    reference_lookups = sum("<tool>lookup(" in ex.text[len(ex.prompt):] for ex in system_examples)
    assert 0 < reference_lookups < len(system_examples)
    assert m["system_tool_policy"] == pytest.approx(reference_lookups / len(system_examples))
    assert any("lookup" not in t for t in offered) and m["tool_call_valid"] < 1.0


def test_chat_templates_put_the_system_prompt_in_the_system_slot(system_examples):
    tok = byte_tokenizer(chat=True)
    ex = next(e for e in system_examples if parse_system_prompt(split_prompt(e.prompt)[0]).persona == "Atlas")
    model = ScriptedLM(tok, lambda head: " I AM ATLAS.\n")
    m = evaluate(model, tok, [ex], CFG, CTX)
    system, question = split_prompt(ex.prompt)
    assert any(f"system\n{system}\nuser\n{question}\nassistant\n" in c for c in model.calls)
    assert not any("System: " in c for c in model.calls if "assistant\n" in c)
    assert m["n_persona"] == 1 and m["persona_rule_adherence"] == 1.0
    assert set(PERSONAS) == {"Nova", "Atlas", "Pip", "Sage"}


def test_task_families_gate_what_runs(tok):
    """Without 'tool_loop' an episode stops at its first call: the result is never fed back (a model that
    needs it would only answer after it), yet tool_correct reads the same first step as the full run."""
    steps: list[str] = []

    def counting(head: str) -> str:
        steps.append(head)
        return caller(True)(head)

    first_only = evaluate(ScriptedLM(tok, counting), tok, TOOL_EXAMPLES, CFG.model_copy(update={"tasks": ("tool",)}), CTX)
    assert not any("Tool:" in h for h in steps)  # no second generation
    assert first_only["tool_correct"] == 1.0 and "tool_answer_correct" not in first_only
    assert "loss" not in first_only and "n_arith" not in first_only and "n_choice" not in first_only
    full = evaluate(ScriptedLM(tok, counting), tok, TOOL_EXAMPLES, CFG, CTX)
    assert any("Tool:" in h for h in steps) and full["tool_correct"] == first_only["tool_correct"]


def test_fitness_runs_only_the_families_its_weights_read():
    from forge_models.config import EVAL_TASKS
    from forge_models.evomerge.fitness import tasks_for

    assert tasks_for({"arith_em": 1.0, "tool_correct": 1.0, "choice_acc": 1.0, "loss": -0.1}, EVAL_TASKS) == (
        "perplexity", "arithmetic", "tool", "choice")
    assert tasks_for({"tool_answer_correct": 1.0, "persona_rule_adherence": 0.5}, EVAL_TASKS) == ("tool_loop", "system")
    assert tasks_for({"something_new": 1.0}, EVAL_TASKS) == EVAL_TASKS  # unknown: run everything
