"""The served agent without a server: artifact verification on load, request checks, the time budget,
`forge promote`'s refusal of a worse version, the metrics summary and the experiment's UI kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flows.agent import Agent, BadRequest, ChatParams, OverBudget, ServingLimits, validate
from forge_models.runtime import ArtifactIntegrityError
from tests.factories import CALCULATOR_CALL, agent_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    uri = agent_artifact(f"file://{tmp_path_factory.mktemp('agent')}/store")
    return Path(uri.removeprefix("file://"))


def copy(artifact: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "agent"
    shutil.copytree(artifact, dest)
    return dest


def test_loading_verifies_the_manifest_and_answers(artifact):
    agent = Agent.load(artifact)
    out = agent.reply([{"role": "user", "content": "What is 3 plus 4?"}], ChatParams(max_tokens=4, tools=False))
    assert out["choices"][0]["message"]["content"] == CALCULATOR_CALL
    assert out["custom_outputs"]["artifact_digest"] == agent.digest


@pytest.mark.parametrize("tamper, named", [
    (lambda d: (d / "model" / "config.json").write_text((d / "model" / "config.json").read_text() + " "), "model/config.json"),
    (lambda d: (d / "model" / "model.safetensors").unlink(), "model/model.safetensors"),
    (lambda d: (d / "model" / "extra.py").write_text("import os"), "model/extra.py"),
])
def test_a_tampered_artifact_fails_to_load_naming_the_file(artifact, tmp_path, tamper, named):
    folder = copy(artifact, tmp_path)
    tamper(folder)
    with pytest.raises(ArtifactIntegrityError, match=named.replace(".", r"\.")):
        Agent.load(folder)


def test_same_size_tampering_is_caught_by_the_hash(artifact, tmp_path):
    folder = copy(artifact, tmp_path)
    weights = folder / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"model\.safetensors does not match its sha256"):
        Agent.load(folder)


LIMITS = ServingLimits(max_messages=3, max_input_chars=20, max_tokens=16)
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("messages, params, expected", [
    ([], {}, "non-empty list"),
    ("hi", {}, "non-empty list"),
    ([{"role": "wizard", "content": "hi"}], {}, "'wizard' is not one of"),
    ([{"role": "user"}], {}, "exactly the keys"),
    ([{"role": "user", "content": "hi", "name": "x"}], {}, "exactly the keys"),
    ([{"role": "user", "content": 3}], {}, "must be a string"),
    ([USER, {"role": "assistant", "content": "x"}], {}, "last message must be the user's"),
    ([USER, {"role": "system", "content": "x"}, USER], {}, "system message may only come first"),
    ([USER] * 4, {}, "4 messages, the limit is 3"),
    ([{"role": "user", "content": "x" * 21}], {}, "21 characters"),
    ([USER], {"max_tokens": 17}, "max_tokens: 17 is outside [1, 16]"),
    ([USER], {"max_tokens": -1}, "max_tokens"),
    ([USER], {"temperature": 2.5}, "temperature"),
    ([USER], {"timeout_s": 0.0}, "timeout_s"),
    ([USER], {"timeout_s": float("nan")}, "timeout_s: nan must be positive"),  # found by tests/faults fuzzing
    ([USER], {"seed": 2**64}, "seed: 18446744073709551616 is outside"),
    ([{"role": "user", "content": "a\ud800"}], {}, "messages[0].content: not valid Unicode"),
])
def test_bad_requests_are_refused_naming_the_field(messages, params, expected):
    with pytest.raises(BadRequest) as info:
        validate(messages, ChatParams(**params), LIMITS)
    assert expected in str(info.value)


def test_a_good_request_passes_unchanged():
    msgs = [{"role": "system", "content": "be brief"}, USER]
    assert validate(msgs, ChatParams(max_tokens=16), LIMITS) == msgs


def test_a_request_over_its_time_budget_is_cut_off_and_counted(artifact):
    from flows.serving import ServingMetrics

    agent = Agent.load(artifact)
    agent.metrics = ServingMetrics()
    with pytest.raises(OverBudget, match="time budget of 1e-06 s"):
        agent.reply([USER], ChatParams(max_tokens=8, tools=True, timeout_s=1e-6))
    with pytest.raises(BadRequest):
        agent.reply([USER], ChatParams(max_tokens=100000))
    agent.reply([USER], ChatParams(max_tokens=4, tools=True))
    text = agent.metrics.text()
    assert 'forge_agent_requests_total{route="chat_tools",status="timeout"} 1.0' in text
    assert 'forge_agent_requests_total{route="chat_tools",status="bad_request"} 1.0' in text
    assert 'forge_agent_requests_total{route="chat_tools",status="ok"} 1.0' in text
    assert 'forge_agent_tool_calls_total{ok="true",route="chat_tools",tool="calculator"} 4.0' in text


def test_the_deadline_stops_generation_between_forward_passes(artifact):
    import time

    from flows.agent import Deadline

    agent = Agent.load(artifact)
    model = Deadline(agent.model, time.monotonic() + 3600, 3600)
    import torch

    model(input_ids=torch.tensor([[1, 3]]))
    assert model.forwards == 1 and model.config is agent.model.config  # everything else is the model's
    late = Deadline(agent.model, time.monotonic() - 1, 0.5)
    with pytest.raises(OverBudget, match="after 0 forward passes"):
        late(input_ids=torch.tensor([[1, 3]]))


def test_compare_knows_which_direction_is_better():
    from flows.serving import compare

    assert compare({"tool_correct": 0.6, "ppl": 30.0}, {"tool_correct": 0.5, "ppl": 31.0}) == []
    worse = compare({"tool_correct": 0.4, "ppl": 32.0, "other": 1.0}, {"tool_correct": 0.5, "ppl": 31.0, "other": 9.0})
    assert [w.split(":")[0] for w in worse] == ["ppl", "tool_correct"] or [w.split(":")[0] for w in worse] == ["tool_correct", "ppl"]
    assert len(worse) == 2


def test_promote_refuses_a_worse_version_unless_forced(artifact, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.serving import PromotionRefused, promote, register_agent

    db = f"sqlite:///{tmp_path}/mlflow.db"
    uri = f"file://{artifact}"
    good = register_agent(uri, tracking_uri=db, name="a", test_metrics={"tool_correct": 0.7, "ppl": 20.0})
    bad = register_agent(uri, tracking_uri=db, name="a", test_metrics={"tool_correct": 0.5, "ppl": 19.0})
    client = MlflowClient(tracking_uri=db, registry_uri=db)
    assert str(client.get_model_version_by_alias("a", "candidate").version) == str(bad["version"])
    assert "-> version 1" in promote(db, "a", str(good["version"]), "champion")
    with pytest.raises(PromotionRefused, match=r"tool_correct: 0\.5 vs champion 0\.7"):
        promote(db, "a", str(bad["version"]), "champion")
    assert str(client.get_model_version_by_alias("a", "champion").version) == "1"
    # by run id, forced
    run_id = client.get_model_version("a", "2").run_id
    assert "forced past" in promote(db, "a", run_id, "champion", force=True)
    assert str(client.get_model_version_by_alias("a", "champion").version) == "2"
    version = client.get_model_version("a", "2")
    assert version.tags["test.tool_correct"] == "0.5" and version.tags["forge.artifact_digest"]


def test_stats_table_summarises_the_metrics_page(artifact):
    from flows.serving import ServingMetrics, stats_table

    m = ServingMetrics()
    m.observe("chat", "ok", 0.3, {"prompt_tokens": 10, "completion_tokens": 5}, [])
    m.observe("chat", "ok", 0.7, {"prompt_tokens": 10, "completion_tokens": 7}, [])
    m.observe("chat", "bad_request", 0.01, None, [])
    m.observe("chat_tools", "ok", 1.5, {"prompt_tokens": 3, "completion_tokens": 2},
              [{"name": "calculator", "ok": True}, {"name": "", "ok": False}])
    table = stats_table(m.text())
    chat = next(line for line in table.splitlines() if line.startswith("chat "))
    assert "bad_request 1, ok 2" in chat and " 12 " in chat and " 20 " in chat
    tools = next(line for line in table.splitlines() if line.startswith("chat_tools"))
    assert "calculator(ok) 1" in tools and "(failed) 1" in tools


def test_the_experiment_opens_in_the_model_training_view(tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracking

    db = f"sqlite:///{tmp_path}/mlflow.db"
    Tracking(db, "forge-exp", None)
    exp = MlflowClient(tracking_uri=db).get_experiment_by_name("forge-exp")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


# ------------------------------------------------------------------ the chosen agent configuration (agent.json)

def _agent_json(**fields) -> str:
    from forge_models.adas import AgentConfig
    return AgentConfig(name="chosen", **fields).to_json()


def test_agent_json_changes_what_the_served_agent_does(tmp_path):
    from tests.factories import agent_artifact

    question = [{"role": "user", "content": "What is 3 plus 4?"}]
    plain = Agent.load(Path(agent_artifact(f"file://{tmp_path}/s0").removeprefix("file://")))
    before = plain.reply(question, ChatParams(max_tokens=4))
    assert before["custom_outputs"]["tools"] is True and before["custom_outputs"]["tool_calls"]  # today: tools on

    # Tools off by configuration: the same model answers with its call as text, nothing executed.
    off = Agent.load(Path(agent_artifact(f"file://{tmp_path}/s1", extra={"agent.json": _agent_json()})
                          .removeprefix("file://")))
    assert off.agent_config.name == "chosen" and "agent.json" in off.attachments
    out = off.reply(question, ChatParams(max_tokens=4))
    assert out["custom_outputs"]["tools"] is False and out["custom_outputs"]["tool_calls"] == []
    assert out["choices"][0]["message"]["content"] == CALCULATOR_CALL
    assert out["custom_outputs"]["agent"] == "chosen"
    # The request still overrides the configuration.
    assert off.reply(question, ChatParams(max_tokens=4, tools=True))["custom_outputs"]["tool_calls"]

    # Three votes (self-consistency at T = 0.7): three model calls, the majority answer.
    voting = Agent.load(Path(agent_artifact(f"file://{tmp_path}/s2", extra={"agent.json": _agent_json(
        temperature=0.7, votes=3)}).removeprefix("file://")))
    one = off.reply(question, ChatParams(max_tokens=4, tools=False))
    three = voting.reply(question, ChatParams(max_tokens=4))
    assert len(three["custom_outputs"]["votes"]) == 3
    assert three["usage"]["prompt_tokens"] == 3 * one["usage"]["prompt_tokens"]
    greedy = voting.reply(question, ChatParams(max_tokens=4, temperature=0.0))  # greedy request: one call
    assert greedy["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"] and greedy["custom_outputs"]["votes"] == []


def test_a_tampered_agent_json_is_refused_naming_the_file(tmp_path):
    from tests.factories import agent_artifact

    folder = Path(agent_artifact(f"file://{tmp_path}/s", extra={"agent.json": _agent_json()}).removeprefix("file://"))
    Agent.load(folder)
    (folder / "agent.json").write_text(_agent_json(tools=("calculator",)))  # a different, valid configuration
    with pytest.raises(ArtifactIntegrityError, match=r"agent\.json"):
        Agent.load(folder)


def test_an_agent_json_needing_what_the_artifact_lacks_is_refused(tmp_path):
    from tests.factories import agent_artifact

    folder = Path(agent_artifact(f"file://{tmp_path}/s", extra={"agent.json": _agent_json(experts={"tool": 1.0})})
                  .removeprefix("file://"))
    with pytest.raises(ArtifactIntegrityError, match=r"agent\.json.*tool"):
        Agent.load(folder)


def test_a_thought_budget_is_served_with_the_quietstar_files_and_refused_without(tmp_path, monkeypatch):
    from forge_models.quietstar import generation
    from tests.factories import agent_artifact

    cfg = {"agent.json": _agent_json(thought_budget=2, tools=("calculator",))}
    bare = Path(agent_artifact(f"file://{tmp_path}/s0", extra=cfg).removeprefix("file://"))
    with pytest.raises(ArtifactIntegrityError, match=r"thought_budget 2.*no Quiet-STaR files"):
        Agent.load(bare)

    calls = []
    real = generation.thought_generate
    monkeypatch.setattr(generation, "thought_generate",
                        lambda qs, budget, step_hook=None: calls.append((budget, step_hook)) or real(qs, budget, step_hook))
    thinking = Agent.load(Path(agent_artifact(f"file://{tmp_path}/s1", extra=cfg, thoughts=True).removeprefix("file://")))
    assert "quietstar" in thinking.attachments
    question = [{"role": "user", "content": "What is 3 plus 4?"}]
    out = thinking.reply(question, ChatParams(max_tokens=4))
    # Every step went through the thought decoder with the configured budget and the request's deadline check;
    # the zero-init mixing head leaves the hand-set model's call as it was, so the loop ran it.
    assert calls and all(b == 2 and hook is not None for b, hook in calls)
    assert out["custom_outputs"]["tool_calls"] and out["custom_outputs"]["tool_calls"][0]["result"] == "7"
    # Over its time budget, the thought decoder is cut off too (it runs the trunk, not model.__call__).
    with pytest.raises(OverBudget):
        thinking.reply(question, ChatParams(max_tokens=4, timeout_s=1e-9))


def test_every_torch_call_of_the_agent_runs_on_one_thread_whatever_thread_asks(artifact, monkeypatch):
    """A web server answers on a pool of threads; loading and generation all run on the one torch thread
    (`flows.agent.on_torch_thread`: a second OpenMP team in the process slowed SmolLM2 decoding 0.59 -> 0.98 s)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import tasks.evaluate

    loaded_on, forwarded_on = set(), set()
    real_load = tasks.evaluate.load_model
    monkeypatch.setattr(tasks.evaluate, "load_model",
                        lambda *a, **k: (loaded_on.add(threading.current_thread().name), real_load(*a, **k))[1])
    agent = Agent.load(artifact)
    forward = agent.model.forward

    def spy(*args, **kwargs):
        forwarded_on.add(threading.get_ident())
        return forward(*args, **kwargs)

    agent.model.forward = spy
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: agent.reply([USER], ChatParams(max_tokens=3, tools=False)), range(8)))
    assert len(outs) == 8 and all(o["choices"][0]["message"]["content"] for o in outs)
    assert len(forwarded_on) == 1 and threading.get_ident() not in forwarded_on
    assert len(loaded_on) == 1 and next(iter(loaded_on)).startswith("forge-torch")
    with pytest.raises(OverBudget):  # raised on the torch thread, received by the caller
        agent.reply([USER], ChatParams(max_tokens=8, tools=True, timeout_s=1e-6))


