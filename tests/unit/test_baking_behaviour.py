"""Behaviour checks of a baked system prompt (forge_models.baking.behaviour): which prompts are checkable, the
reference under the baked spec, the scoring of tool-loop episodes, and the goal's interval."""

from __future__ import annotations

import numpy as np
import pytest

from forge_models.baking import behaviour
from forge_models.baking.behaviour import Case, baked_spec, behaviour_cases, compare, run_cases
from forge_models.data.facts import fact_table, normalise_key
from forge_models.data.synthetic import Example
from forge_models.data.system_prompts import PERSONAS, SystemSpec, fact_questions, system_prompt
from forge_models.runtime import PhaseContext
from forge_models.tools import AgentTurn, ToolCall

TOOLS = system_prompt(None, ("calculator", "lookup"))


def _system(question: str, persona: str | None, tools: tuple[str, ...], answer: str) -> Example:
    prompt = f"System: {system_prompt(persona, tools)}\nUser: {question}\nAssistant:"
    return Example(kind="system", text=prompt + " x\n", prompt=prompt, answer=answer)


def test_baked_spec_reads_persona_then_tools_and_nothing_else():
    nova = PERSONAS["Nova"].instruction
    assert baked_spec([nova, TOOLS]) == SystemSpec("Nova", ("calculator", "lookup"))
    assert baked_spec([TOOLS]) == SystemSpec(None, ("calculator", "lookup"))
    assert baked_spec([TOOLS, nova]) is None  # not the corpus's order: no checker knows it
    assert baked_spec(["You are Ada. Sign every answer with Ada."]) is None


def test_cases_take_the_reference_of_the_baked_spec_not_of_the_corpus_prompt():
    fact_q, key = next(iter(fact_questions().items()))
    value = fact_table()[normalise_key(key)]
    examples = [
        _system(fact_q, "Pip", ("calculator",), ""),  # declined in the corpus (no lookup there)
        _system("What is 17 * 23?", None, (), "391"),
        _system("What is your name?", "Atlas", ("lookup",), ""),
        _system("What is 17 * 23?", "Nova", ("calculator",), "391"),  # the same question again: once
        Example(kind="persona", text="User: hi\nAssistant: x\n", prompt="User: hi\nAssistant:", answer=""),
    ]
    with_all = behaviour_cases(examples, SystemSpec("Nova", ("calculator", "lookup")), limit=10)
    assert with_all == [Case(fact_q, value, ("lookup",)), Case("What is 17 * 23?", "391", ("calculator",)),
                        Case("What is your name?", None, ())]
    without = behaviour_cases(examples, SystemSpec(None, ()), limit=2)
    assert without == [Case(fact_q, None, ()), Case("What is 17 * 23?", "391", ())]


def _turn(answer: str, calls: tuple[str, ...] = ()) -> AgentTurn:
    return AgentTurn(answer=answer, tool_calls=[ToolCall(name=c, arguments="1", result="1", ok=True, error=None) for c in calls],
                     prompt_tokens=1, completion_tokens=1, text=answer)


def test_run_cases_scores_the_final_reply_and_sends_the_system_prompt_only_when_prompted(monkeypatch):
    spec = SystemSpec("Pip", ("calculator",))
    cases = [Case("What is 2 + 5?", "7", ("calculator",)), Case("What is your name?", None, ()),
             Case("Can you help me with my budget?", None, ())]
    seen = {}

    def fake_batch(model, tokenizer, prompts, *, registry, gen, ctx, max_positions):
        seen["prompts"], seen["tools"] = prompts, sorted(registry.names)
        return [_turn("Hey! The answer is 7.", ("calculator",)), _turn("I am Pip."), _turn("Hey! Yes.", ("calculator",))]

    monkeypatch.setattr(behaviour, "run_agent_batch", fake_batch)
    r = run_cases(None, None, cases, spec, prompted=True, ctx=PhaseContext())
    assert seen["prompts"][0] == [{"role": "system", "content": system_prompt("Pip", ("calculator",))},
                                  {"role": "user", "content": "What is 2 + 5?"}]
    assert seen["tools"] == ["calculator"]
    # "I am Pip." lacks Pip's greeting; the third called a tool its reference does not.
    assert r["persona_adherence"].tolist() == [1.0, 0.0, 1.0]
    assert r["answer_correct"].tolist() == [1.0]  # numeric cases only
    assert r["tool_policy"].tolist() == [1.0, 1.0, 0.0]
    run_cases(None, None, cases, spec, prompted=False, ctx=PhaseContext())
    assert seen["prompts"][0] == [{"role": "user", "content": "What is 2 + 5?"}]


