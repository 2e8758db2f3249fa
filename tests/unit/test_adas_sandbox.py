"""Generated agent code: the one-callable rule, the sandbox's limits, debug rounds, the meta-agent client.

No network anywhere: the meta-agents here are scripted, and the OpenAI-compatible one gets a fake transport.
"""

from __future__ import annotations

import time

import pytest

from forge_models.adas import (
    AgentCodeError, AgentConfig, CodeProposal, HeldOutSplits, final_comparison, MetaAgentError, OpenAIMetaAgent, SandboxConfig,
    SandboxTimeout, SearchConfig, check_agent_code, run_code_agent, search,
)
from forge_models.adas.config import MetaAgentConfig
from forge_models.runtime import ConfigError
from tests.unit.adas_stubs import CoinStub, binary_questions

MAJORITY_CODE = '''
from collections import Counter

def forward(task, llm):
    votes = [llm(task["prompt"], temperature=0.7).strip() for _ in range(5)]
    return Counter(votes).most_common(1)[0][0]
'''
RAISING_CODE = '''
def forward(task, llm):
    raise ValueError("this agent always fails")
'''
LOOPING_CODE = '''
def forward(task, llm):
    while True:
        pass
'''
TWO_DEFS_CODE = '''
def helper(x):
    return x

def forward(task, llm):
    return helper(llm(task["prompt"]))
'''


class ScriptedMeta:
    """Proposes the scripted codes in order; a debug request returns the same code (it cannot fix it)."""

    def __init__(self, codes: list[tuple[str, str]]) -> None:
        self.codes = list(codes)
        self.debug_calls: list[str] = []
        self.proposed: list[str] = []

    def propose(self, archive_rows):
        name, code = self.codes.pop(0)
        self.proposed.append(name)
        return CodeProposal(name=name, thought="scripted", code=code)

    def debug(self, proposal, error):
        self.debug_calls.append(proposal.name)
        return proposal


def test_one_callable_rule():
    check_agent_code(MAJORITY_CODE)
    for bad, match in ((TWO_DEFS_CODE, "exactly one"), ("x = 1\ndef forward(task, llm):\n    return 1\n", "only imports"),
                       ("def forward(task):\n    return 1\n", "two arguments"), ("def forward(:\n", "parse"),
                       ("class forward:\n    pass\n", "exactly one")):
        with pytest.raises(AgentCodeError, match=match):
            check_agent_code(bad)


def test_meta_agent_search_archive_debug_rounds_timeout_and_rule():
    val, test = binary_questions("validation", 200), binary_questions("test", 10)
    stub = CoinStub(val + test)
    meta = ScriptedMeta([("majority-code", MAJORITY_CODE), ("raises", RAISING_CODE), ("loops", LOOPING_CODE),
                         ("two-defs", TWO_DEFS_CODE)])
    seeds = [AgentConfig(name="single-call")]
    cfg = SearchConfig(generations=4, population=1, bootstrap_samples=500,
                       sandbox=SandboxConfig(wall_seconds=1.5), meta_agent=MetaAgentConfig(max_debug_rounds=3))
    start = time.monotonic()
    result = search(HeldOutSplits(val, test), stub, cfg, seeds=seeds, meta_agent=meta)
    elapsed = time.monotonic() - start
    assert meta.proposed == ["majority-code", "raises", "loops", "two-defs"]
    # archive = seeds + typed proposals + successful meta-agent generations (only the majority code)
    assert len(result.archive) == 1 + 4 + 1
    code_entries = [e for e in result.archive if e.origin == "meta-agent"]
    assert [e.name for e in code_entries] == ["majority-code"]
    maj = code_entries[0]
    assert maj.cost.model_calls == 5
    assert maj.fitness.low <= 0.68256 <= maj.fitness.high  # the code's five calls are independent draws
    assert maj.fitness.median > result.archive[0].fitness.median
    rejected = {r["name"]: r for r in result.rejected}
    # raising / looping / two-defs code: exactly 3 debug rounds each, then skipped
    assert meta.debug_calls == ["raises"] * 3 + ["loops"] * 3 + ["two-defs"] * 3
    assert rejected["raises"]["debug_rounds"] == 3 and "always fails" in rejected["raises"]["reason"]
    assert "wall-clock" in rejected["loops"]["reason"]
    assert "exactly one" in rejected["two-defs"]["reason"]
    # 4 killed attempts of the loop at 1.5 s each bound the run; nothing hung
    assert elapsed < 60


def test_infinite_loop_is_killed_by_the_wall_clock():
    q = binary_questions("validation", 2)
    start = time.monotonic()
    with pytest.raises(SandboxTimeout):
        run_code_agent(LOOPING_CODE, CoinStub(q), q, SandboxConfig(wall_seconds=1.0))
    assert time.monotonic() - start < 10