def test_a_forked_child_gets_its_own_torch_thread():
    import os

    from flows.agent import on_torch_thread

    assert on_torch_thread(lambda: 1) == 1  # the parent's thread exists
    pid = os.fork()
    if pid == 0:  # the child: its inherited executor has no thread; a call must not hang
        import threading

        t = threading.Thread(target=lambda: os._exit(0 if on_torch_thread(lambda: 2) == 2 else 1), daemon=True)
        t.start()
        t.join(20)
        os._exit(3)  # hung
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------------------- a compressed artifact carrying phase 7's attachments

def _compressed_agent_artifact(tmp_path: Path) -> tuple[Path, Any]:
    """A store prefix whose ``model/`` is a compressed folder carrying agent.json and basis-free experts."""
    import torch

    from forge_models.compression.phase import CompressionConfig, CompressionInputs, run
    from forge_models.experts import ExpertLibrary, decompose, find_targets
    from forge_models.runtime import PhaseContext
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tasks.store import Store
    from tests.factories import tiny_llama

    model = tiny_llama(seed=0, vocab=64)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t1")
    bases = decompose(model, find_targets(model, ["mlp"]))
    g = torch.Generator().manual_seed(1)
    lib = ExpertLibrary(bases, {"tool": {n: torch.randn(b.rank, generator=g) * 2 for n, b in bases.items()}}, 1.0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    prefix = tmp_path / "prefix"
    run(CompressionInputs(model, tokenizer, ids, ids, ids, prefix / "model", experts=lib,
                          agent_config=_agent_json(experts={"tool": 1.0})),
        CompressionConfig(candidates=({"name": "rtn", "bits": 4, "group": 32},), target_bpw=32.0,
                          max_loss_increase=100.0), PhaseContext())
    (prefix / "phase.json").write_text(json.dumps({"phase": "compression", "metrics": {}}))
    store = Store(f"file://{tmp_path}/store")
    uri = store.uri("final")
    store.write_prefix(prefix, uri, kind="model")
    return Path(uri.removeprefix("file://")), lib


def test_the_served_agent_loads_a_compressed_artifact_s_experts_rebased(tmp_path):
    import torch

    folder, _ = _compressed_agent_artifact(tmp_path)
    agent = Agent.load(folder)
    assert sorted(agent.attachments) == ["agent.json", "experts"] and agent.agent_config.experts == {"tool": 1.0}
    assert agent.experts.rebased and agent.experts.rebase_summary()["targets_changed"] == len(agent.experts.bases)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = agent.model(input_ids=ids).logits
        with agent.experts.apply(agent.model, "tool"):
            expert = agent.model(input_ids=ids).logits
    assert (expert - base).abs().max() > 1e-3
    applied, apply = [], agent.experts.apply
    agent.experts.apply = lambda model, *a, **k: applied.append(a) or apply(model, *a, **k)
    out = agent.reply([{"role": "user", "content": "t1 t2"}], ChatParams(max_tokens=2, tools=False))
    assert out["custom_outputs"]["agent"] == "chosen" and applied == [("tool",)]
    with torch.no_grad():
        assert torch.equal(agent.model(input_ids=ids).logits, base)  # the reply restored the compressed base


def test_a_tampered_expert_vector_file_in_a_compressed_artifact_is_refused_naming_it(tmp_path):
    folder, _ = _compressed_agent_artifact(tmp_path)
    path = folder / "model" / "experts" / "experts.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"model/experts/experts\.safetensors"):
        Agent.load(folder)
