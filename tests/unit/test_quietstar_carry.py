"""Quiet-STaR's thought machinery after the later phases: the thinker rebuilt around a BitNet-converted, packed
or compressed model (attach_thoughts), the files carried by the BitNet, training and compression tasks, the
with-vs-without-thoughts re-measurement on what each stored, and mismatched thought ids refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from forge_models.bitnet import convert_to_bitnet, export_packed, load_packed, set_quant_strength
from forge_models.quietstar import (
    QuietStar,
    QuietStarConfig,
    attach_thoughts,
    check_thought_ids,
    copy_thoughts,
    read_thoughts,
    save_quietstar,
    sequential_hidden,
    stream_hidden,
    thought_logits,
)
from forge_models.quietstar.thoughts import HEAD_FILE, META_FILE, ThoughtDecoder
from forge_models.runtime import ArtifactIntegrityError, PhaseContext
from tests.factories import corpus_and_tokenizer, save_tokenizer, tiny_cognate, tiny_llama

VOCAB = 97
FILES = (META_FILE, HEAD_FILE)


def _finite_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    """Equal where finite (the delimiters are -inf in both), and -inf at the same places."""
    fa = torch.isfinite(a)
    return torch.equal(fa, torch.isfinite(b)) and bool((a[fa] - b[fa]).abs().max() <= atol)


def _thinking_folder(make, tokenizer, folder, bias=0.4, **cfg):
    torch.manual_seed(0)
    qs = QuietStar.wrap(make(), tokenizer, QuietStarConfig(**cfg)).float()
    with torch.no_grad():
        qs.head.net[-1].bias.fill_(bias)  # w != 0: the thought changes the prediction
    save_quietstar(qs, tokenizer, folder)
    return qs


@pytest.fixture
def word_tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    save_tokenizer(tmp_path / "tok", VOCAB)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    tok.eos_token = "t1"
    return tok


@pytest.mark.parametrize("make", [tiny_llama, tiny_cognate], ids=["llama", "cognate"])
def test_streams_and_the_decoder_work_on_bitlinear_and_packed_models(make, word_tokenizer, tmp_path):
    """Only the trunk forward (4-D mask, position ids; Llama's KV cache) is used, and BitLinear quantises
    activations per token, so the parallel streams still equal the sequential reference and the last-position
    decoder the parallel pass; the packed folder thinks exactly like the BitLinear model."""
    folder = tmp_path / "qs"
    _thinking_folder(make, word_tokenizer, folder, thought_tokens=3, eval_temperature=1e-6)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    convert_to_bitnet(model, ["lm_head", "halt"], "rms")
    set_quant_strength(model, 1.0)
    qs = attach_thoughts(model.eval(), folder, word_tokenizer)
    assert not qs.training and float(qs.head.net[-1].bias.detach()) == pytest.approx(0.4)

    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, VOCAB, (2, 10), generator=g)
    th = torch.randint(2, VOCAB, (2, 10, 4), generator=g)
    th[:, :, 0] = qs.start_id
    with torch.no_grad():
        torch.testing.assert_close(stream_hidden(qs, x, th).float(), sequential_hidden(qs, x, th), atol=1e-5, rtol=1e-5)

    ids = [3, 9, 14, 2, 40, 7, 11]
    seq = torch.tensor([ids])
    got = ThoughtDecoder(qs, gen=torch.Generator().manual_seed(1)).next_logits(ids)
    ref = thought_logits(qs, seq, None, torch.Generator().manual_seed(2))
    plain = thought_logits(qs, seq, 0)
    assert _finite_close(got, ref[0, -1], 1e-4)
    assert not _finite_close(ref, plain, 1e-3)  # thinking changes the ternary model's predictions

    export_packed(model, tmp_path / "packed", tokenizer=word_tokenizer)
    packed = attach_thoughts(load_packed(tmp_path / "packed"), folder, word_tokenizer)
    assert _finite_close(thought_logits(packed, seq, None, torch.Generator().manual_seed(2)), ref, 1e-5)


def test_attach_refuses_mismatched_or_incomplete_thought_files(word_tokenizer, tmp_path):
    folder = tmp_path / "qs"
    qs = _thinking_folder(tiny_llama, word_tokenizer, folder, thought_tokens=2)
    meta = read_thoughts(folder)
    assert (meta["start_id"], meta["end_id"]) == (qs.start_id, qs.end_id) == (VOCAB, VOCAB + 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    (swapped / META_FILE).write_text(json.dumps({**meta, "start_id": meta["end_id"], "end_id": meta["start_id"]}))
    with pytest.raises(ArtifactIntegrityError, match="not the one Quiet-STaR trained with"):
        attach_thoughts(model, swapped, word_tokenizer)
    plain_tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")  # no thought tokens at all
    with pytest.raises(ArtifactIntegrityError, match="startthought"):
        check_thought_ids(meta, plain_tok)
    with pytest.raises(ArtifactIntegrityError, match="rows"):
        check_thought_ids(meta, None, vocab_rows=VOCAB)

    (swapped / HEAD_FILE).unlink()
    with pytest.raises(ArtifactIntegrityError, match="incomplete"):
        read_thoughts(swapped)
    other = tmp_path / "other"
    _thinking_folder(lambda: tiny_llama(hidden=32, inter=64), word_tokenizer, other, thought_tokens=2)
    shutil.copyfile(other / HEAD_FILE, swapped / HEAD_FILE)  # a head of another width
    (swapped / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactIntegrityError, match="does not fit"):
        attach_thoughts(model, swapped, word_tokenizer)
    assert read_thoughts(tmp_path / "tok") is None and copy_thoughts(tmp_path / "tok", tmp_path / "x") == []


# ------------------------------------------------------------------------------ the tasks


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """A dataset folder, a Quiet-STaR-like input prefix (model/ with the two files, w != 0) and the same
    model folder without them."""
    root = tmp_path_factory.mktemp("carry")
    corpus, tok = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    corpus.save(root / "data" / "corpus")
    _thinking_folder(lambda: tiny_llama(vocab=len(tok), hidden=32, inter=64, max_position_embeddings=256), tok,
                     root / "qs" / "model", bias=0.3, thought_tokens=2, seq_len=16, eval_examples=2, gen_examples=1)
    shutil.copytree(root / "qs" / "model", root / "plain" / "model")
    for name in FILES:
        (root / "plain" / "model" / name).unlink()
    return root


def _config(*extra: str):
    from flows.config import load_config

    return load_config("tiny", overrides=[
        "tracking.enabled=false", "eval.max_examples=4", "eval.max_new_tokens=4", "eval.ppl_max_tokens=512",
        "eval.seq_len=32", "eval.bootstrap_samples=200", "bitnet.steps=3", "bitnet.warmup_steps=1",
        "bitnet.batch_size=2", "bitnet.seq_len=32", "bitnet.max_loss_increase=100", "bitnet.min_gain_kept=0",
        "quietstar.eval_examples=3", "quietstar.gen_examples=2", *extra])


def _ref():
    from tasks.store import ArtifactRef

    return ArtifactRef(uri="file:///prev", digest="0" * 64, kind="model", params=0, bytes=0)


def _bitnet(root, which, out):
    from tasks.bitnet import _body

    out.mkdir()
    return _body(_config(), _ref())(PhaseContext(seed=0, precision="fp32"), [root / "data", root / which], out)


def _stable(metrics):
    return {k: "nan" if math.isnan(v) else v for k, v in metrics.items()
            if "tokens_per_s" not in k and not k.startswith("thoughts/")}


@pytest.fixture(scope="module")
def bitnet_runs(prefix):
    return {w: _bitnet(prefix, w, prefix / f"out-{w}") for w in ("qs", "plain")}


def test_bitnet_task_carries_the_thought_files_and_remeasures_the_stored_model(prefix, bitnet_runs):
    from forge_models.tokenizer import load_tokenizer

    written, out = bitnet_runs["qs"], prefix / "out-qs" / "model"
    for name in FILES:  # carried byte for byte: the head stays float32
        assert (out / name).read_bytes() == (prefix / "qs" / "model" / name).read_bytes()
    m = written.metrics
    for k in ("nll_without", "nll_with", "nll_gain", "nll_gain_lo", "nll_gain_hi", "answer_prob_without",
              "answer_prob_with", "gen_em_without", "gen_em_with", "w_abs_heldout"):
        assert math.isfinite(m[f"thoughts/{k}"]), k
    assert m["thoughts/n_text"] == 3 and m["thoughts/n_gen"] == 2  # config.quietstar's eval settings
    assert m["thoughts/w_abs_heldout"] > 0 and m["thoughts/nll_with"] != m["thoughts/nll_without"]
    assert "## With vs without thoughts after this phase" in written.report_md
    assert "| next-token NLL, text (3 ex." in written.report_md

    # The thinker rebuilt around the stored packed model thinks (w != 0 changes predictions vs budget 0).
    tok = load_tokenizer(out)
    qs = attach_thoughts(load_packed(out), out, tok)
    x = torch.tensor([tok.encode("What is 2 + 3? The answer is", add_special_tokens=False)])
    assert not _finite_close(thought_logits(qs, x), thought_logits(qs, x, 0), 1e-3)

    # A folder without the files: no thoughts anywhere, and the phase's own numbers are those of the same model
    # with them (carrying changes nothing else).
    plain = bitnet_runs["plain"]
    assert not any(k.startswith("thoughts/") for k in plain.metrics)
    assert not any((prefix / "out-plain" / "model" / n).exists() for n in FILES)
    assert "thoughts" not in plain.report_md
    assert _stable(plain.metrics) == _stable(m)


def test_tasks_refuse_thought_ids_the_tokenizer_does_not_have_before_compute(prefix, tmp_path, monkeypatch):
    import forge_models.bitnet
    from tasks.bitnet import _body

    bad = tmp_path / "bad"
    shutil.copytree(prefix / "qs", bad)
    meta = json.loads((bad / "model" / META_FILE).read_text())
    (bad / "model" / META_FILE).write_text(json.dumps({**meta, "start_id": meta["start_id"] - 5}))
    monkeypatch.setattr(forge_models.bitnet, "run", lambda *a, **k: pytest.fail("computed before refusing"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactIntegrityError, match="tokenizer"):
        _body(_config(), _ref())(PhaseContext(seed=0), [prefix / "data", bad], tmp_path / "out")


def test_training_task_carries_the_files_through_a_bitnet_input(prefix, bitnet_runs, tmp_path, monkeypatch):
    """The Forge loop on BitNet's output (latent + packed): the loop itself is stubbed (tested in
    test_training.py) by one that moves the latent weights, so the re-measured stored model is a new one."""
    import forge_models.training
    from forge_models.runtime import PhaseOutput
    from tasks.training import _body

    def loop(inputs, cfg, ctx):
        with torch.no_grad():
            inputs.model.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
        ev = {"loss": 1.0}
        return PhaseOutput(models={"model": inputs.model}, tokenizer=inputs.tokenizer, metrics={"train/steps": 1.0},
                           evaluations={"before": {"input": ev}, "after": {"model": ev}}, details={}, curves={})

    monkeypatch.setattr(forge_models.training, "run", loop)
    (tmp_path / "out").mkdir()
    written = _body(_config(), _ref())(PhaseContext(seed=0, precision="fp32"), [prefix / "data", prefix / "out-qs"],
                                       tmp_path / "out")
    out = tmp_path / "out" / "model"
    assert (out / "bitnet.json").is_file() and (out / "latent").is_dir()
    assert all((out / n).read_bytes() == (prefix / "qs" / "model" / n).read_bytes() for n in FILES)
    m, before = written.metrics, bitnet_runs["qs"].metrics
    assert math.isfinite(m["thoughts/nll_with"]) and math.isfinite(m["thoughts/answer_prob_with"])
    assert m["thoughts/nll_without"] != before["thoughts/nll_without"]  # measured on the new stored model
    assert "With vs without thoughts after this phase" in written.report_md


def test_compression_task_carries_the_files_and_remeasures_the_reloaded_artifact(prefix, tmp_path):
    from forge_models.compression.artifact import load_compressed
    from forge_models.tokenizer import load_tokenizer
    from tasks.compression import _body

    cfg = _config("compression.seq_len=32", "compression.calib_sequences=8", "compression.val_sequences=4",
                  "compression.test_sequences=4", "compression.max_loss_increase=100.0",
                  "compression.candidates=[{name: rtn, bits: 4, group: 32}]")
    (tmp_path / "out").mkdir()
    written = _body(cfg, _ref())(PhaseContext(seed=0, precision="fp32"), [prefix / "data", prefix / "qs"],
                                 tmp_path / "out")
    out = tmp_path / "out" / "model"
    assert all((out / n).read_bytes() == (prefix / "qs" / "model" / n).read_bytes() for n in FILES)
    m = written.metrics
    assert m["compression/bytes_attachments"] == sum((out / n).stat().st_size for n in FILES)
    assert math.isfinite(m["thoughts/nll_with"]) and m["thoughts/n_text"] == 3
    assert "With vs without thoughts after this phase" in written.report_md
    tok = load_tokenizer(out)
    qs = attach_thoughts(load_compressed(out, torch.float32, "cpu"), out, tok)  # the decoded rows think
    x = torch.tensor([tok.encode("Tell me a story", add_special_tokens=False)])
    assert not _finite_close(thought_logits(qs, x), thought_logits(qs, x, 0), 1e-3)


def test_baking_task_carries_the_files_and_remeasures_the_reloaded_baked_model(prefix, tmp_path, monkeypatch):
    """Baking on a plain Quiet-STaR folder; the bake itself is stubbed (tested in test_baking.py) by one that
    changes the weights, stores and reloads them as the phase does."""
    import forge_models.baking
    from forge_models.baking.phase import load_baked, save_baked
    from forge_models.runtime import PhaseOutput
    from tasks.baking import _body

    def bake(inputs, cfg, ctx):
        with torch.no_grad():
            inputs.model.lm_head.weight.mul_(0.5)
        save_baked(inputs.model, inputs.tokenizer, inputs.out_dir, inputs.bitnet_meta)
        stored = load_baked(inputs.out_dir, inputs.bitnet_meta, ctx.device)
        return PhaseOutput(models={"model": stored}, tokenizer=inputs.tokenizer, metrics={}, evaluations={},
                           details={"prompts": {}, "params": 1}, curves={})

    monkeypatch.setattr(forge_models.baking, "run", bake)
    (tmp_path / "out").mkdir()
    written = _body(_config(), _ref())(PhaseContext(seed=0, precision="fp32"), [prefix / "data", prefix / "qs"],
                                       tmp_path / "out")
    out = tmp_path / "out" / "model"
    assert all((out / n).read_bytes() == (prefix / "qs" / "model" / n).read_bytes() for n in FILES)
    m = written.metrics
    assert math.isfinite(m["thoughts/nll_with"]) and math.isfinite(m["thoughts/gen_em_with"])
    assert "With vs without thoughts after this phase" in written.report_md


def test_the_closing_table_shows_thoughts_after_each_phase_that_measured_them(capsys):
    from flows.agent_forge import PhaseSummary, PipelineResult
    from flows.cli import _print_summary

    phases = [PhaseSummary(name="quietstar", status="completed", cached=False,
                           metrics={"quietstar/nll_without": 0.8439, "quietstar/nll_with": 0.8617}),
              PhaseSummary(name="bitnet", status="completed", cached=False,
                           metrics={"thoughts/nll_without": 0.9123, "thoughts/nll_with": 0.9456}),
              PhaseSummary(name="evomerge", status="completed", cached=False, metrics={})]
    _print_summary(PipelineResult(flow_run_id=None, store="file:///s", mlflow_run_id=None, phases=phases), 1.0)
    out = capsys.readouterr().out
    assert "with vs without thoughts" in out and "0.8617" in out and "0.9456" in out
    assert _print_summary(PipelineResult(flow_run_id=None, store="file:///s", mlflow_run_id=None,
                                         phases=phases[2:]), 1.0) is None
    assert "thoughts" not in capsys.readouterr().out
