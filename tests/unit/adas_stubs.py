"""Stub models for the ADAS tests: a yes/no answerer right with probability p per call (seeded), and a
scripted tool user. Not a test module (no test_ prefix)."""

from __future__ import annotations

import random

from forge_models.adas import Capabilities, Completion, Question


def binary_questions(split: str, n: int, offset: int = 0) -> list[Question]:
    """n yes/no questions with distinct prompts; gold alternates by a seeded coin."""
    rng = random.Random(f"gold|{split}")
    return [Question(uid=f"{split}/{i}", split=split, index=i, prompt=f"Q{split[0]}{i + offset}: is it so?",
                     answer=rng.choice(("yes", "no")), choices=("yes", "no"), kind="binary", stops=("\n",))
            for i in range(n)]


class CoinStub:
    """Right with probability ``p`` per call. Greedy calls are a deterministic function of the question; sampled
    calls of (seed, question), so different seeds are independent draws."""

    def __init__(self, questions: list[Question], p: float = 0.6, caps: Capabilities | None = None) -> None:
        self.gold = {q.prompt: q.answer for q in questions}
        self.uid = {q.prompt: q.uid for q in questions}
        self.p = p
        self.caps = caps or Capabilities()
        self.seen: set[str] = set()
        self.calls = 0

    def capabilities(self) -> Capabilities:
        return self.caps

    def _question(self, prompt: str) -> str:
        head = prompt.split("?")[0] + "?"
        if head not in self.gold:
            raise KeyError(f"the stub does not know the prompt {prompt!r}")
        return head

    def generate(self, prompts, *, temperature, max_new_tokens, seed, thought_budget, expert, stop):
        outs = []
        for prompt in prompts:
            q = self._question(prompt)
            self.calls += 1
            self.seen.add(self.uid[q])
            draw = random.Random(f"greedy|{q}" if temperature == 0 else f"{seed}|{q}").random()
            gold = self.gold[q]
            text = gold if draw < self.p else ("no" if gold == "yes" else "yes")
            outs.append(Completion(" " + text, len(prompt.split()), 1))
        return outs