def test_model_time_is_not_charged_to_the_agent():
    q = binary_questions("validation", 3)

    class SlowStub(CoinStub):
        def generate(self, prompts, **kw):
            time.sleep(0.2)
            return super().generate(prompts, **kw)

    answers = run_code_agent(MAJORITY_CODE, SlowStub(q), q, SandboxConfig(wall_seconds=1.0))  # 3 s of model time
    assert [a.cost.model_calls for a in answers] == [5, 5, 5]


@pytest.mark.parametrize("body, message", [
    ("import socket\n    socket.socket()", "network access is disabled"),
    ("import socket\n    socket.create_connection(('127.0.0.1', 9))", "network access is disabled"),
    ("import _socket\n    _socket.socket()", "network access is disabled"),
    ("import urllib.request", "not available in the ADAS sandbox"),
    ("import ctypes", "not available in the ADAS sandbox"),
    ("import os\n    os.system('true')", "starting processes is disabled"),
    ("import posix\n    posix.fork()", "Resource temporarily unavailable"),  # RLIMIT_NPROC, not a patch
    # as root: nobody may not write here; as another user: RLIMIT_FSIZE = 0 makes the write fail (EFBIG)
    ("f = open('written-by-agent.txt', 'w')\n    f.write('x' * 10)\n    f.close()", "PermissionError|File too large"),
    ("x = bytearray(4 * 1024 ** 3)", "MemoryError"),
])
def test_sandbox_blocks_network_processes_files_and_memory(body, message):
    q = binary_questions("validation", 1)
    code = f"def forward(task, llm):\n    {body}\n    return 'yes'\n"
    with pytest.raises(AgentCodeError, match=message):
        run_code_agent(code, CoinStub(q), q, SandboxConfig(wall_seconds=5, memory_mb=256))


def test_sandbox_never_shows_the_gold_answer():
    q = binary_questions("validation", 4)
    code = "def forward(task, llm):\n    return str(sorted(task))\n"
    answers = run_code_agent(code, CoinStub(q), q, SandboxConfig())
    assert {a.prediction for a in answers} == {"['choices', 'kind', 'prompt', 'uid']"}


def test_too_many_model_calls_is_an_error():
    q = binary_questions("validation", 1)
    code = "def forward(task, llm):\n    for _ in range(50):\n        llm(task['prompt'])\n    return 'yes'\n"
    with pytest.raises(AgentCodeError, match="more than 16 model calls"):
        run_code_agent(code, CoinStub(q), q, SandboxConfig(max_llm_calls_per_question=16))


def test_openai_meta_agent_builds_the_request_and_parses_replies_without_network():
    sent = []

    def fake_post(url, payload, headers, timeout):
        sent.append((url, payload))
        return {"choices": [{"message": {"content": '```json\n{"thought": "t", "name": "n", "code": "c"}\n```'}}]}

    meta = OpenAIMetaAgent(MetaAgentConfig(url="http://meta.invalid/v1/"), post=fake_post)
    p = meta.propose([{"name": "plain", "fitness": "95% ...", "config_json": "{}"}])
    assert (p.name, p.code) == ("n", "c")
    assert sent[0][0] == "http://meta.invalid/v1/chat/completions"
    assert "plain" in sent[0][1]["messages"][1]["content"] and "forward(task, llm)" in sent[0][1]["messages"][1]["content"]
    meta.debug(p, "Traceback: boom")
    assert "boom" in sent[1][1]["messages"][1]["content"]
    bad = OpenAIMetaAgent(MetaAgentConfig(url="http://x.invalid"),
                          post=lambda *a: {"choices": [{"message": {"content": "not json"}}]})
    with pytest.raises(MetaAgentError, match="not JSON"):
        bad.propose([])
    with pytest.raises(ConfigError, match="url"):
        OpenAIMetaAgent(MetaAgentConfig())


def test_a_code_winner_is_compared_on_test_in_the_sandbox_next_to_the_best_config():
    val, test = binary_questions("validation", 300), binary_questions("test", 100)
    stub = CoinStub(val + test)
    splits = HeldOutSplits(val, test)
    cfg = SearchConfig(generations=1, population=1, bootstrap_samples=500)
    result = search(splits, stub, cfg, seeds=[AgentConfig(name="single-call")],
                    meta_agent=ScriptedMeta([("majority-code", MAJORITY_CODE)]))
    assert result.winner.code == MAJORITY_CODE and result.best_config().name in ("single-call", "g1-0")
    rows = {r["role"]: r for r in final_comparison(splits, stub, result)}
    assert rows["winner"]["name"] == "majority-code" and rows["winner"]["calls_per_query"] == 5
    assert rows["best config"]["config_json"] is not None
    assert stub.seen >= {q.uid for q in test}