def test_the_goal_is_met_within_noise_and_fails_on_a_clear_loss():
    rng = np.random.default_rng(0)
    target = {b: rng.integers(0, 2, 40).astype(float) for b in behaviour.BEHAVIOURS}
    same = compare({"input_prompted": target, "baked_plain": {b: v.copy() for b, v in target.items()}},
                   "baked_plain", "p", seed=0)
    assert same["p/goal_met"] == 1.0 and same["p/persona_adherence/baked_plain_minus_input_prompted"] == 0.0
    worse = {b: np.zeros_like(v) for b, v in target.items()}
    r = compare({"input_prompted": {b: np.ones_like(v) for b, v in target.items()}, "input_plain": worse,
                 "baked_plain": worse}, "baked_plain", "p", seed=0)
    assert r["p/goal_met"] == 0.0 and r["p/goal_informative"] == 2.0
    assert r["p/answer_correct/baked_plain_minus_input_prompted_hi"] == pytest.approx(-1.0)
    assert r["p/answer_correct/baked_plain_minus_input_plain"] == 0.0
    assert r["p/answer_correct/input_prompted_lo"] == 1.0


def test_a_behaviour_the_prompt_does_not_change_cannot_meet_the_goal_for_free():
    """A prompt the input ignores (prompted = unprompted = 0) would pass "baked >= prompted" with no bake at all:
    it is marked uninformative and left out of the goal."""
    zeros = {b: np.zeros(30) for b in behaviour.BEHAVIOURS}
    r = compare({"input_prompted": zeros, "input_plain": zeros, "baked_plain": zeros}, "baked_plain", "p", seed=0)
    assert r["p/persona_adherence/informative"] == 0.0 and r["p/goal_informative"] == 0.0
    assert "p/goal_met" not in r


def test_the_final_artifact_re_measures_the_baked_behaviour(tmp_path, monkeypatch):
    """Phase 8's task re-runs the checks on its input and on the reloaded compressed model (both unprompted),
    paired; only when the run baked a checkable system prompt."""
    from flows.config import load_config
    from forge_models.data import build_corpus
    from tasks.compression import baked_behaviour

    (tmp_path / "nova.txt").write_text(PERSONAS["Nova"].instruction)
    (tmp_path / "tools.txt").write_text(TOOLS)
    (tmp_path / "ada.txt").write_text("You are Ada.")
    prompts = f"baking.prompts=[{{name: nova, file: {tmp_path}/nova.txt}}, {{name: tools, file: {tmp_path}/tools.txt}}]"
    cfg = load_config("tiny", overrides=["phases=[cognate, baking, compression]", prompts, "baking.input_model=dialog",
                                         "data.synthetic.n_examples=600", "data.validation_percent=25"])
    held_out = build_corpus(cfg.data).split("validation")
    calls = []

    def scripted(model, tokenizer, cases, spec, *, prompted, ctx, max_new_tokens):
        calls.append((model, prompted, spec))
        n = len(cases)
        good = np.ones(n) if model == "input" else (np.arange(n) % 2 == 0).astype(float)
        return {"persona_adherence": good, "answer_correct": good[:3], "tool_policy": good}

    monkeypatch.setattr(behaviour, "run_cases", scripted)
    found, lines = baked_behaviour(cfg, "input", "compressed", None, held_out, PhaseContext())
    assert [(m, p) for m, p, _ in calls] == [("input", False), ("compressed", False)]
    assert calls[0][2] == SystemSpec("Nova", ("calculator", "lookup"))
    n = found["compression/behaviour/persona_adherence/n"]
    assert n >= 2 and found["compression/behaviour/persona_adherence/input_plain"] == 1.0
    d = "compression/behaviour/persona_adherence/compressed_plain_minus_input_plain"
    assert found[d] < 0 and found[d + "_hi"] < 0  # half the replies lost the rule: a clear drop
    assert any("Baked behaviour, re-measured" in line for line in lines)

    assert baked_behaviour(cfg.model_copy(update={"phases": ["cognate", "compression"]}), "input", "c", None,
                           held_out, PhaseContext()) == ({}, [])
    ada = load_config("tiny", overrides=["phases=[cognate, baking, compression]", "baking.input_model=dialog",
                                         f"baking.prompts=[{{name: ada, file: {tmp_path}/ada.txt}}]"])
    found, lines = baked_behaviour(ada, "input", "c", None, held_out, PhaseContext())
    assert found == {} and "not a checkable system prompt" in lines[-1]
