"""Adding a phase is one table entry: a dummy phase registered through `tasks.phases` alone is validated,
listed by `forge phase --help`, run by `forge phase dummy --input DIR` in the real flow, and stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from flows.config import ConfigProblems, load_config
from tasks.cache import phase_key
from tasks.phases import PhaseSpec, one_model_standalone, registered
from tasks.runtime import PhaseWritten, phase_task
from tasks.store import Store
from tests.factories import corpus_and_tokenizer, make_llama


def _key(config, dataset, previous) -> str:
    return phase_key("dummy", "1", "{}", [previous.digest], dataset.digest)


def _body(config, previous):
    def body(ctx, inputs, out_dir: Path) -> PhaseWritten:
        _dataset, model_root = inputs
        (src,) = [p.parent for p in model_root.glob("*/config.json")]
        shutil.copytree(src, out_dir / "model")
        size = sum(p.stat().st_size for p in (out_dir / "model").glob("*.safetensors"))
        return PhaseWritten(metrics={"weight_bytes": float(size)}, report_md="# Dummy\n\nCopied its input.\n")

    return body


dummy_task = phase_task("dummy", kind="model", key=_key, body=_body, section=None, doc="Copy the input model.")

DUMMY = PhaseSpec(
    name="dummy", order=9, title="Dummy: copies its input model", verb="copy", input_kind="model",
    output_kind="model", task=f"{__name__}:dummy_task", standalone=one_model_standalone("dummy"),
)


def test_a_phase_added_through_the_table_alone_runs_in_the_flow(prefect_harness, tmp_path, capsys):
    _corpus, tokenizer = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    folder = make_llama(tmp_path / "in", seed=0, tokenizer=False, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigProblems, match="unknown phase"):
        load_config("tiny", overrides=["phases=[dummy]"])
    with registered(DUMMY):
        assert "9. dummy" in build_parser()._subparsers._group_actions[0].choices["phase"].format_help()
        summary = tmp_path / "summary.json"
        code = main(["phase", "dummy", "--input", str(folder), "--store", f"file://{tmp_path}/store",
                     "--summary-json", str(summary), "--set", "final_test_eval=false", "--set", "tracking.enabled=false",
                     "--set", "data.synthetic.n_examples=300"])
        assert code == 0, capsys.readouterr().err
    with pytest.raises(ConfigProblems, match="unknown phase"):  # gone with its table entry
        load_config("tiny", overrides=["phases=[dummy]"])
    doc = json.loads(summary.read_text())
    assert [p["name"] for p in doc["phases"]] == ["data", "import", "dummy"]
    dummy = doc["phases"][-1]
    store = Store(f"file://{tmp_path}/store")
    manifest = store.verify(dummy["artifact"]["uri"])
    inputs = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    assert sorted(manifest["files"]) == sorted([*(f"model/{n}" for n in inputs), "phase.json", "report.md"])
    assert dummy["metrics"]["weight_bytes"] == (folder / "model.safetensors").stat().st_size
    assert json.loads(store.read_bytes(store.uri_join(dummy["artifact"]["uri"], "phase.json")))["phase"] == "dummy"
