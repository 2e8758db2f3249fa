"""Bad input at scale: property-based fuzzing (hypothesis) of ``--set`` configs, merge recipes and calculator tool
calls. Every case is accepted or rejected with the project's own clear error (ConfigProblems / ConfigError)
before any compute; none raises anything else, none hangs (a deadline per example). Example counts are small and
the runs derandomised, so the suite is quick and reproducible on a loaded machine.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.config import ConfigProblems, load_config
from forge_models.eval.harness import parse_tool_call
from forge_models.merge.plan import build_plan
from forge_models.merge.recipe import MergeRecipe
from forge_models.runtime import ConfigError

pytestmark = pytest.mark.fault

FUZZ = settings(max_examples=40, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# ------------------------------------------------------------------------------ configs

KEYS = ["phases", "seed", "name", "store.url", "device.device", "device.precision", "device.threads",
        "cognate.trunk.steps", "cognate.trunk.lr", "cognate.arch.hidden_size", "cognate.variants",
        "cognate.source", "cognate.base_models", "evomerge.generations", "evomerge.population", "evomerge.strategy",
        "evomerge.models", "evomerge.base_model", "bitnet.steps", "bitnet.input_model", "training.stages",
        "compression.budget_bytes", "eval.seq_len", "data.tokenizer.vocab_size", "data.synthetic.n_examples",
        "tracking.enabled", "nope", "cognate.nope", "cognate", "."]
VALUES = st.one_of(
    st.sampled_from(["1", "0", "-1", "1e9", "nan", "inf", "true", "null", "[]", "{}", "[cognate]",
                     "[cognate, evomerge]", "[bitnet, cognate]", "[baking]", "cpu", "cuda:7", "fp32", "int3",
                     "'s3://b/p'", "ftp://x", "[{name: x}]", "{a: [1, {b: 2}]}", "!!python/object:os.system ls",
                     "[unclosed", "'", "a: b: c", "\t", ""]),
    st.text(max_size=20),
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
SETS = st.lists(st.one_of(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                          st.text(max_size=15)), max_size=4)

seen = {"accepted": 0, "rejected": 0}


@FUZZ
@given(SETS)
def test_fuzzed_set_overrides_are_accepted_or_rejected_clearly(sets):
    try:
        cfg = load_config("tiny", overrides=sets)
    except ConfigProblems as exc:
        assert exc.args and str(exc).strip(), "a rejection without a message"
        seen["rejected"] += 1
        return
    seen["accepted"] += 1
    assert cfg.phases  # a valid ForgeConfig came back
    assert "python/object" not in str(cfg.model_dump())  # YAML tags are never constructed (safe_load)


def test_fuzz_rows(fault_row):
    fault_row(fault="fuzzed configs, recipes, tool calls",
              injected="hypothesis: 40 `--set` lists (real and bogus keys, YAML tags, NaN, huge numbers), 40 merge "
                       "recipes (bad methods, parameters, layer ranges, paths), 40 calculator calls (hostile code, "
                       "nesting, overflow, random text); derandomised",
              did="every case accepted or rejected with ConfigProblems / ConfigError before compute (recipes: "
                  "before any tensor is read); no other exception, none past the 5 s deadline; no code executed",
              lost="nothing (no compute started)")


# ------------------------------------------------------------------------------ merge recipes

NAMES = st.sampled_from(["/nonexistent/a", "/nonexistent/b", "", "../x", "base", None])
PARAMS = st.dictionaries(st.sampled_from(["weight", "density", "t", "epsilon", "lambda", "normalize", "bogus"]),
                         st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                                   st.booleans(), st.text(max_size=5), st.lists(st.floats(-2, 2), max_size=3)),
                         max_size=3)
RECIPES = st.fixed_dictionaries({}, optional={
    "merge_method": st.sampled_from(["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                     "passthrough", "nuslerp", "bogus", "", "LINEAR"]),
    "base_model": NAMES,
    "models": st.lists(st.fixed_dictionaries({"model": NAMES}, optional={"parameters": PARAMS}), max_size=3),
    "parameters": PARAMS,
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8", "fp8", None]),
    "tokenizer_source": st.sampled_from(["base", "union", "/nonexistent/t", None]),
    "slices": st.lists(st.fixed_dictionaries({"sources": st.lists(st.fixed_dictionaries(
        {"model": NAMES, "layer_range": st.lists(st.integers(-2, 40), min_size=0, max_size=3)}), max_size=2)}),
        max_size=2),
    "extra_key": st.integers(),
})


@FUZZ
@given(RECIPES)
def test_fuzzed_merge_recipes_fail_with_config_error_before_reading_tensors(data):
    try:
        recipe = MergeRecipe.from_dict(data)
    except ConfigError as exc:
        assert str(exc)
        return
    # accepted structurally: the plan then checks the folders, before any tensor is read (none exist here)
    with pytest.raises(ConfigError):
        build_plan(recipe)


# ------------------------------------------------------------------------------ calculator tool calls

NUMBER = st.one_of(st.integers(0, 10**6).map(str), st.floats(0, 1e6, allow_nan=False).map(lambda f: f"{f:g}"))


@st.composite
def arithmetic(draw, depth: int = 0):
    if depth > 3 or draw(st.booleans()):
        return draw(NUMBER)
    op = draw(st.sampled_from(["+", "-", "*", "/"]))
    left, right = draw(arithmetic(depth + 1)), draw(arithmetic(depth + 1))
    return draw(st.sampled_from([f"{left} {op} {right}", f"({left}){op}({right})", f"-{left}{op}{right}"]))


HOSTILE = st.sampled_from([
    "__import__('os').system('touch /tmp/forge-pwned')", "open('/etc/passwd').read()", "2**2**2**2**2", "9**999999",
    "(lambda: 1)()", "[1]*10**9", "'a'*10**9", "1 if True else 0", "x", "1;2", "1e308*10", "True+1", "1/0", "0/0",
    "(" * 300 + "1" + ")" * 300, "1+" * 99 + "1", "--" * 90 + "1", "1_000", "0x10", "1j", "",
])


@FUZZ
@given(st.one_of(arithmetic(), HOSTILE, st.text(max_size=60)), st.text(max_size=10), st.text(max_size=10))
def test_fuzzed_calculator_calls_are_computed_or_refused_never_executed(expr, before, after):
    result = parse_tool_call(f"{before}<tool>calculator({expr})</tool>{after}")
    assert result is None or (isinstance(result[0], str) and (result[1] is None or math.isfinite(result[1])))
    if result is not None and result[1] is not None and result[0] == expr.strip():
        try:
            expected = float(eval(expr, {"__builtins__": {}}))  # noqa: S307 - only for whitelisted arithmetic
        except (ZeroDivisionError, OverflowError):
            return
        assert math.isclose(result[1], expected, rel_tol=1e-9, abs_tol=1e-9)
    import os

    assert not os.path.exists("/tmp/forge-pwned")
