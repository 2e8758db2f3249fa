"""The served agent end to end: a tiny final artifact is logged, registered and aliased in a SQLite MLflow
registry, `mlflow models serve --env-manager local` is started on a free loopback port, and real HTTP
requests check the answer's schema, every bad input's 4xx, the time budget and the metrics endpoint.
The server is always stopped (its whole process group) at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.factories import CALCULATOR_CALL, agent_artifact, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NAME = "agent-forge-test"
LIMITS = {"max_tokens": 48, "max_input_chars": 2000, "max_messages": 8, "timeout_s": 30.0, "max_tool_calls": 2}


def post(url: str, body: str | bytes, timeout: float = 60) -> tuple[int, dict | str]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from flows.serving import register_agent

    tmp = tmp_path_factory.mktemp("serving")
    uri = agent_artifact(f"file://{tmp}/store")
    db = f"sqlite:///{tmp}/mlflow.db"
    reg = register_agent(uri, tracking_uri=db, name=NAME, test_metrics={"tool_correct": 0.5, "ppl": 40.0})
    assert reg["version"] == 1 and reg["model_uri"] == f"models:/{NAME}@candidate"
    port, mport = free_port(), free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=db, PYTHONPATH=str(ROOT), FORGE_METRICS_PORT=str(mport),
               FORGE_SERVING_LIMITS=json.dumps(LIMITS), OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # MLflow execs `uvicorn`
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{NAME}@candidate",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in 180 s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"invocations": f"{base}/invocations", "metrics": f"http://127.0.0.1:{mport}/metrics",
               "artifact": uri, "proc": proc}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the uvicorn worker it started
            proc.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def chat(content: str = "What is 3 plus 4?", **params) -> str:
    return json.dumps({"messages": [{"role": "user", "content": content}], **params})


def test_a_chat_request_returns_a_schema_valid_answer_with_token_counts(server):
    from tasks.store import Store

    status, body = post(server["invocations"], chat(max_tokens=6, tools=False))
    assert status == 200, body
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    # tools off: the scripted model's greedy answer is its call, as text (one token, then EOS)
    assert choice["message"] == {"role": "assistant", "content": CALCULATOR_CALL}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["custom_outputs"]["tool_calls"] == []
    # The served weights are the registered artifact's: same manifest digest.
    store = Store(server["artifact"])
    assert body["custom_outputs"]["artifact_digest"] == store.read_manifest(store.url)[1]
    # Greedy decoding is deterministic: the same request gives the same answer.
    assert post(server["invocations"], chat(max_tokens=6, tools=False))[1]["choices"] == body["choices"]


def test_with_tools_the_response_carries_the_executed_calls_and_their_results(server):
    status, body = post(server["invocations"], chat(max_tokens=8, tools=True))
    assert status == 200, body
    calls = body["custom_outputs"]["tool_calls"]
    # The model calls the calculator at every step: the runtime runs max_tool_calls (2) calls, each result
    # computed by the calculator, then refuses the next call and ends the turn.
    assert calls[:2] == [{"name": "calculator", "arguments": "3 + 4", "result": "7", "ok": True, "error": None}] * 2
    assert len(calls) == 3 and calls[2]["ok"] is False and "more than 2 tool calls" in calls[2]["error"]
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 3  # one token per step


@pytest.mark.parametrize("body, expected", [
    ("{not json", "valid JSON"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}), "last message"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                              {"role": "user", "content": "hi"}]}), "system message"),
    (json.dumps({"messages": [{"role": "user"}]}), "content"),
    (json.dumps({"messages": []}), "messages"),
    (json.dumps({"messages": "hello"}), "messages"),
    (chat("word " * 1000), "characters"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}] * 9}), "9 messages"),
    (chat(max_tokens=100000), "max_tokens"),
    (chat(max_tokens=-3), "max_tokens"),
    (chat(max_tokens="lots"), "max_tokens"),
    (chat(temperature=-1.0), "temperature"),
    (chat(timeout_s=-5.0), "timeout_s"),
])
def test_bad_input_gets_a_400_with_a_message(server, body, expected):
    status, reply = post(server["invocations"], body)
    assert status == 400, (status, reply)
    assert expected in reply["message"], reply["message"][:500]


def test_a_request_over_its_time_budget_is_cut_off(server):
    status, reply = post(server["invocations"], chat(max_tokens=48, tools=False, timeout_s=1e-6))
    assert status == 504, (status, reply)
    assert "time budget" in reply["message"]
    # the worker is free again at once
    status, _ = post(server["invocations"], chat(max_tokens=2, tools=False), timeout=30)
    assert status == 200


def test_the_metrics_endpoint_counts_the_requests_just_made(server):
    from flows.serving import stats_table

    def read() -> str:
        with urllib.request.urlopen(server["metrics"], timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()

    before = read()
    made = [post(server["invocations"], chat(max_tokens=4, tools=False)) for _ in range(3)]
    assert [s for s, _ in made] == [200, 200, 200]
    assert post(server["invocations"], chat(max_tokens=100000, tools=False))[0] == 400
    assert post(server["invocations"], chat(max_tokens=4, tools=False, timeout_s=1e-6))[0] == 504
    after = read()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("forge_agent_requests_total", route="chat", status="ok") == 3
    assert delta("forge_agent_requests_total", route="chat", status="bad_request") == 1
    assert delta("forge_agent_requests_total", route="chat", status="timeout") == 1
    assert delta("forge_agent_errors_total", route="chat") == 2
    assert delta("forge_agent_request_seconds_count", route="chat") == 5
    assert delta("forge_agent_generated_tokens_total", route="chat") == sum(b["usage"]["completion_tokens"] for _, b in made)
    tools_before = metric(after, "forge_agent_tool_calls_total", route="chat_tools", tool="calculator", ok="true")
    assert post(server["invocations"], chat(max_tokens=4, tools=True))[0] == 200
    with urllib.request.urlopen(server["metrics"], timeout=10) as r:
        last = r.read().decode()
    assert metric(last, "forge_agent_tool_calls_total", route="chat_tools", tool="calculator", ok="true") - tools_before == 2
    assert metric(last, "forge_agent_requests_total", route="chat_tools", status="ok") >= 1
    table = stats_table(last)
    assert "chat_tools" in table and "calculator(ok) " in table
