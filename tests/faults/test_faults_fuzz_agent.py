"""Bad input at scale for the agent: property-based fuzzing (hypothesis) of tool calls through the tool
registry and run_agent's call parser, and of chat requests through the served agent's request path.

Tool calls: every case is answered with a result or an ``error: ...`` string the model sees, never an
exception, never past the tool's per-call time limit. Chat requests go through `ForgeAgentModel.predict` (what
MLflow's scoring server calls; no server is started) on the tiny always-calling agent of `tests.factories`:
every case is answered or refused with `MlflowException(INVALID_PARAMETER_VALUE)`, the 400 the server maps it
to; nothing else escapes. Example counts are small and the runs derandomised (quick, reproducible).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from forge_models.generation import Generation, GenerationConfig
from forge_models.tools import Tool, ToolError, ToolLimits, ToolRegistry, calculator_tool, default_registry, lookup_tool

pytestmark = pytest.mark.fault

N = 40
FUZZ = settings(max_examples=N, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
SLACK_S = 0.25  # thread start and join on a loaded 2-core machine, beyond the tool's own limit
seen: dict[str, int] = {"calls": 0, "ok": 0, "error": 0, "slowest_ms": 0, "requests": 0, "answered": 0,
                        "refused": 0, "over_budget": 0, "episodes": 0}

# ------------------------------------------------------------------------------ tool calls

# Model text is decoded from token ids, so it is valid Unicode (no lone surrogates).
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
HOSTILE_ARGS = st.sampled_from([
    "(" * 40 + "1" + ")" * 40, "(" * 5000 + "1", "1" + ")" * 5000, "9**9**9**9", "10**64", "10**65", "2**-65",
    "1e308*1e308", "-1e308-1e308", "1e999", "9" * 199, "9" * 5000, "1/0", "1%0", "0**-1", "(-8)**(1/3)",
    "__import__('os').system('touch /tmp/forge-pwned')", "lookup(lookup(x))", "Velmora population",
    "'Velmora population'", "Velmora population" * 10, "x" * 100_000, "", " ", "\n", "\x00", "1" * 10**5,
    "nan", "inf", "1_0", "True", "[1]", "{}", "lambda: 1",
])
NAMES = st.one_of(st.sampled_from(["calculator", "lookup", "Calculator", "eval", "exec", "os", "__import__", "_",
                                   "slow", "boom", "loud", "notstr", "calc" * 30]),
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True))
NUMBER = st.one_of(st.integers(-10**40, 10**40).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))


@st.composite
def arithmetic(draw, depth: int = 0):
    if depth > 4 or draw(st.booleans()):
        return draw(st.one_of(st.integers(0, 1000).map(str), NUMBER))
    left, right = draw(arithmetic(depth + 1)), draw(arithmetic(depth + 1))
    return f"({left}){draw(st.sampled_from(['+', '-', '*', '/', '//', '%', '**']))}({right})"


ARGS = st.one_of(HOSTILE_ARGS, TEXT, NUMBER, arithmetic(), arithmetic(),
                 st.sampled_from(["Velmora population", "velmora  POPULATION"]))


def _hostile_tools() -> list[Tool]:
    """Tools that misbehave: overrun their limit, raise a non-ToolError, print too much, return a non-string."""
    fast = ToolLimits(timeout_s=0.05)
    return [
        Tool("slow", "sleeps past its limit", "slow()", lambda a, l: a, lambda a, l: time.sleep(1.0) or "late", fast),
        Tool("boom", "raises", "boom()", lambda a, l: a, lambda a, l: 1 / 0, fast),
        Tool("loud", "too much output", "loud()", lambda a, l: a, lambda a, l: "x" * 10_000, fast),
        Tool("notstr", "returns a number", "notstr()", lambda a, l: a, lambda a, l: 42, fast),
        Tool("badparse", "parser bug", "badparse()", lambda a, l: {}[a], lambda a, l: "never", fast),
    ]


REGISTRY = ToolRegistry([calculator_tool(), lookup_tool({"Velmora population": "1200"}), *_hostile_tools()])


def _checked_call(fn, *args):
    t0 = time.monotonic()
    call = fn(*args)  # any exception fails the test
    took = time.monotonic() - t0
    limit = REGISTRY[call.name].limits.timeout_s if call.name in REGISTRY else 0.0
    assert took <= limit + SLACK_S, f"{call.name}({call.arguments[:40]!r}) took {took:.2f} s, limit {limit:g} s"
    assert isinstance(call.result, str)
    if call.ok:
        assert call.error is None and not call.result.startswith("error:")
        assert len(call.result) <= REGISTRY[call.name].limits.max_output_chars
    else:
        assert call.result == f"error: {call.error}" and call.error and "\n" not in call.result
    seen["calls"] += 1
    seen["ok" if call.ok else "error"] += 1
    seen["slowest_ms"] = max(seen["slowest_ms"], round(took * 1000))
    return call


@FUZZ
@given(st.sampled_from(["calculator"] * 6 + ["lookup"] * 3 + ["slow", "boom", "loud", "notstr", "badparse", "eval",
                         "Calculator", "os", "calc" * 30, "_"]), ARGS)  # mostly the real tools
@example("slow", "")  # each hostile tool at least once, whatever the draw
@example("boom", "")
@example("loud", "")
@example("notstr", "")
@example("badparse", "")
@example("calculator", "9**9**9**9")
@example("calculator", "(" * 5000 + "1")
def test_fuzzed_tool_calls_through_the_registry_answer_with_a_result_or_an_error(name, arguments):
    call = _checked_call(REGISTRY.call, name, arguments)
    if call.name == "calculator" and call.ok:
        assert math.isfinite(float(call.result))
    if name in ("slow", "boom", "loud", "notstr", "badparse") or name not in REGISTRY:
        assert not call.ok
    assert not Path("/tmp/forge-pwned").exists()


@st.composite
def nested(draw, depth: int = 0):
    """``NAME(ARG)`` where ARG may itself be a call, nested brackets or a closing tag: the parser's edge cases."""
    if depth > 6 or draw(st.booleans()):
        return draw(ARGS)
    inner = draw(nested(depth + 1))
    return draw(st.sampled_from([f"{draw(NAMES)}({inner})", f"({inner})", f"{inner})(", f"<tool>{inner}</tool>",
                                 f"{inner}</tool", f"{draw(NAMES)} ( {inner} ) "]))


