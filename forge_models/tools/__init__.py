"""Tools a model can call and the loop that runs them (see docs/tools.md).

    from forge_models.tools import ToolCall, AgentTurn, ToolRegistry, default_registry, run_agent
"""

from __future__ import annotations

from typing import Mapping

from forge_models.tools.agent import AgentTurn, render_plain, run_agent, run_agent_batch
from forge_models.tools.calculator import calculator_tool
from forge_models.tools.lookup import lookup_tool
from forge_models.tools.registry import Tool, ToolCall, ToolError, ToolLimits, ToolRegistry, find_calls, parse_call


def default_registry(facts: Mapping[str, str] | None = None) -> ToolRegistry:
    """``calculator`` and ``lookup`` (over ``facts``, default: the seeded fact table the data asks about)."""
    return ToolRegistry([calculator_tool(), lookup_tool(facts)])


__all__ = [
    "AgentTurn", "Tool", "ToolCall", "ToolError", "ToolLimits", "ToolRegistry", "calculator_tool", "default_registry",
    "find_calls", "lookup_tool", "parse_call", "render_plain", "run_agent", "run_agent_batch",
]
