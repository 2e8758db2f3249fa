"""Tools on good, malformed, oversized and hostile input: every failure is an ``error: ...`` result."""

from __future__ import annotations

import time

import pytest

from forge_models.data.facts import fact_table, normalise_key, town_names
from forge_models.runtime import ConfigError
from forge_models.tools import Tool, ToolError, ToolLimits, ToolRegistry, calculator_tool, default_registry, lookup_tool
from forge_models.tools.calculator import MAX_EXPONENT


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return default_registry()


@pytest.mark.parametrize("expr, value", [
    ("2 + 3", "5"), ("17 * 23", "391"), ("20 - 35", "-15"), ("7 / 2", "3.5"), ("6 / 3", "2"), ("-7 // 2", "-4"),
    ("17 % 5", "2"), ("2 ** 10", "1024"), ("(1 + 2) * (3 + 4)", "21"), ("-(-3)", "3"), ("2 ** -1", "0.5"),
    ("1.5 * 4", "6"),
])
def test_calculator_evaluates_plain_arithmetic(registry, expr, value):
    call = registry.call("calculator", expr)
    assert (call.ok, call.result, call.error) == (True, value, None)


@pytest.mark.parametrize("expr, message", [
    ("", "empty"), ("2 +", "not an arithmetic"), ("abc", "unsupported syntax Name"),
    ("__import__('os').system('ls')", "unsupported"), ("(lambda: 1)()", "unsupported"), ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"), ("[1, 2]", "unsupported"), ("1 if 1 else 2", "unsupported"), ("2 < 3", "unsupported"),
    ("7 / 0", "division by zero"), ("7 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("2 ** 0.5", "integer exponents"),
])
def test_calculator_answers_malformed_input_with_an_error(registry, expr, message):
    call = registry.call("calculator", expr)
    assert not call.ok and call.result == f"error: {call.error}" and message in call.error


def test_calculator_refuses_hostile_input_quickly(registry):
    hostile = [
        "9 ** 9 ** 9",  # a huge exponent: refused before it is computed
        f"2 ** {MAX_EXPONENT + 1}",
        "10 ** 31",  # within the exponent bound but beyond the magnitude bound
        "99999999999 * 99999999999 * 99999999999",
        "1e308 * 1e308",
        "(" * 40 + "1" + ")" * 40,  # deeper than max_depth, refused before parsing
        "-" * 150 + "1",  # deep unary nesting
        "1" + "+1" * 90,  # a long left-leaning chain: within the length bound, beyond the depth bound
        "9" * 201,  # oversized
    ]
    for expr in hostile:
        started = time.monotonic()
        call = registry.call("calculator", expr)
        assert not call.ok, expr
        assert call.result.startswith("error: ")
        assert time.monotonic() - started < 0.5, expr
    assert "exponent" in registry.call("calculator", "9 ** 9 ** 9").error
    assert "nested deeper" in registry.call("calculator", "(" * 40 + "1" + ")" * 40).error
    assert "too long" in registry.call("calculator", "9" * 201).error


def test_lookup_reads_the_seeded_table(registry):
    table = fact_table()
    assert fact_table() == table and len(table) == 3 * len(town_names())  # deterministic
    town = town_names()[3]
    key = f"{town} population"
    call = registry.call("lookup", f"  {town.upper()}   population ")
    assert call.ok and call.result == table[normalise_key(key)] and call.result.isdigit()
    assert fact_table(seed=1) != table  # the seed decides the values


@pytest.mark.parametrize("key, message", [
    ("", "empty key"), ("Nowhere population", "no entry"), ("x" * 65, "too long"), ("a(b)", "malformed key"),
    ("a\nb", "malformed key"),
])
def test_lookup_answers_bad_keys_with_an_error(registry, key, message):
    call = registry.call("lookup", key)
    assert not call.ok and message in call.error and "\n" not in call.result


def test_lookup_over_a_custom_table():
    reg = ToolRegistry([lookup_tool({"Capital Zed": "Q"})])
    assert reg.call("lookup", "capital zed").result == "Q"
    assert reg.names == ("lookup",)


def test_unknown_tool_and_malformed_call_are_errors(registry):
    call = registry.call("shell", "rm -rf /")
    assert not call.ok and "unknown tool 'shell'" in call.error and "calculator, lookup" in call.error
    assert not registry.call_text("calculator 2 + 3").ok
    assert registry.call_text(" calculator( 2 + 3 ) ").result == "5"
    only_lookup = registry.subset(["lookup"])
    assert "unknown tool 'calculator'" in only_lookup.call("calculator", "1 + 1").error


def test_slow_output_and_crashing_tools_are_contained():
    def slow(_: str, __: ToolLimits) -> str:
        time.sleep(1.0)
        return "late"

    def crash(_: str, __: ToolLimits) -> str:
        raise KeyError("boom")

    def chatty(_: str, __: ToolLimits) -> str:
        return "x" * 1000

    reg = ToolRegistry([
        Tool("slow", "", "", lambda a, _: a, slow, ToolLimits(timeout_s=0.05)),
        Tool("crash", "", "", lambda a, _: a, crash),
        Tool("chatty", "", "", lambda a, _: a, chatty, ToolLimits(max_output_chars=100)),
        Tool("picky", "", "", lambda a, _: (_ for _ in ()).throw(ToolError("bad argument")), chatty),
    ])
    started = time.monotonic()
    assert "timed out" in reg.call("slow", "").error
    assert time.monotonic() - started < 0.5
    assert reg.call("crash", "").error == "tool failed (KeyError)"
    assert "result too long" in reg.call("chatty", "").error
    assert reg.call("picky", "").error == "bad argument"


def test_registry_refuses_bad_definitions():
    with pytest.raises(ConfigError, match="twice"):
        ToolRegistry([calculator_tool(), calculator_tool()])
    with pytest.raises(ConfigError, match="identifier"):
        ToolRegistry([Tool("bad name", "", "", lambda a, _: a, lambda a, _: a)])
    with pytest.raises(ConfigError, match="unknown tool"):
        default_registry().subset(["python"])
