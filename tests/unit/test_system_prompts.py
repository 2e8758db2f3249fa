"""System-prompt data: the rule checkers accept good replies and reject bad ones; the kind splits cleanly."""

from __future__ import annotations

from collections import defaultdict

import pytest

from forge_models.config import DataConfig, SyntheticConfig
from forge_models.data import build_corpus, generate_synthetic
from forge_models.data.facts import fact_table
from forge_models.data.keys import canonical_keys
from forge_models.data.synthetic import SPLITS
from forge_models.data.system_prompts import (
    PERSONAS, TOOLSETS, final_number, obeys_persona, parse_system_prompt, prompt_messages, rule_results,
    split_prompt, system_prompt,
)


@pytest.mark.parametrize("persona, question, reply", [
    ("Nova", "What is your name?", "I am Nova. - Nova"),
    ("Nova", "Add 3 to 4.", "The answer is 7. - Nova"),
    ("Atlas", "Who are you?", "I AM ATLAS."),
    ("Atlas", "Add 3 to 4.", "3 + 4 = 7. THE ANSWER IS 7."),
    ("Pip", "Introduce yourself.", "Hey! I am Pip."),
    ("Sage", "Can you help me with a recipe?", "Certainly. Yes. Tell me about a recipe."),
    (None, "What is your name?", "I am Forge, an AI assistant."),
])
def test_rule_checkers_accept_obedient_replies(persona, question, reply):
    assert obeys_persona(persona, question, reply), rule_results(persona, question, reply)


@pytest.mark.parametrize("persona, question, reply, broken", [
    ("Nova", "Add 3 to 4.", "The answer is 7.", "sign_off"),
    ("Nova", "What is your name?", "I am Forge. - Nova", "name"),  # names another assistant
    ("Atlas", "Who are you?", "I am Atlas.", "capitals"),
    ("Atlas", "Add 3 to 4.", "7 + 3", "capitals"),  # no letters at all
    ("Atlas", "What is your name?", "I AM NOVA.", "name"),
    ("Pip", "Add 3 to 4.", "Certainly. The answer is 7.", "greeting"),
    ("Pip", "Who are you?", "Hey! I am here.", "name"),  # an identity question must be answered with the name
    ("Sage", "Can you help me with a recipe?", "Certainly. I can't help.", "formal"),
    ("Sage", "Can you help me with a recipe?", "Hey! Yes.", "formal"),
    ("Sage", "Add 3 to 4.", "", "formal"),
])
def test_rule_checkers_reject_disobedient_replies(persona, question, reply, broken):
    results = rule_results(persona, question, reply)
    assert not results[broken] and not obeys_persona(persona, question, reply)


def test_system_prompts_round_trip():
    for persona in (None, *PERSONAS):
        for tools in TOOLSETS:
            spec = parse_system_prompt(system_prompt(persona, tools))
            assert spec is not None and (spec.persona, spec.tools) == (persona, tools)
    assert parse_system_prompt("You are Bob. Tools: lookup. Call it as <tool>lookup(input)</tool>.") is None
    assert final_number("THE ANSWER IS -12. - Nova") == "-12" and final_number("twelve") is None
    assert prompt_messages("System: S\nUser: Q\nAssistant:") == [{"role": "system", "content": "S"},
                                                                  {"role": "user", "content": "Q"}]
    assert split_prompt("User: Q\nAssistant:") is None


def test_generated_dialogues_follow_their_system_prompt():
    examples = generate_synthetic(SyntheticConfig(n_examples=400, kinds={"system": 1.0}), seed=3)
    assert len(examples) == 400 and all(ex.kind == "system" for ex in examples)
    assert examples == generate_synthetic(SyntheticConfig(n_examples=400, kinds={"system": 1.0}), seed=3)
    table = fact_table()
    seen = defaultdict(int)
    for ex in examples:
        system, question = split_prompt(ex.prompt)
        spec = parse_system_prompt(system)
        completion = ex.text[len(ex.prompt):]
        final = completion.rsplit("Assistant:", 1)[-1].strip()
        assert obeys_persona(spec.persona, question, final), ex.text
        if "<tool>lookup(" in completion:
            assert "lookup" in spec.tools and ex.answer in table.values()
        if "<tool>calculator(" in completion:
            assert "calculator" in spec.tools
        if not spec.tools:
            assert "<tool>" not in completion
        if ex.answer:
            assert final_number(final) == ex.answer
        seen[(spec.persona, spec.tools)] += 1
    assert len(seen) == 5 * 4  # every persona (and none) with every tool set


def test_the_system_kind_splits_without_leakage():
    cfg = DataConfig(seed=11, validation_percent=10, test_percent=20,
                     synthetic=SyntheticConfig(n_examples=3000, kinds={"system": 2.0, "tool": 1.0, "persona": 1.0,
                                                                          "arithmetic": 1.0}))
    corpus = build_corpus(cfg)
    owner: dict[str, str] = {}
    for name in SPLITS:
        for ex in corpus.split(name):
            for key in canonical_keys(ex):
                assert owner.setdefault(key, name) == name, f"{key} is in {owner[key]} and {name}"
    held = [ex for name in ("validation", "test") for ex in corpus.split(name) if ex.kind == "system"]
    assert len(held) > 100
    # A held-out question never occurs in training, under any system prompt, in any kind.
    train_questions = {split_prompt(ex.prompt)[1] for ex in corpus.train if ex.kind == "system"}
    train_questions |= {k.removeprefix("persona:") for ex in corpus.train if ex.kind == "persona"
                        for k in canonical_keys(ex) if k.startswith("persona:")}
    held_questions = {split_prompt(ex.prompt)[1] for ex in held}
    assert not held_questions & train_questions
    # The same question under different personas and tool sets lands in one split (its key ignores them).
    fact_held = {k for ex in held for k in canonical_keys(ex) if k.startswith("fact:")}
    assert fact_held and not fact_held & {k for ex in corpus.train for k in canonical_keys(ex)}
    # Calculations shared with the arithmetic and tool kinds follow the same split.
    calc_train = {k for ex in corpus.train for k in canonical_keys(ex) if k.startswith("calc:")}
    assert not calc_train & {k for ex in held for k in canonical_keys(ex) if k.startswith("calc:")}
