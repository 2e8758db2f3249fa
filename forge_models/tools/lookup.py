"""``lookup(KEY)``: reads one entry of a local key-value table (by default the seeded fact table the
lookup episodes ask about, :func:`forge_models.data.facts.fact_table`).

The table is the tool's state: the same key gives the same value within and across runs, an unknown key
is an error the model sees, and the evaluation can only be passed by copying what the table holds.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

from forge_models.data.facts import fact_table, normalise_key
from forge_models.tools.registry import Tool, ToolError, ToolLimits

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _'-]*")


def parse_key(text: str, limits: ToolLimits) -> str:
    """The normalised key; ToolError for an empty, oversized or non-plain key (letters, digits, space _ ' -)."""
    key = text.strip().strip("\"'")
    if not key:
        raise ToolError("empty key; write lookup(KEY), e.g. lookup(Velmora population)")
    if len(key) > limits.max_argument_chars:
        raise ToolError(f"key too long ({len(key)} > {limits.max_argument_chars} chars)")
    if not _KEY_RE.fullmatch(key):
        raise ToolError(f"malformed key {key[:40]!r}; use letters, digits and spaces")
    return normalise_key(key)


def lookup_tool(table: Mapping[str, str] | None = None, limits: ToolLimits | None = None) -> Tool:
    """The lookup tool over ``table`` (keys are normalised; default: the seeded fact table)."""
    entries = MappingProxyType({normalise_key(k): str(v) for k, v in (table if table is not None else fact_table()).items()})

    def execute(key: str, _limits: ToolLimits) -> str:
        if key not in entries:
            raise ToolError(f"no entry for {key[:40]!r}")
        return entries[key]

    return Tool(
        name="lookup",
        description="returns the value stored under a key such as 'TOWN population', 'TOWN founded' or 'TOWN tower'.",
        usage="<tool>lookup(Velmora population)</tool>",
        parse=parse_key,
        execute=execute,
        limits=limits or ToolLimits(max_argument_chars=64),
    )
