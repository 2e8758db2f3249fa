"""System-prompt conditioned dialogues: personas with checkable rules and tool instructions.

A ``system`` example is ``System: S\\nUser: Q\\nAssistant: ...`` whose right reply depends on S:

- **Persona** (optional): a name and one checkable rule, a sign-off (Nova), a format (Atlas: capital
  letters), a register (Pip: casual, starts with "Hey!"; Sage: formal, starts with "Certainly." and uses no
  contractions). Without a persona the assistant is Forge, as in the ``persona`` kind.
- **Tools** (always stated): which of ``calculator`` and ``lookup`` exist and how to call them. A question
  needing an available tool is answered through a call (``<tool>lookup(Taimora population)</tool>``, the
  runtime's result, then "The answer is N."); a calculation without the calculator is worked out directly
  ("17 * 23 = 391. The answer is 391."); a fact question without lookup is declined.

The persona's rules apply to the final reply (the text after the last tool result). :func:`rule_results`
/ :func:`obeys_persona` check a reply against them (pure functions of the system prompt, the question and
the reply), which is what the harness' ``persona_rule_adherence`` counts.

Canonical keys (for splitting, :mod:`forge_models.data.keys`): a calculation's ``calc:a op b`` (shared
with arithmetic and tool examples), a fact question's ``fact:<town> <attribute>``, any other question's
``persona:<question>`` (shared with the persona kind). A question's key ignores the system prompt, so a
held-out question is held out under every persona and tool set.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from forge_models.data.facts import ATTRIBUTES, normalise_key, town_names

SYSTEM_PREFIX, USER_PREFIX, ASSISTANT_PREFIX = "System: ", "\nUser: ", "\nAssistant:"
_PROMPT_RE = re.compile(r"^System: (.*)\nUser: (.*)\nAssistant:$", re.S)
_DIALOGUE_RE = re.compile(r"^User: (.*)\nAssistant:$", re.S)
_ANSWER_RE = re.compile(r"(?i)\bthe answer is\s+(-?\d+(?:\.\d+)?)")
_CONTRACTION_RE = re.compile(r"(?i)\b\w+'(?:t|re|m|ll|ve|d)\b")
DEFAULT_NAME = "Forge"


@dataclass(frozen=True)
class Persona:
    """A named assistant: the system-prompt sentence that sets it and the rules its replies must obey."""

    name: str
    instruction: str
    rules: tuple[str, ...]
    style: Callable[[str], str]


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona("Nova", 'You are Nova. End every reply with "- Nova".', ("name", "sign_off"), lambda r: f"{r} - Nova"),
        Persona("Atlas", "You are Atlas. Write every reply in capital letters.", ("name", "capitals"), str.upper),
        Persona("Pip", 'You are Pip, a cheerful assistant. Start every reply with "Hey!".', ("name", "greeting"),
                lambda r: f"Hey! {r}"),
        Persona("Sage", 'You are Sage, a formal assistant. Start every reply with "Certainly." and never use '
                        "contractions.", ("name", "formal"), lambda r: f"Certainly. {r}"),
    )
}

TOOLSETS: tuple[tuple[str, ...], ...] = (("calculator", "lookup"), ("calculator",), ("lookup",), ())
_TOOL_SENTENCES = {
    ("calculator", "lookup"): "Tools: calculator, lookup. Call a tool as <tool>name(input)</tool>.",
    ("calculator",): "Tools: calculator. Call it as <tool>calculator(input)</tool>.",
    ("lookup",): "Tools: lookup. Call it as <tool>lookup(input)</tool>.",
    (): "No tools are available; answer directly.",
}

IDENTITY_QUESTIONS = (
    "What is your name?", "Who are you?", "What should I call you?", "Introduce yourself.", "Tell me your name.",
    "What do people call you?", "Who am I talking to?", "Do you have a name?",
)
_HELP_TASKS = ("my homework", "a cover letter", "a shopping list", "my budget", "a birthday message", "my resume",
               "a recipe", "my travel plan", "a short poem", "an email to my boss", "my study schedule")
_CITIES = ("Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Seoul", "Rome")
_TOPICS = ("the stock market", "the lottery", "the next election", "the weather next month")
DECLINE_LOOKUP = "I cannot look that up without the lookup tool."


@dataclass(frozen=True)
class SystemSpec:
    """What a system prompt asks for: a persona (None: the default assistant) and the tools it offers."""

    persona: str | None
    tools: tuple[str, ...]


def system_prompt(persona: str | None, tools: tuple[str, ...]) -> str:
    """The system prompt for ``persona`` (a key of PERSONAS, or None) offering ``tools`` (one of TOOLSETS)."""
    parts = ([PERSONAS[persona].instruction] if persona is not None else []) + [_TOOL_SENTENCES[tuple(tools)]]
    return " ".join(parts)


def parse_system_prompt(text: str) -> SystemSpec | None:
    """The spec of a system prompt written by :func:`system_prompt`, else None."""
    for tools, sentence in _TOOL_SENTENCES.items():
        if text.endswith(sentence):
            head = text[: -len(sentence)].strip()
            if not head:
                return SystemSpec(None, tools)
            persona = next((p.name for p in PERSONAS.values() if p.instruction == head), None)
            return SystemSpec(persona, tools) if persona else None
    return None


def split_prompt(prompt: str) -> tuple[str, str] | None:
    """``"System: S\\nUser: Q\\nAssistant:"`` -> (S, Q); None for any other prompt."""
    match = _PROMPT_RE.match(prompt)
    return (match.group(1), match.group(2)) if match else None


def dialogue_question(text: str) -> str | None:
    """``"User: Q\nAssistant:"`` (a dialogue turn without a system prompt) -> Q; None for any other text."""
    match = _DIALOGUE_RE.match(text)
    return match.group(1) if match else None


def dialogue_turn(question: str) -> str:
    """``Q`` -> ``"User: Q\nAssistant:"``: a dialogue turn without a system prompt (inverse of dialogue_question)."""
    return f"{USER_PREFIX.lstrip()}{question}{ASSISTANT_PREFIX}"


def plain_turn(prompt: str) -> str:
    """A system example's prompt without its system line (``"User: Q\nAssistant:"``); other prompts as given."""
    parts = split_prompt(prompt)
    return prompt if parts is None else dialogue_turn(parts[1])


