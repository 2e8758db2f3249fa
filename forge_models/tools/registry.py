"""Tools by name, each with a typed argument parser, an executor and limits; calls never raise.

A model calls a tool by writing ``<tool>NAME(ARGUMENTS)</tool>``. :meth:`ToolRegistry.call` parses and
checks the arguments, runs the tool under its limits and returns a :class:`ToolCall` whose ``result`` is
what the model sees next (``Tool: RESULT``). Every failure, an unknown tool, malformed or oversized
arguments, an input that exceeds a bound, a tool that overruns its time, becomes a result string
``error: ...`` with ``ok=False``: a bad call is an outcome the model must cope with, never an exception
that stops an evaluation.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from forge_models.runtime import ConfigError

CALL_OPEN, CALL_CLOSE = "<tool>", "</tool>"
_CALL_RE = re.compile(r"<tool>(.*?)</tool>", re.S)
_NAMED_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.S)


class ToolError(Exception):
    """Raised by a tool's parser or executor; its message becomes the ``error: ...`` result."""


class ToolLimits(BaseModel):
    """Bounds on one call of one tool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_argument_chars: int = Field(200, ge=1, le=100_000, description="Longest argument string accepted.")
    max_output_chars: int = Field(200, ge=16, le=100_000, description="Longer results are refused (error), not cut.")
    timeout_s: float = Field(
        1.0, gt=0, le=60, description="Wall time of one call; a call still running then is answered with an error."
    )
    max_depth: int = Field(32, ge=1, le=200, description="Deepest nesting an argument may have (e.g. parentheses).")


@dataclass(frozen=True)
class Tool:
    """One tool: ``parse`` turns the argument string into a typed value (or raises ToolError), ``execute``
    turns that value into the result string (or raises ToolError)."""

    name: str
    description: str
    usage: str
    parse: Callable[[str, ToolLimits], Any]
    execute: Callable[[Any, ToolLimits], str]
    limits: ToolLimits = ToolLimits()


@dataclass(frozen=True)
class ToolCall:
    """One call as the runtime saw it: ``result`` is what the model was shown (an ``error: ...`` when not ok)."""

    name: str
    arguments: str
    result: str
    ok: bool
    error: str | None


def parse_call(inner: str) -> tuple[str, str] | None:
    """``"calculator(2 + 3)"`` -> ``("calculator", "2 + 3")``; None when it is not ``NAME(ARGUMENTS)``."""
    match = _NAMED_RE.match(inner)
    return (match.group(1), match.group(2).strip()) if match else None


def find_calls(text: str) -> list[str]:
    """The inside of every ``<tool>...</tool>`` in ``text``, in order."""
    return _CALL_RE.findall(text)


class ToolRegistry:
    """An immutable name -> :class:`Tool` table."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        table: dict[str, Tool] = {}
        for tool in tools:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tool.name):
                raise ConfigError(f"tool name {tool.name!r} is not an identifier")
            if tool.name in table:
                raise ConfigError(f"tool {tool.name!r} registered twice")
            table[tool.name] = tool
        self._tools: Mapping[str, Tool] = table

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        if name not in self._tools:
            raise ConfigError(f"unknown tool {name!r}; registered: {list(self._tools)}")
        return self._tools[name]

    def subset(self, names: Iterable[str]) -> "ToolRegistry":
        """A registry with only ``names`` (e.g. the tools a system prompt makes available)."""
        return ToolRegistry(self[n] for n in names)

    def describe(self) -> str:
        """One line per tool (for a system prompt): ``name: description Call: usage``."""
        return "\n".join(f"{t.name}: {t.description} Call: {t.usage}" for t in self._tools.values())

    def call(self, name: str, arguments: str) -> ToolCall:
        """Run tool ``name`` on ``arguments`` under its limits; every failure is an ``error: ...`` result."""
        if name not in self._tools:
            known = ", ".join(self._tools) or "none"
            return _failed(name, arguments, f"unknown tool {name[:40]!r}; available: {known}")
        tool = self._tools[name]
        limits = tool.limits
        if len(arguments) > limits.max_argument_chars:
            return _failed(name, arguments, f"arguments too long ({len(arguments)} > {limits.max_argument_chars} chars)")
        try:
            parsed = tool.parse(arguments, limits)
        except ToolError as exc:
            return _failed(name, arguments, str(exc))
        status, value = _run_with_timeout(lambda: tool.execute(parsed, limits), limits.timeout_s)
        if status == "timeout":
            return _failed(name, arguments, f"timed out after {limits.timeout_s:g} s")
        if status == "error":
            return _failed(name, arguments, value)
        if len(value) > limits.max_output_chars:
            return _failed(name, arguments, f"result too long ({len(value)} > {limits.max_output_chars} chars)")
        return ToolCall(name=name, arguments=arguments, result=value, ok=True, error=None)

    def call_text(self, inner: str) -> ToolCall:
        """Run the call written inside ``<tool>...</tool>``; a call that is not ``NAME(ARGS)`` is an error."""
        parsed = parse_call(inner)
        if parsed is None:
            return _failed("", inner, f"malformed tool call {inner[:60]!r}; write <tool>name(arguments)</tool>")
        return self.call(*parsed)


def _failed(name: str, arguments: str, message: str) -> ToolCall:
    # The model sees only "error: ..."; newlines would end the tool line of the plain transcript format.
    message = " ".join(message.split())
    return ToolCall(name=name, arguments=arguments, result=f"error: {message}", ok=False, error=message)


def _run_with_timeout(fn: Callable[[], str], timeout_s: float) -> tuple[str, str]:
    """("ok", result) | ("error", message) | ("timeout", ""). A thread that overruns is abandoned, not killed:
    Python cannot stop a thread, so every built-in tool also bounds its own work (the calculator's
    exponent, magnitude and depth bounds); the timeout only guarantees that the loop goes on."""
    box: dict[str, tuple[str, str]] = {}

    def target() -> None:
        try:
            value = fn()
            box["out"] = ("ok", value) if isinstance(value, str) else ("error", "tool returned a non-string result")
        except ToolError as exc:
            box["out"] = ("error", str(exc))
        except Exception as exc:  # a tool bug is the tool's failure, reported to the model, not a crash
            box["out"] = ("error", f"tool failed ({type(exc).__name__})")

    started = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() or "out" not in box or time.monotonic() - started > timeout_s:
        return "timeout", ""
    return box["out"]
