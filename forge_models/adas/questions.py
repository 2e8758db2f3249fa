"""Questions with checkable answers, and the split guard that keeps the test split out of the search.

The search may read the validation split as often as it likes; the test split is handed out once, after the
search, for the final comparison (:class:`HeldOutSplits`). Every index handed out is recorded, so a test can
assert which questions the search touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from forge_models.data.synthetic import Example
from forge_models.eval.harness import ARITH_STOPS, TOOL_STOPS
from forge_models.runtime import ConfigError, ForgeError


@dataclass(frozen=True)
class Question:
    """One question an agent answers.

    Attributes:
        uid: unique id across splits (``"validation/17"``); reports and index checks use it.
        split: the split it came from.
        index: its position in that split's question list.
        prompt: what the model is given.
        answer: the gold answer (a number as text, or the text of the correct choice). Never shown to an agent.
        choices: multiple-choice options (empty for open answers).
        kind: the task family (arithmetic, tool, persona, narrative, or anything a caller uses).
        stops: generation stops for one model call (a one-line answer stops at a newline).
    """

    uid: str
    split: str
    index: int
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    kind: str = "question"
    stops: tuple[str, ...] = ()

    def public(self) -> dict:
        """What an agent may see: no gold answer."""
        return {"uid": self.uid, "prompt": self.prompt, "choices": list(self.choices), "kind": self.kind}


def is_correct(question: Question, prediction: str | None) -> bool:
    """Whether ``prediction`` is the gold answer: the same number, or the correct choice's text (stripped)."""
    if prediction is None:
        return False
    pred = prediction.strip()
    if question.choices:
        return pred == question.answer.strip()
    gold = _number(question.answer)
    if gold is not None:
        value = _number(pred.rstrip("."))
        return value is not None and math.isclose(value, gold, rel_tol=1e-9, abs_tol=1e-9)
    return pred.lower() == question.answer.strip().lower()


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def questions_from_examples(split: str, examples: Iterable[Example], kinds: Sequence[str] = ("arithmetic", "tool", "persona", "narrative")) -> list[Question]:
    """The answer-checked examples of a corpus split as questions (what the harness checks, in its order).

    arithmetic / tool: the number; persona / narrative: the correct choice. Stops follow the harness
    (one line for arithmetic; a tool reply ends with its call or a newline).
    """
    out: list[Question] = []
    for ex in examples:
        if ex.kind not in kinds or not ex.prompt:
            continue
        if ex.kind in ("arithmetic", "tool") and ex.answer:
            stops = ARITH_STOPS if ex.kind == "arithmetic" else TOOL_STOPS
            answer, choices = ex.answer, ()
        elif ex.choices:
            stops, answer, choices = ("\n",), ex.choices[ex.label].strip(), tuple(c.strip() for c in ex.choices)
        else:
            continue
        n = len(out)
        out.append(Question(uid=f"{split}/{n}", split=split, index=n, prompt=ex.prompt, answer=answer,
                            choices=choices, kind=ex.kind, stops=tuple(stops)))
    return out


class TestSplitAlreadyRead(ForgeError):
    """The test split was asked for a second time (it is for one final comparison only)."""

    __test__ = False  # not a pytest test class, despite the name


class HeldOutSplits:
    """Validation and test questions behind an API that hands the test split out once and records every index.

    ``touched`` maps split name to the set of indices handed out so far.
    """

    def __init__(self, validation: Sequence[Question], test: Sequence[Question]) -> None:
        if not validation or not test:
            raise ConfigError("HeldOutSplits needs non-empty validation and test questions")
        for name, qs in (("validation", validation), ("test", test)):
            bad = [q.uid for q in qs if q.split != name]
            if bad:
                raise ConfigError(f"questions {bad[:3]} are not from the {name} split")
            if [q.index for q in qs] != list(range(len(qs))):
                raise ConfigError(f"{name} questions must be indexed 0..{len(qs) - 1} in order")
        overlap = {q.prompt for q in validation} & {q.prompt for q in test}
        if overlap:
            raise ConfigError(f"{len(overlap)} prompts are in both validation and test (e.g. {sorted(overlap)[0]!r})")
        self._validation = tuple(validation)
        self._test = tuple(test)
        self._test_read = False
        self.touched: dict[str, set[int]] = {"validation": set(), "test": set()}

    @property
    def n_validation(self) -> int:
        return len(self._validation)

    @property
    def n_test(self) -> int:
        return len(self._test)

    def validation(self, limit: int | None = None) -> tuple[Question, ...]:
        """The first ``limit`` validation questions (all when None); may be called any number of times."""
        qs = self._validation if limit is None else self._validation[:limit]
        self.touched["validation"].update(q.index for q in qs)
        return qs

    def read_test(self) -> tuple[Question, ...]:
        """Every test question, once; a second call raises :class:`TestSplitAlreadyRead`."""
        if self._test_read:
            raise TestSplitAlreadyRead(
                "the test split was already read for the final comparison; evaluating on it again would turn "
                "it into a second validation split. Re-run the search with a fresh split to compare again."
            )
        self._test_read = True
        self.touched["test"].update(q.index for q in self._test)
        return self._test

    @property
    def test_read(self) -> bool:
        return self._test_read