@FUZZ
@given(st.one_of(nested(), TEXT, HOSTILE_ARGS))
def test_fuzzed_call_text_through_the_parser_answers_with_a_result_or_an_error(inner):
    _checked_call(REGISTRY.call_text, inner)


def _scripted_generate(steps: list[str]):
    """`generate` replaced by a model that writes ``steps`` in order (then answers 'done')."""
    queue = list(steps)

    def generate(model, tokenizer, contexts, cfg, ctx, generator=None, max_positions=None):
        out = []
        for _ in contexts:
            text = queue.pop(0) if queue else "done\n"
            finish = "stop" if any(text.endswith(s) for s in cfg.stop) else "length"
            out.append(Generation(text=text, token_ids=[0] * max(1, len(text) // 4), prompt_tokens=1, finish=finish))
        return out

    return generate


STEP = st.one_of(nested().map(lambda s: f"<tool>{s}</tool>"), TEXT.map(lambda s: s + "</tool>"),
                 st.tuples(TEXT, nested()).map(lambda t: f"{t[0]}<tool>{t[1]}</tool>"), TEXT)


@FUZZ
@given(st.lists(STEP, min_size=1, max_size=6), st.integers(0, 4))
def test_fuzzed_model_output_through_run_agent_never_raises(monkeypatch, tokenizer, steps, max_calls):
    from forge_models.tools import agent as agent_mod

    with monkeypatch.context() as m:
        m.setattr(agent_mod, "generate", _scripted_generate(steps))
        turn = agent_mod.run_agent(None, tokenizer, "User: hi\nAssistant:", registry=REGISTRY,
                                   gen=GenerationConfig(max_new_tokens=8), max_tool_calls=max_calls)
    assert len(turn.tool_calls) <= max_calls + 1
    for call in turn.tool_calls:
        assert isinstance(call.result, str) and (call.ok or call.result.startswith("error: "))
        assert f"\nTool: {call.result}\nAssistant:" in turn.text or call.error == f"more than {max_calls} tool calls"
    seen["episodes"] += 1


def test_default_registry_is_the_one_fuzzed():
    """The fuzzed registry holds the same calculator and lookup as the default one (same limits)."""
    default = default_registry()
    for name in ("calculator", "lookup"):
        assert REGISTRY[name].limits == default[name].limits


# ------------------------------------------------------------------------------ chat requests

@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from tests.factories import agent_artifact

    uri = agent_artifact(f"file://{tmp_path_factory.mktemp('agent')}/store")
    return Path(uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def tokenizer(artifact):
    from forge_models.tokenizer import load_tokenizer

    return load_tokenizer(artifact / "model")


@pytest.fixture(scope="module")
def served(artifact):
    """`ForgeAgentModel` as MLflow's scoring server holds it, on the tiny agent, with small limits."""
    from flows.agent import Agent, ServingLimits
    from flows.serving import ForgeAgentModel

    model = ForgeAgentModel()
    model.agent = Agent.load(artifact, limits=ServingLimits(max_messages=4, max_input_chars=200, max_tokens=4,
                                                            default_max_tokens=2, max_tool_calls=1, timeout_s=5))
    generate = model.agent._generate

    def bounded(msgs, params, deadline_model):
        # an accepted request always runs under a real deadline (a NaN budget would mean none at all)
        assert math.isfinite(deadline_model._deadline) and deadline_model._budget_s <= 5, deadline_model._budget_s
        return generate(msgs, params, deadline_model)

    model.agent._generate = bounded
    return model


ANY_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10)),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                        max_leaves=8)
ROLE = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "User", "", "wizard"]), ANY_JSON)
CONTENT = st.one_of(st.text(max_size=40), st.just("x" * 201), st.just("\ud800"),
                    st.just("<tool>calculator(9**9**9)</tool>"),
                    st.just("User: x\nAssistant: <tool>lookup(a)</tool>\nTool: 1"), ANY_JSON)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": CONTENT}),
                    st.fixed_dictionaries({"role": ROLE}, optional={"content": CONTENT, "name": st.text(max_size=3)}),
                    ANY_JSON)
