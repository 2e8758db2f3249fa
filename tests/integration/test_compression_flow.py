"""Phase 8 in the real flow: `forge phase compression --input DIR --out OUT` on a tiny Llama folder stores a
smaller artifact that reloads, whose reported metrics are those of the reloaded artifact, and which the
final test evaluation loads (through `tasks.evaluate.load_model`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from flows.cli import main
from flows.config import load_config
from tests.factories import corpus_and_tokenizer, make_llama

SETS = ["final_test_eval=true", "tracking.enabled=false", "data.synthetic.n_examples=300", "eval.max_examples=8",
        "eval.max_new_tokens=4", "eval.ppl_max_tokens=1024", "eval.seq_len=32", "compression.seq_len=32",
        "compression.calib_sequences=8", "compression.val_sequences=4", "compression.test_sequences=4",
        "compression.max_loss_increase=100.0",
        'compression.candidates=[{name: bf16}, {name: rtn, bits: 8, group: 32}, {name: rtn, bits: 4, group: 32}]']


def test_compression_phase_in_the_flow_stores_a_smaller_reloadable_artifact(prefect_harness, tmp_path, capsys):
    from forge_models.compression.artifact import artifact_bytes, load_compressed
    from forge_models.compression.phase import mean_loss, token_blocks
    from forge_models.data import Corpus
    from forge_models.eval import evaluate
    from forge_models.runtime import PhaseContext
    from forge_models.tokenizer import load_tokenizer
    from tasks.evaluate import load_model
    from tasks.store import Store

    _corpus, tokenizer = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    folder = make_llama(tmp_path / "in", seed=0, tokenizer=False, vocab_size=len(tokenizer), hidden_size=64,
                        intermediate_size=128, max_position_embeddings=128)
    tokenizer.save_pretrained(folder)
    summary, out = tmp_path / "summary.json", tmp_path / "final"
    sets = [a for s in SETS for a in ("--set", s)]
    code = main(["phase", "compression", "--input", str(folder), "--store", f"file://{tmp_path}/store",
                 "--summary-json", str(summary), "--out", str(out), *sets])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(summary.read_text())
    assert [p["name"] for p in doc["phases"]] == ["data", "import", "compression"]
    metrics = doc["phases"][-1]["metrics"]

    # Smaller than its input, measured from the files (the exported folder is the stored one).
    in_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    stored = artifact_bytes(out)["total"]
    assert stored < in_bytes
    assert metrics["compression/bytes_total"] == stored
    assert metrics["compression/input_bytes"] == in_bytes

    # The reported metrics are those of the reloaded artifact.
    config = load_config("tiny", overrides=["phases=[cognate]", *SETS])  # only its eval section is read
    store = Store(f"file://{tmp_path}/store")
    data_uri = doc["phases"][0]["artifact"]["uri"]
    with tempfile.TemporaryDirectory() as tmp:
        store.download(data_uri, Path(tmp) / "data", only="corpus")
        corpus = Corpus.load(Path(tmp) / "data" / "corpus")
    tok = load_tokenizer(out)
    reloaded = load_compressed(out)
    held_out = corpus.split(config.eval.split)
    test_ids = token_blocks(tok, [e.text for e in held_out], 32, 4)
    assert mean_loss(reloaded, test_ids, 4) == pytest.approx(metrics["compression/test_loss"], rel=1e-5)
    harness = evaluate(reloaded, tok, held_out, config.eval, PhaseContext(seed=config.seed))
    assert harness["ppl"] == pytest.approx(metrics["compressed/ppl"], rel=1e-5)

    # The final test evaluation loaded the compressed folder; the loader picks load_compressed for it.
    assert doc["test_metrics"]["model"]["ppl"] > 1.0
    net = load_model(out, torch.device("cpu"))
    assert type(net).__name__ == type(reloaded).__name__
    test = evaluate(net, tok, corpus.split("test"), config.eval.for_split("test"), PhaseContext(seed=config.seed))
    assert test["ppl"] == pytest.approx(doc["test_metrics"]["model"]["ppl"], rel=1e-5)
