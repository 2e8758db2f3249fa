"""The Quiet-STaR phase run: trains on train only (test split poisoned -> nothing changes), measures with vs
without thoughts, and its output survives save/load."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from forge_models.config import EvalConfig
from forge_models.data.stream import TokenSampler
from forge_models.data.synthetic import Example
from forge_models.quietstar import QuietStarConfig, QuietStarInputs, generate_ids, load_quietstar, run, save_quietstar
from forge_models.runtime import ConfigError, PhaseContext
from tests.factories import corpus_and_tokenizer, tiny_llama

CFG = QuietStarConfig(steps=3, batch_size=2, seq_len=16, thought_tokens=2, n_ahead_talk=2, eval_examples=4,
                      gen_examples=4)
EVAL = EvalConfig(max_examples=8, ppl_max_tokens=256, max_new_tokens=4, bootstrap_samples=200)


@pytest.fixture(scope="module")
def data():
    corpus, tok = corpus_and_tokenizer(n_examples=200, vocab_size=300)
    return corpus, tok


def _run(corpus, tok):
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tok), hidden=32, inter=64, max_position_embeddings=256)
    return run(QuietStarInputs(model, tok, corpus, EVAL), CFG, PhaseContext(precision="fp32"))


def _stable(metrics):
    return {k: v for k, v in metrics.items() if "tokens_per_s" not in k and "slowdown" not in k}


def test_test_split_is_never_read_and_metrics_are_measured(data, tmp_path):
    corpus, tok = data
    clean = _run(corpus, tok)
    poison = [Example(kind="text", text="POISON " * 50)] * 5
    poisoned = _run(dataclasses.replace(corpus, test=tuple(poison)), tok)
    assert _stable(clean.metrics) == _stable(poisoned.metrics)
    m = clean.metrics
    for key in ("quietstar/nll_with", "quietstar/nll_without", "quietstar/nll_gain_lo", "quietstar/nll_gain_hi",
                "quietstar/answer_prob_with", "quietstar/answer_prob_without", "quietstar/w_abs_heldout"):
        assert math.isfinite(m[key]), key
    assert m["quietstar/w_abs_step0"] == 0.0  # zero-initialised mixing head
    assert m["quietstar/nll_gain_lo"] <= m["quietstar/nll_gain"] <= m["quietstar/nll_gain_hi"]
    # generated exact match with vs without thoughts, on the same held-out prompts, and both speeds
    assert m["quietstar/n_gen"] >= 1
    assert 0 <= m["quietstar/gen_em_without"] <= 1 and 0 <= m["quietstar/gen_em_with"] <= 1
    assert m["quietstar/gen_em_gain_lo"] <= m["quietstar/gen_em_gain"] <= m["quietstar/gen_em_gain_hi"]
    assert m["quietstar/gen_tokens_per_s_without"] > 0 and m["quietstar/gen_tokens_per_s_with"] > 0
    assert len(clean.curves["w_abs"]) == CFG.steps

    qs = clean.models["model"]
    save_quietstar(qs, clean.tokenizer, tmp_path / "out")
    qs2, _ = load_quietstar(tmp_path / "out")
    prompt = clean.tokenizer.encode("Q: What is 2 + 3?", add_special_tokens=False)
    assert generate_ids(qs2, prompt, 6) == generate_ids(qs, prompt, 6)

    # What BitNet (the next phase) does with this folder: a plain causal LM (thought rows in its vocabulary,
    # the mixing head not used) that loads, converts to ternary and runs.
    from transformers import AutoModelForCausalLM

    from forge_models.bitnet import convert_to_bitnet
    from forge_models.tokenizer import load_tokenizer

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert plain.get_input_embeddings().weight.shape[0] == len(load_tokenizer(tmp_path / "out"))
    convert_to_bitnet(plain, ["lm_head"], "none")
    assert torch.isfinite(plain(torch.tensor([prompt])).logits).all()


def test_refuses_a_too_long_span_before_training(data):
    corpus, tok = data
    model = tiny_llama(vocab=len(tok), hidden=32, inter=64, max_position_embeddings=16)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        run(QuietStarInputs(model, tok, corpus, EVAL), CFG, PhaseContext(precision="fp32"))


def test_forge_phase_quietstar_and_pipeline_validation(tmp_path):
    """`forge phase quietstar --input DIR` imports DIR and runs the phase; in a pipeline it takes EvoMerge's
    one model, and a multi-model input needs quietstar.input_model."""
    from flows.cli import _phase_overrides
    from flows.config import ConfigProblems, load_config
    from tests.factories import make_llama

    a = make_llama(tmp_path / "a", seed=0)
    cfg = load_config(preset="tiny", overrides=_phase_overrides("quietstar", [str(a)], None))
    assert cfg.phases == ["quietstar"] and cfg.input == str(a.resolve()) and cfg.quietstar.input_model is None
    chain = load_config("tiny", overrides=["phases=[cognate, evomerge, quietstar, bitnet, training]"])
    assert chain.quietstar.steps == 60
    with pytest.raises(ConfigProblems, match="quietstar.input_model"):
        load_config("tiny", overrides=["phases=[cognate, quietstar]"])


def test_generated_exact_match_checks_the_answer(data):
    """A model that always says the right answer scores 1 with and without thoughts; a wrong one 0."""
    from forge_models.quietstar.phase import generated_exact_match
    from forge_models.quietstar.thoughts import QuietStar

    corpus, tok = data
    tok = copy.deepcopy(tok)  # wrap adds the thought tokens to it
    held = [ex for ex in corpus.split("validation") if ex.kind == "arithmetic" and ex.prompt and ex.answer][:3]
    assert held
    torch.manual_seed(0)
    qs = QuietStar.wrap(tiny_llama(vocab=len(tok), hidden=32, inter=64, max_position_embeddings=256), tok,
                        CFG).eval()
    scripted = {}

    def fake_generate(qs_, prompt, n, budget, eos, seed, should_stop):
        ex = held[seed]
        text = scripted["reply"](ex) + "\n"
        return tok.encode(text, add_special_tokens=False)

    import forge_models.quietstar.phase as phase
    orig = phase.generate_ids
    phase.generate_ids = fake_generate
    try:
        scripted["reply"] = lambda ex: f"The answer is {ex.answer}."
        good = generated_exact_match(qs, tok, held, CFG, EVAL)
        scripted["reply"] = lambda ex: f"The answer is {ex.answer}1."
        bad = generated_exact_match(qs, tok, held, CFG, EVAL)
    finally:
        phase.generate_ids = orig
    assert good["gen_em_with"] == good["gen_em_without"] == 1.0 and good["n_gen"] == len(held)
    assert bad["gen_em_with"] == bad["gen_em_without"] == 0.0


def test_learning_signal_the_mixing_weight_moves_and_the_no_thought_loss_does_not_rise():
    """Reference test 5 on a pretrained ~0.12M-parameter model: after the phase |w| is away from 0 and the
    held-out no-thought loss has not risen. The control shows the test can fail: the same run with the trunk at
    the full lr (the released single lr, at tiny scale) raises that loss."""
    corpus, tok = corpus_and_tokenizer(n_examples=600, vocab_size=300)
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tok), hidden=64, inter=128, max_position_embeddings=256)
    mix = {"arithmetic": 1.0, "text": 1.0, "narrative": 1.0, "persona": 1.0, "tool": 1.0}
    sampler = TokenSampler(corpus.train, tok, mix, 48, 8, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        x = sampler.batch(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ev = EvalConfig(max_examples=24, ppl_max_tokens=2048, max_new_tokens=4, bootstrap_samples=200)
    cfg = QuietStarConfig(steps=60, batch_size=4, seq_len=32, thought_tokens=2, n_ahead_talk=2, eval_examples=16,
                          gen_examples=0)
    loss = {}
    for scale in (cfg.trunk_lr_scale, 1.0):
        out = run(QuietStarInputs(model, tok, corpus, ev), cfg.model_copy(update={"trunk_lr_scale": scale}),
                  PhaseContext(precision="fp32"))
        loss[scale] = (out.evaluations["before"]["input"]["loss"], out.evaluations["after"]["quietstar"]["loss"])
        m = out.metrics
        assert m["quietstar/plain_nll_change_lo"] <= m["quietstar/plain_nll_change"] <= m["quietstar/plain_nll_change_hi"]
        assert m["quietstar/plain_nll_change"] == pytest.approx(
            m["quietstar/plain_nll_after"] - m["quietstar/plain_nll_before"], abs=1e-9)
        if scale == cfg.trunk_lr_scale:
            assert m["quietstar/plain_nll_change_hi"] < 0.02  # paired, held-out texts: no rise beyond noise
            assert out.metrics["quietstar/w_abs_step0"] == 0.0
            assert out.metrics["quietstar/w_abs_heldout"] > 0.02  # the mixing weight moved away from 0
            assert all(p.requires_grad for p in out.models["model"].model.parameters())  # trunk flags restored
    before, after = loss[cfg.trunk_lr_scale]
    assert after <= before, loss  # the no-thought held-out loss did not rise
    assert loss[1.0][1] > loss[1.0][0] + 0.02, loss  # control: at the full trunk lr it does


def test_trunk_lr_scale_zero_trains_only_the_thinking_parameters(data):
    corpus, tok = data
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tok), hidden=32, inter=64, max_position_embeddings=256)
    out = run(QuietStarInputs(model, tok, corpus, EVAL), CFG.model_copy(update={"trunk_lr_scale": 0.0}),
              PhaseContext(precision="fp32"))
    qs = out.models["model"]
    trained = dict(qs.model.named_parameters())
    for name, p in model.named_parameters():  # the input's weights (the phase trains a copy)
        # embeddings gained the two thought rows; the original rows, like every other weight, are unchanged
        assert torch.equal(trained[name][: p.shape[0]], p), name
    assert not torch.equal(qs.head.net[-1].weight, torch.zeros_like(qs.head.net[-1].weight))  # the head learned