def prompt_messages(prompt: str) -> list[dict[str, str]] | None:
    """A system example's prompt as chat messages (the system prompt in the template's system slot)."""
    parts = split_prompt(prompt)
    if parts is None:
        return None
    return [{"role": "system", "content": parts[0]}, {"role": "user", "content": parts[1]}]


def final_number(reply: str) -> str | None:
    """The number after "the answer is" in any letter case ("THE ANSWER IS 7." -> "7"), else None."""
    match = _ANSWER_RE.search(reply)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------ rule checkers


def _mentions(reply: str, name: str) -> bool:
    return re.search(rf"(?i)\b{re.escape(name)}\b", reply) is not None


def rule_results(persona: str | None, question: str, reply: str) -> dict[str, bool]:
    """Whether ``reply`` (the final reply to ``question``) obeys each rule of ``persona`` (name -> bool).

    - ``name``: answering an identity question, the reply names the persona; no reply names another one.
    - ``sign_off``: ends with "- Nova". ``capitals``: has letters, none lower case.
    - ``greeting``: starts with "Hey!". ``formal``: starts with "Certainly." and has no contraction.
    """
    own = persona if persona is not None else DEFAULT_NAME
    rules = PERSONAS[persona].rules if persona is not None else ("name",)
    others = [n for n in (*PERSONAS, DEFAULT_NAME) if n != own]
    text = reply.strip()
    checks = {
        "name": (question.strip() not in IDENTITY_QUESTIONS or _mentions(text, own))
        and not any(_mentions(text, n) for n in others),
        "sign_off": text.endswith("- Nova"),
        "capitals": any(c.isalpha() for c in text) and text == text.upper(),
        "greeting": text.startswith("Hey!"),
        "formal": text.startswith("Certainly.") and not _CONTRACTION_RE.search(text),
    }
    return {rule: checks[rule] for rule in rules}


