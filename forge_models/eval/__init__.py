"""The evaluation harness shared by every phase."""

from forge_models.eval.harness import (
    ARITH_STOPS,
    TOOL_STOPS,
    choice_scores,
    evaluate,
    extract_answer,
    greedy_generate,
    parse_tool_call,
    unigram_loss,
)
from forge_models.eval.stats import (
    bootstrap_interval,
    describe_difference,
    difference_lines,
    paired_difference,
    paired_metrics,
    within_noise,
)

__all__ = [
    "ARITH_STOPS",
    "TOOL_STOPS",
    "choice_scores",
    "evaluate",
    "extract_answer",
    "greedy_generate",
    "parse_tool_call",
    "unigram_loss",
    "bootstrap_interval",
    "describe_difference",
    "difference_lines",
    "paired_difference",
    "paired_metrics",
    "within_noise",
]
