"""Fitness of an agent: accuracy on questions as ADAS scores it, the bootstrap 95% interval and its median.

The median of the bootstrap means ranks agents (as in ADAS); the interval is kept with every archive entry,
so a reader sees when two agents cannot be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from forge_models.adas.executor import Answer, Cost
from forge_models.adas.questions import Question, is_correct
from forge_models.eval.stats import bootstrap_median_interval
from forge_models.runtime import ConfigError


@dataclass(frozen=True)
class Fitness:
    """Accuracy (mean of 0/1 outcomes), the bootstrap median and (low, high) interval, and n questions."""

    accuracy: float
    median: float
    low: float
    high: float
    n: int

    def describe(self) -> str:
        """ADAS' format: "95% Bootstrap Confidence Interval: (lo%, hi%), Median: m%"."""
        return f"95% Bootstrap Confidence Interval: ({self.low:.1%}, {self.high:.1%}), Median: {self.median:.1%}"


def outcomes(questions: Sequence[Question], answers: Sequence[Answer]) -> list[float]:
    """1.0 where the answer is correct, else 0.0, in question order (answers must match questions one to one)."""
    if len(questions) != len(answers) or any(q.uid != a.uid for q, a in zip(questions, answers)):
        raise ConfigError("answers do not match the questions one to one (same uids, same order)")
    return [float(is_correct(q, a.prediction)) for q, a in zip(questions, answers)]


def fitness_of(values: Sequence[float], n_resamples: int, seed: int) -> Fitness:
    median, low, high = bootstrap_median_interval(values, n_resamples, seed)
    return Fitness(sum(values) / len(values), median, low, high, len(values))


def mean_cost(answers: Sequence[Answer]) -> Cost:
    """Cost per question, averaged over ``answers``."""
    total = Cost()
    for a in answers:
        total = total + a.cost
    n = max(1, len(answers))
    return Cost(total.model_calls / n, total.prompt_tokens / n, total.completion_tokens / n, total.seconds / n)  # type: ignore[arg-type]
