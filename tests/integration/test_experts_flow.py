"""Phase 7 (experts) in the real flow: `forge phase experts --input DIR --out OUT` on a tiny Llama folder stores
the model unchanged plus an expert library that `load_experts` reads, and the reported figures are those of
the stored library. With experts.adas on, the chosen agent configuration is stored as agent.json (the
search read only validation questions), the archive and comparison are MLflow and Prefect tables, and the
served agent loads and runs it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from flows.cli import main
from flows.config import load_config
from tests.factories import corpus_and_tokenizer, make_llama

ADAS_SETS = ["experts.adas.enabled=true", "experts.adas.generations=1", "experts.adas.population=2",
             "experts.adas.validation_questions=8", "experts.adas.test_questions=8",
             "experts.adas.bootstrap_samples=200", "experts.adas.max_new_tokens=6"]

# Few-shot mixing with a token CEM budget: each skill's alpha becomes one more seed of the search.
FEWSHOT_SETS = ["experts.fewshot_shots=2", "experts.cem_population=2", "experts.cem_iterations=1"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

SETS = ["tracking.enabled=false", "data.synthetic.n_examples=400", "eval.max_examples=8", "eval.max_new_tokens=8",
        "eval.ppl_max_tokens=512", "eval.seq_len=32", "experts.steps=2", "experts.batch_size=4", "experts.samples=2",
        "experts.max_new_tokens=8", "experts.eval_examples=6", "device.threads=1"]


def test_experts_phase_stores_model_unchanged_a_loadable_library_and_the_chosen_agent(tmp_path, capsys):
    from forge_models.data import Corpus
    from forge_models.experts import SKILLS, load_experts, skill_outcomes
    from forge_models.experts.train import skill_examples
    from forge_models.runtime import PhaseContext
    from forge_models.tokenizer import load_tokenizer
    from tasks.store import Store
    from transformers import AutoModelForCausalLM

    _corpus, tokenizer = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    folder = make_llama(tmp_path / "in", seed=0, tokenizer=False, vocab_size=len(tokenizer), hidden_size=64,
                        intermediate_size=128, max_position_embeddings=256)
    tokenizer.save_pretrained(folder)
    summary, out = tmp_path / "summary.json", tmp_path / "final"
    code = main(["phase", "experts", "--input", str(folder), "--store", f"file://{tmp_path}/store",
                 "--summary-json", str(summary), "--out", str(out),
                 *[a for s in [*SETS, *ADAS_SETS, *FEWSHOT_SETS] for a in ("--set", s)],
                 "--set", "tracking.enabled=true", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0, capsys.readouterr().err[-3000:]
    doc = json.loads(summary.read_text())
    assert [p["name"] for p in doc["phases"]] == ["data", "import", "experts"]
    metrics = doc["phases"][-1]["metrics"]

    # The model is the input's, byte for byte; the library travels with it and loads with the plain function.
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    lib = load_experts(out / "experts")
    assert lib.skills == sorted(SKILLS)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    z = sum(b.rank for b in lib.bases.values())
    assert z == 2 * 3 * 64 and metrics["experts/overhead_per_expert"] == pytest.approx(z / n_params)

    # What is reported is what the stored library does: recompute one expert's outcomes on the same examples.
    config = load_config("tiny", overrides=["phases=[cognate]", *SETS])
    with tempfile.TemporaryDirectory() as tmp:
        Store(f"file://{tmp_path}/store").download(doc["phases"][0]["artifact"]["uri"], Path(tmp) / "d", only="corpus")
        corpus = Corpus.load(Path(tmp) / "d" / "corpus")
    tok = load_tokenizer(out)
    ctx = PhaseContext(seed=config.seed, precision="fp32")
    examples = skill_examples(SKILLS["persona"], corpus.split(config.eval.split))[:6]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lib.apply(model, "persona"):
        got = skill_outcomes(model, tok, SKILLS["persona"], examples, config.eval, ctx)
    assert sum(got) / len(got) == pytest.approx(metrics["experts/persona/expert"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for key in ("experts/mixed/dispatch", "experts/mixed/dispatch_minus_best_single_lo", "experts/tool/d_hi"):
        assert key in metrics
    # Few-shot mixing ran per skill: CEM evaluations counted, the mixture measured against base and own expert.
    for k in SKILLS:
        assert metrics[f"experts/{k}/fewshot_evaluations"] == 2
        assert metrics[f"experts/{k}/mixture_minus_base_lo"] <= metrics[f"experts/{k}/mixture_minus_base"]
        assert f"experts/{k}/mixture_minus_expert_hi" in metrics

    _check_adas(doc, out, f"sqlite:///{tmp_path}/mlflow.db")


def _check_adas(doc: dict, out: Path, mlflow_uri: str) -> None:
    """The same run had ``experts.adas`` on (one phase run per session: a second CLI run in this module trips over
    Prefect's console handler bound to the first test's closed capture stream)."""
    from flows.agent import Agent, ChatParams
    from forge_models.adas import AgentConfig

    metrics = doc["phases"][-1]["metrics"]
    artifact = Path(doc["phases"][-1]["artifact"]["uri"].removeprefix("file://"))

    # agent.json is in the artifact, covered by its manifest, and loads as an AgentConfig (exported too).
    chosen = AgentConfig.from_json((artifact / "agent.json").read_text())
    assert "agent.json" in json.loads((artifact / "manifest.json").read_text())["files"]
    assert AgentConfig.from_json((out / "agent.json").read_text()) == chosen
    details = json.loads((artifact / "phase.json").read_text())["details"]["adas"]
    assert details["agent"] == chosen.model_dump(mode="json")
    # The search read only validation questions; the test split was read once, afterwards.
    assert details["touched_by_search"] == {"validation": list(range(8)), "test": []}
    assert details["test_touched"] == list(range(8))
    assert metrics["experts/adas/archive_size"] == 5 + 4 + 2  # seeds (expert-dispatch too), four few-shot mixtures, proposals
    assert metrics["experts/adas/test/plain/accuracy_lo"] <= metrics["experts/adas/test/plain/accuracy"]

    # ... MLflow tables of the phase's run ...
    from mlflow.tracking import MlflowClient

    run_id = json.loads((artifact / "phase.json").read_text())["mlflow_run_id"]
    mlflow = MlflowClient(tracking_uri=mlflow_uri)
    assert {"adas_archive.json", "adas_final.json"} <= {f.path for f in mlflow.list_artifacts(run_id)}
    assert mlflow.get_run(run_id).data.metrics["experts/adas/archive_size"] == 11

    # ... and Prefect table artifacts of this run (one row per design / agent).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["experts-adas-archive", "experts-adas-final"])))}
    assert set(found) == {"experts-adas-archive", "experts-adas-final"}
    assert found["experts-adas-archive"].type == "table"
    archive = found["experts-adas-archive"].data
    archive = json.loads(archive) if isinstance(archive, str) else archive
    assert len(archive) == 11 and {r["origin"] for r in archive} >= {"seed"}
    assert {f"cem-{k}" for k in ("arithmetic", "tool", "persona", "narrative")} | {"expert-dispatch"} <= {
        r["name"] for r in archive}
    report = (artifact / "report.md").read_text()
    assert "The archive (every design, never pruned" in report and '"dispatch": true' in report

    # The served agent loads the artifact (model, experts/, agent.json) and runs the chosen configuration.
    agent = Agent.load(artifact)
    assert agent.agent_config == chosen and agent.experts is not None
    reply = agent.reply([{"role": "user", "content": "What is 2 plus 3?"}], ChatParams(max_tokens=4))
    assert reply["custom_outputs"]["agent"] == chosen.name
    assert reply["custom_outputs"]["tools"] is bool(chosen.tools)


COMPRESSION_SETS = ["compression.seq_len=32", "compression.calib_sequences=4", "compression.val_sequences=2",
                    "compression.test_sequences=2", "compression.max_loss_increase=100.0",
                    'compression.candidates=[{name: rtn, bits: 8, group: 32}, {name: rtn, bits: 4, group: 32}]']


def test_compression_carries_the_agent_and_experts_that_the_served_agent_then_runs(tmp_path, capsys, monkeypatch):
    """`forge phase experts` (ADAS on), then `forge phase compression --input <its artifact URI>`: the compressed
    folder carries agent.json as it was and the expert library basis-free, the manifest and the reported size
    count them, the report measures them, and the served agent loads them from the compressed artifact."""
    import math
    import re

    from flows.agent import Agent, ChatParams
    from forge_models.adas import AgentConfig
    from forge_models.compression.artifact import load_compressed
    from forge_models.experts import load_experts
    from transformers import AutoModelForCausalLM

    _log_to_this_test_s_stderr()
    monkeypatch.chdir(tmp_path)  # the CLI copies an --input artifact into ./forge-inputs/
    _corpus, tokenizer = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    folder = make_llama(tmp_path / "in", seed=0, tokenizer=False, vocab_size=len(tokenizer), hidden_size=64,
                        intermediate_size=128, max_position_embeddings=256)
    tokenizer.save_pretrained(folder)
    store = f"file://{tmp_path}/store"
    s7, s8, out = tmp_path / "s7.json", tmp_path / "s8.json", tmp_path / "final"
    code = main(["phase", "experts", "--input", str(folder), "--store", store, "--summary-json", str(s7),
                 *[a for s in [*SETS, *ADAS_SETS] for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err[-3000:]
    a7 = Path(json.loads(s7.read_text())["phases"][-1]["artifact"]["uri"].removeprefix("file://"))
    assert (a7 / "agent.json").is_file() and (a7 / "experts" / "basis.safetensors").is_file()

    code = main(["phase", "compression", "--input", f"file://{a7}", "--store", store, "--summary-json", str(s8),
                 "--out", str(out), *[a for s in [*SETS, *COMPRESSION_SETS] for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err[-3000:]
    doc = json.loads(s8.read_text())
    assert doc["phases"][-1]["name"] == "compression"
    metrics = doc["phases"][-1]["metrics"]
    a8 = Path(doc["phases"][-1]["artifact"]["uri"].removeprefix("file://"))
    model_dir = a8 / "model"

    # agent.json as phase 7 wrote it; the library basis-free (z and trained S, no U/Vh).
    assert (model_dir / "agent.json").read_bytes() == (a7 / "agent.json").read_bytes()
    carried = sorted(p.name for p in (model_dir / "experts").iterdir())
    assert "experts.safetensors" in carried and "basis.safetensors" not in carried
    assert (out / "agent.json").read_bytes() == (a7 / "agent.json").read_bytes()  # the export is the stored folder

    # The manifest covers them, with their sizes.
    files = json.loads((a8 / "manifest.json").read_text())["files"]
    assert {f for f in files if f.startswith("model/experts/")} == {f"model/experts/{n}" for n in carried}
    attached = [model_dir / "agent.json", *[model_dir / "experts" / n for n in carried]]
    for p in attached:
        assert int(files[p.relative_to(a8).as_posix()]["size"]) == p.stat().st_size

    # The reported size is the folder's on disk, attachments included.
    on_disk = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    attachment_bytes = sum(p.stat().st_size for p in attached)
    assert metrics["compression/bytes_total"] == on_disk
    assert metrics["compression/bytes_attachments"] == attachment_bytes > 0

    # The report's section on them, with measured (finite) figures that are the phase's metrics.
    report = (a8 / "report.md").read_text()
    assert "## Carried from phase 7" in report
    section = report.split("## Carried from phase 7", 1)[1]
    assert f"{attachment_bytes:,} bytes" in section and "nan" not in section.lower()
    for key, fmt in (("experts_s_rel_change_max", ".3g"), ("experts_alignment_mean", ".3f")):
        value = metrics[f"compression/{key}"]
        assert math.isfinite(value) and f"{value:{fmt}}" in section, (key, value)
    assert metrics["compression/experts_targets"] == 6 and metrics["compression/experts_s_rel_change_max"] > 0
    lib7 = load_experts(a7 / "experts")
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip() in lib7.skills]
    assert rows, section
    numbers = [float(x) for r in rows for x in re.findall(r"[-+]?\d+\.\d+", r)]
    assert numbers and all(math.isfinite(x) for x in numbers)

    # The served agent: the compressed model, agent.json and the experts (re-based on the decoded weights).
    chosen = AgentConfig.from_json((a7 / "agent.json").read_text())
    agent = Agent.load(a8)
    assert sorted(agent.attachments) == ["agent.json", "experts"] and agent.agent_config == chosen
    assert agent.experts.skills == lib7.skills and set(agent.experts.rebased) == set(lib7.bases)
    reply = agent.reply([{"role": "user", "content": "What is 2 plus 3?"}], ChatParams(max_tokens=4))
    assert reply["custom_outputs"]["agent"] == chosen.name and reply["usage"]["completion_tokens"] >= 1

    skill = next(iter(chosen.experts), lib7.skills[0])
    ids = torch.tensor([tokenizer.encode("User: What is 2 plus 3?\nAssistant:")])
    before = {k: v.clone() for k, v in agent.model.state_dict().items()}
    with torch.no_grad():
        base = agent.model(input_ids=ids).logits
        with agent.experts.apply(agent.model, skill):
            expert = agent.model(input_ids=ids).logits
        after = agent.model(input_ids=ids).logits
    # The agent serves the compressed weights (as load_compressed decodes them), not phase 7's.
    uncompressed = AutoModelForCausalLM.from_pretrained(a7 / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(load_compressed(model_dir).eval()(input_ids=ids).logits, base)
        assert not torch.allclose(uncompressed(input_ids=ids).logits, base)
    assert (expert - base).abs().max() > 1e-5
    assert torch.equal(after, base)
    assert all(torch.equal(v, before[k]) for k, v in agent.model.state_dict().items())


def _log_to_this_test_s_stderr() -> None:
    """Point the log handlers an earlier test's CLI run set up (Prefect's console handler, the root handler of
    ``logging.basicConfig``) at this test's stderr: they still hold that test's closed capture stream, and a
    flow run logging there fails (the reason the test above runs one phase per session)."""
    import logging
    import sys

    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    for handler in {h for x in loggers for h in x.handlers}:
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr  # not setStream: it flushes the closed stream first
            if getattr(handler, "console", None) is not None:  # Prefect's handler prints through a rich Console
                handler.console.file = sys.stderr
