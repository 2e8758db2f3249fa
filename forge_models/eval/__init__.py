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

__all__ = [
    "ARITH_STOPS",
    "TOOL_STOPS",
    "choice_scores",
    "evaluate",
    "extract_answer",
    "greedy_generate",
    "parse_tool_call",
    "unigram_loss",
]