def obeys_persona(persona: str | None, question: str, reply: str) -> bool:
    """True when ``reply`` obeys every rule of ``persona`` (see :func:`rule_results`)."""
    return all(rule_results(persona, question, reply).values())


# -------------------------------------------------------------------------------------- generation


def fact_questions() -> dict[str, str]:
    """Every fact question -> its lookup key ("What is the population of Taimora?" -> "Taimora population")."""
    return {
        template.format(town=town): f"{town} {attribute}"
        for town in town_names()
        for attribute, (templates, _) in ATTRIBUTES.items()
        for template in templates
    }


_FACT_QUESTIONS = fact_questions()
_FACT_QUESTION_LIST = tuple(sorted(_FACT_QUESTIONS))


def fact_key(question: str) -> str | None:
    """The canonical key ``fact:<town> <attribute>`` of a fact question, else None."""
    key = _FACT_QUESTIONS.get(question.strip())
    return None if key is None else "fact:" + normalise_key(key)


def _chat_question(rng: random.Random) -> tuple[str, str]:
    """(question, default reply) of a conversational question; the questions are the persona kind's own."""
    task, city, topic = rng.choice(_HELP_TASKS), rng.choice(_CITIES), rng.choice(_TOPICS)
    return rng.choice((
        (f"Can you help me with {task}?", f"Yes. Tell me about {task}."),
        (f"What is the weather in {city} right now?", f"I cannot check the weather in {city}."),
        (f"What will happen with {topic}?", f"I cannot predict {topic}."),
        ("Please answer in one word: is water wet?", "Yes."),
        ("Did you make a mistake in your last answer?", "Possibly. Show me the answer and I will check it."),
    ))


def system_dialogue(
    rng: random.Random, calc: Callable[[random.Random], tuple[str, str, int]], facts: dict[str, str]
) -> tuple[str, str, str]:
    """(prompt, completion, answer) of one system-prompt dialogue.

    ``calc(rng)`` draws a calculation question as (question, "a op b", value); ``facts`` is the lookup
    table the tool reads. The completion starts after "Assistant:"; ``answer`` is the expected final
    number ("" when the reply is not a number).
    """
    persona = rng.choice((None, *PERSONAS))
    tools = rng.choice(TOOLSETS)
    style = PERSONAS[persona].style if persona is not None else (lambda r: r)
    kind = rng.choices(("identity", "chat", "calc", "fact"), weights=(3, 5, 6, 6))[0]
    call, answer = "", ""
    if kind == "identity":
        question = rng.choice(IDENTITY_QUESTIONS)
        reply = f"I am {persona}." if persona is not None else f"I am {DEFAULT_NAME}, an AI assistant."
    elif kind == "chat":
        question, reply = _chat_question(rng)
    elif kind == "calc":
        question, expression, value = calc(rng)
        answer = str(value)
        if "calculator" in tools:
            call, reply = f"calculator({expression})", f"The answer is {value}."
        else:
            reply = f"{expression} = {value}. The answer is {value}."
    else:
        question = rng.choice(_FACT_QUESTION_LIST)
        key = _FACT_QUESTIONS[question]
        if "lookup" in tools:
            answer = facts[normalise_key(key)]
            call, reply = f"lookup({key})", f"The answer is {answer}."
        else:
            reply = DECLINE_LOOKUP
    prompt = f"{SYSTEM_PREFIX}{system_prompt(persona, tools)}{USER_PREFIX}{question}{ASSISTANT_PREFIX}"
    if call:
        result = answer  # what the runtime returns for this call (the table's value / the calculation)
        completion = f" <tool>{call}</tool>\nTool: {result}\nAssistant: {style(reply)}\n"
    else:
        completion = f" {style(reply)}\n"
    return prompt, completion, answer