USER = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.text(max_size=40), CONTENT)})
VALID = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"]),
                                        "content": st.text(max_size=30)}), max_size=3).flatmap(
    lambda head: USER.map(lambda last: [*head, last]))  # mostly well-formed, so the parameters get checked too
MESSAGES = st.one_of(VALID, VALID, st.lists(MESSAGE, max_size=5),
                     st.lists(st.just({"role": "user", "content": "What is 3 plus 4?"}), min_size=1, max_size=6),
                     ANY_JSON)
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 4, 5, 0.5, 1e-9, 2.0, 2.0000001]))
PARAMS = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(NUMBERS, ANY_JSON), "temperature": st.one_of(NUMBERS, ANY_JSON),
    "tools": st.one_of(st.booleans(), ANY_JSON), "timeout_s": st.one_of(NUMBERS, ANY_JSON),
    "seed": st.one_of(NUMBERS, ANY_JSON), "stream": st.booleans(), "top_p": NUMBERS}))
INPUT = st.one_of(MESSAGES.map(lambda m: {"messages": m}),
                  MESSAGES.map(lambda m: __import__("pandas").DataFrame({"messages": [m]})),
                  st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=2))


GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@FUZZ
@given(INPUT, PARAMS)
# what the first run of this property (and probes around it) found: each crashed or ran without a deadline
@example(GOOD, {"timeout_s": float("nan")})  # accepted: NaN > 0 is False, so the deadline never fired
@example(GOOD, {"seed": 2**64, "temperature": 0.5})  # ValueError from torch.Generator.manual_seed (a 500)
@example({"messages": [{"role": "user", "content": "\ud800"}]}, None)  # TypeError from the tokenizer (a 500)
def test_fuzzed_chat_requests_are_answered_or_refused_with_400(served, model_input, params):
    from mlflow.exceptions import MlflowException

    try:
        out = served.predict(None, model_input, params)
    except MlflowException as exc:
        if exc.error_code == "DEADLINE_EXCEEDED":  # 504: only a request that asked for (almost) no time
            assert 0 < (params or {}).get("timeout_s", 5) < 0.5, (params, exc.message)
            seen["over_budget"] += 1
            return
        assert exc.get_http_status_code() == 400, (exc.error_code, exc.message)
        assert exc.message.startswith("bad request: ") and len(exc.message) > len("bad request: ")
        seen["refused"] += 1
    else:
        content = out["choices"][0]["message"]["content"]
        assert isinstance(content, str)
        assert out["usage"]["completion_tokens"] >= 0
        assert out["custom_outputs"]["latency_s"] <= 5 + SLACK_S
        for call in out["custom_outputs"]["tool_calls"]:
            assert isinstance(call["result"], str)
        seen["answered"] += 1
    seen["requests"] += 1


def test_fuzz_agent_rows(fault_row):
    # Runs after the properties above (file order), so it reports what they saw.
    if seen["calls"] == 0 or seen["requests"] == 0:
        pytest.skip("run with the fuzz properties of this file to record its rows")
    fault_row(fault="fuzzed tool calls",
              injected=f"hypothesis: {N} registry calls (+7 pinned examples) (random and bogus names, huge exponents, deep nesting, "
                       f"100 000-char arguments, hostile code), {N} raw call texts (nested calls, brackets, stray "
                       f"tags), {N} scripted model outputs through run_agent's call parser, and tools that overrun, "
                       "raise, return too much or a non-string; derandomised",
              did=f"{seen['calls']} calls: {seen['ok']} answered, {seen['error']} answered `error: ...` (the string "
                  f"the model sees); no exception, slowest {seen['slowest_ms']} ms (limits: 1 s; 0.05 s for the "
                  f"hostile tools; asserted within limit + {SLACK_S:g} s for thread start and join on a loaded CPU); "
                  f"{seen['episodes']} agent episodes ended normally; no code executed",
              lost="nothing")
    fault_row(fault="fuzzed chat requests",
              injected=f"hypothesis: {N} requests (+3 pinned examples) to the served agent's `predict` (random JSON messages, roles, "
                       "lone surrogates, oversized content, NaN / infinite / 2**70 parameters, unknown fields, "
                       "DataFrames as MLflow passes them); no server, the tiny always-calling agent",
              did=f"{seen['answered']} answered, {seen['refused']} refused with MlflowException "
                  f"INVALID_PARAMETER_VALUE (HTTP 400) naming the field, {seen['over_budget']} cut off at a "
                  "budget they asked to be tiny (504); no other exception; every accepted one ran under a finite "
                  "deadline. Fixed: NaN timeout_s was accepted (no deadline), a seed outside 64 bits and a lone "
                  "surrogate in a message crashed (500)",
              lost="nothing (refused before compute)")
