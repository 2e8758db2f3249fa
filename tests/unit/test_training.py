"""Phase 5, the Forge training loop: Grokfast filters (paper values), the curriculum controller and its data,
the answer-checked success metric, dreams, the self-model head, stage exits, resume, divergence and BitNet.

Tiny models on CPU (a 2-layer Cognate of width 32); every phase run takes a few seconds.
"""

from __future__ import annotations

import copy
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import forge_models  # noqa: F401  (registers "cognate")
from forge_models.bitnet import bit_linears, convert_to_bitnet
from forge_models.cognate.model import CognateForCausalLM, CognateModelConfig
from forge_models.config import DataConfig, EvalConfig, SyntheticConfig
from forge_models.data import build_corpus, canonical_keys, held_out_keys, mask_unscored
from forge_models.data.stream import TokenSampler
from forge_models.data.synthetic import Corpus, Example
from forge_models.runtime import ConfigError, PhaseContext, QualityGateFailed, RecordingTracker, TrainingDiverged
from forge_models.training import (
    EXIT_CRITERIA,
    BandController,
    StageConfig,
    TrainingConfig,
    TrainingInputs,
    answer_success,
    check_dream,
    generate_tasks,
    gradfilter_ema,
    gradfilter_ma,
    run,
)
from forge_models.training import loop as loop_module
from forge_models.training.curriculum import answer_positions, stream_rng, task_stats
from forge_models.training.selfmodel import LayerTap, SelfModelHead, decoder_layers, logit_lens, self_model_loss
from forge_models.tokenizer import train_bpe
from tests.helpers import Interrupted, StopAt, poison_loss

EVAL = EvalConfig(max_examples=2, ppl_max_tokens=256, max_new_tokens=4, batch_size=8, seq_len=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared; restore the suite's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    corpus = build_corpus(DataConfig(seed=1, synthetic=SyntheticConfig(n_examples=600), validation_percent=10))
    tokenizer = train_bpe([ex.text for ex in corpus.train], 400)
    return corpus, tokenizer


def tiny_cognate(tokenizer, seed: int = 0) -> CognateForCausalLM:
    torch.manual_seed(seed)
    return CognateForCausalLM(CognateModelConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=128, max_refine_steps=2))


PLAN = [("adapt", "warmed_up"), ("adapt", "val_improved"), ("adapt", "val_plateau"), ("ramp", "in_band"),
        ("ramp", "in_band"), ("ramp", "in_band"), ("dream", "dreams_kept"), ("dream", "dreams_kept"),
        ("self", "self_model_fit"), ("stabilise", "stable")]


def ten_stages(steps: int = 6) -> list[StageConfig]:
    return [StageConfig(name=f"s{i + 1}", group=g, steps=steps, exit=e, curriculum=i >= 3, chaos=0.2 if i == 4 else 0.0,
                        dreams=i in (6, 7), replay=i >= 6, self_model=1.0 if i >= 8 else 0.0, lr_decay=i == 9)
            for i, (g, e) in enumerate(PLAN)]


def small_config(**overrides) -> TrainingConfig:
    fields = dict(stages=ten_stages(), warmup_steps=3, eval_every=3, batch_size=4, seq_len=32, check_tokens=256,
                  checkpoint_every=7, lr=3e-3, grokfast={"enabled": True},
                  curriculum={"window": 8}, dreams={"every": 3, "n_samples": 4, "max_new_tokens": 12})
    fields.update(overrides)
    return TrainingConfig(**fields)


def run_phase(data, cfg: TrainingConfig, model=None, **ctx_fields):
    corpus, tokenizer = data
    model = model if model is not None else tiny_cognate(tokenizer)
    ctx = PhaseContext(seed=ctx_fields.pop("seed", 0), precision="fp32", **ctx_fields)
    return run(TrainingInputs(model=model, tokenizer=tokenizer, corpus=corpus, eval_cfg=EVAL), cfg, ctx)


# ------------------------------------------------------------------------------------------- Grokfast


def linear_with_grad(g: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(g.shape[1], g.shape[0], bias=False)
    layer.weight.grad = g.clone()
    return layer


def test_ema_first_call_and_constant_gradient_are_amplified_by_one_plus_lamb():
    g = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]])
    layer, grads = linear_with_grad(g), None
    for _ in range(5):
        layer.weight.grad = g.clone()
        grads = gradfilter_ema(layer, grads=grads, alpha=0.98, lamb=2.0)
        assert torch.allclose(layer.weight.grad, 3.0 * g)  # (1 + lamb) g: mu seeded with g, no bias correction
    assert torch.allclose(grads["weight"], g)


def test_ema_alternating_gradient_is_barely_amplified():
    g = torch.tensor([[1.0, -2.0, 0.5]])
    alpha, lamb = 0.98, 2.0
    layer, grads = linear_with_grad(g), None
    for t in range(600):
        sign = 1.0 if t % 2 == 0 else -1.0
        layer.weight.grad = sign * g
        grads = gradfilter_ema(layer, grads=grads, alpha=alpha, lamb=lamb)
    # The last gradient was -g (t = 599): mu -> -g (1 - alpha) / (1 + alpha).
    expected_mu = -g * (1 - alpha) / (1 + alpha)
    assert torch.allclose(grads["weight"], expected_mu, rtol=1e-2, atol=0)
    gain = (layer.weight.grad / -g).mean()
    assert 1.0 < float(gain) < 1.03  # vs 3.0 for a constant gradient


def test_ma_is_unchanged_during_warmup_then_adds_lamb_times_the_window_mean():
    torch.manual_seed(0)
    gs = [torch.randn(2, 3) for _ in range(7)]
    layer, grads = linear_with_grad(gs[0]), None
    for t, g in enumerate(gs):
        layer.weight.grad = g.clone()
        grads = gradfilter_ma(layer, grads=grads, window_size=4, lamb=5.0)
        if t < 3:
            assert torch.equal(layer.weight.grad, g)
        else:
            window = torch.stack(gs[t - 3 : t + 1]).mean(0)
            assert torch.allclose(layer.weight.grad, g + 5.0 * window)
    # filter_type "sum", and no warm-up: filtered from the first call.
    layer.weight.grad, state = gs[0].clone(), None
    state = gradfilter_ma(layer, grads=state, window_size=4, lamb=5.0, filter_type="sum", warmup=False)
    assert torch.allclose(layer.weight.grad, 6.0 * gs[0])
    with pytest.raises(ValueError):
        gradfilter_ma(layer, window_size=4, filter_type="median")


def test_filters_never_touch_params_without_grad_or_frozen():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones(3, 3)  # a stale grad on a frozen param must stay as is
    model[1].weight.grad = torch.full((1, 3), 2.0)
    for filt in (lambda m, s: gradfilter_ema(m, s), lambda m, s: gradfilter_ma(m, s, window_size=1)):
        state = None
        for p in (model[0].bias, model[1].bias):
            p.grad = None
        model[1].weight.grad = torch.full((1, 3), 2.0)
        state = filt(model, state)
        assert set(state) == {"1.weight"}
        assert torch.equal(model[0].weight.grad, torch.ones(3, 3))
        assert model[0].bias.grad is None and model[1].bias.grad is None
        assert not torch.equal(model[1].weight.grad, torch.full((1, 3), 2.0))  # the live one is filtered


# ---------------------------------------------------------------------------------------- curriculum


def test_controller_keeps_a_simulated_learner_in_the_band():
    """Success falls with difficulty (logistic) and the learner's skill grows; measurements are binomial."""
    rng = random.Random(0)
    ctl = BandController(band_low=0.55, band_high=0.75, gain=0.3, difficulty=0.0)
    skill, window = 0.1, 48
    successes = []
    for step in range(300):
        skill = min(0.9, skill + 0.002)
        p = 1.0 / (1.0 + math.exp((ctl.difficulty - skill) / 0.1))
        success = sum(rng.random() < p for _ in range(window)) / window
        ctl.update(success, step)
        successes.append(success)
    tail = successes[30:]
    in_band = sum(0.55 <= s <= 0.75 for s in tail) / len(tail)
    assert in_band >= 0.6, in_band
    assert 0.55 <= sum(tail) / len(tail) <= 0.75
    assert ctl.difficulty > 0.5  # it followed the learner up
    # A controller that never moves (gain ~0) leaves the band as the learner improves.
    frozen = BandController(0.55, 0.75, gain=1e-9)
    skill, frozen_hits = 0.1, []
    for step in range(300):
        skill = min(0.9, skill + 0.002)
        p = 1.0 / (1.0 + math.exp((frozen.difficulty - skill) / 0.1))
        s = sum(rng.random() < p for _ in range(window)) / window
        frozen.update(s, step)
        frozen_hits.append(0.55 <= s <= 0.75)
    assert sum(frozen_hits[30:]) / 270 < 0.3


def test_difficulty_changes_the_generated_tasks():
    easy = generate_tasks(stream_rng(0, "train", 1), 200, 0.1, ["arithmetic", "tool"], 2, 999)
    hard = generate_tasks(stream_rng(0, "train", 1), 200, 0.9, ["arithmetic", "tool"], 2, 999)
    e, h = task_stats(easy), task_stats(hard)
    assert h["max_operand"] > 10 * e["max_operand"]
    assert h["ops"] > e["ops"] + 0.3  # tool calls always have one operation
    assert h["answer_digits"] > e["answer_digits"] + 1
    # Held-out calculations are never generated, in any wording.
    banned = frozenset(k for t in easy[:50] for k in canonical_keys(t))
    again = generate_tasks(stream_rng(0, "train", 1), 200, 0.1, ["arithmetic", "tool"], 2, 999, banned)
    assert not banned & {k for t in again for k in canonical_keys(t)}


@pytest.mark.parametrize("stream", ["train", "probe", "dream"])
def test_generated_curriculum_and_dream_tasks_never_hit_a_held_out_key(stream):
    """Phase 5 excludes held_out_keys(corpus): no generated task shows a validation/test calculation."""
    corpus = build_corpus(DataConfig(seed=7, synthetic=SyntheticConfig(n_examples=20000, max_operand=20),
                                     validation_percent=5, test_percent=15))
    held = held_out_keys(corpus)
    assert len(held) > 300
    hits_without, total = 0, 0
    for index, difficulty in enumerate((0.0, 0.2, 0.5, 0.8, 1.0)):
        tasks = generate_tasks(stream_rng(3, stream, index), 300, difficulty, ["arithmetic", "tool"], 2, 20, held)
        assert not held & {k for t in tasks for k in canonical_keys(t)}
        # The check can fail: the same streams without the exclusion do hit held-out calculations.
        free = generate_tasks(stream_rng(3, stream, index), 300, difficulty, ["arithmetic", "tool"], 2, 20)
        hits_without += sum(bool(held & canonical_keys(t)) for t in free)
        total += len(free)
    assert hits_without > 0.05 * total


def test_tool_output_is_neither_an_answer_token_nor_needed_for_success(data):
    _, tokenizer = data
    ex = Example("tool", "User: Compute 6 * 7.\nAssistant: <tool>calculator(6 * 7)</tool>\nTool: 42\n"
                 "Assistant: The answer is 42.\n", "User: Compute 6 * 7.\nAssistant:", "42")
    ids, answer = answer_positions(tokenizer, ex)
    produced = tokenizer.decode([ids[i] for i in answer])
    assert "calculator(6 * 7)" in produced and "The answer is 42." in produced
    assert "Tool" not in produced and produced.count("42") == 1  # the final answer's 42, not the tool's
    tasks = [t for t in generate_tasks(stream_rng(0, "probe", 1), 40, 0.5, ["tool"], 2, 99)]
    ctx = PhaseContext(precision="fp32")

    class OracleButTool(nn.Module):
        """Predicts the next token everywhere except where the next token is tool output (wrong there)."""

        def forward(self, input_ids, attention_mask=None, **kw):
            nxt = torch.roll(input_ids, -1, dims=1)
            unscored = torch.roll(mask_unscored(input_ids, tokenizer) == -100, -1, dims=1)
            wrong = (nxt + 1) % len(tokenizer)
            return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.where(unscored, wrong, nxt), len(tokenizer)).float())

    assert all(answer_success(OracleButTool(), tokenizer, tasks, ctx))


class CopyInput(nn.Module):
    """Predicts its current input token (what unshifted labels would reward)."""

    def __init__(self, vocab: int, shift: int = 0) -> None:
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, attention_mask=None, **kw):
        target = input_ids if self.shift == 0 else torch.roll(input_ids, -1, dims=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())


def test_success_is_answer_checked_with_shifted_labels(data):
    _, tokenizer = data
    tasks = generate_tasks(stream_rng(0, "probe", 0), 16, 0.3, ["arithmetic", "tool"], 2, 999)
    ctx = PhaseContext(precision="fp32")
    assert sum(answer_success(CopyInput(len(tokenizer)), tokenizer, tasks, ctx)) == 0
    # An oracle that sees the next token scores everything, even batched with right padding.
    assert all(answer_success(CopyInput(len(tokenizer), shift=1), tokenizer, tasks, ctx, batch_size=16))


def run_with_fixed_success(data, monkeypatch, success: bool, initial: float):
    monkeypatch.setattr(loop_module, "answer_success", lambda model, tok, probes, ctx: [success] * len(probes))
    stages = [StageConfig(name="warm", group="adapt", steps=2, exit="warmed_up"),
              StageConfig(name="ramp", group="ramp", steps=24, exit="in_band", curriculum=True)]
    cfg = small_config(stages=stages, warmup_steps=1, self_model={"enabled": False}, grokfast={"enabled": False},
                       curriculum={"window": 4, "initial_difficulty": initial, "gain": 0.5, "families": ["arithmetic"]})
    return run_phase(data, cfg)


def curriculum_numbers(tokenizer, batches: list[torch.Tensor], rows: slice) -> float:
    values = []
    for b in batches:
        for row in b[rows]:
            values += [int(x) for x in re.findall(r"\d+", tokenizer.decode(row.tolist()))]
    return sum(values) / max(1, len(values))


def test_curriculum_difficulty_reaches_the_training_batches(data, monkeypatch):
    _, tokenizer = data
    captured: list[torch.Tensor] = []
    original = loop_module.Loop.batch

    def spy(self, step, stage):
        batch, comp = original(self, step, stage)
        captured.append((batch.clone(), comp))
        return batch, comp

    monkeypatch.setattr(loop_module.Loop, "batch", spy)
    out = run_with_fixed_success(data, monkeypatch, True, 0.2)  # above the band: harder
    diffs = [v for _, v in out.curves["curriculum/difficulty"]]
    assert diffs == sorted(diffs) and diffs[-1] > diffs[0] + 0.3
    cur = [b for b, comp in captured if comp["curriculum"] > 0]
    assert cur and all(comp["curriculum"] == 2 for _, comp in captured if comp["curriculum"])
    early, late = curriculum_numbers(tokenizer, cur[:4], slice(2, 4)), curriculum_numbers(tokenizer, cur[-4:], slice(2, 4))
    assert late > 3 * early

    captured.clear()
    out = run_with_fixed_success(data, monkeypatch, False, 0.8)  # below the band: easier
    diffs = [v for _, v in out.curves["curriculum/difficulty"]]
    assert diffs == sorted(diffs, reverse=True) and diffs[-1] < diffs[0] - 0.3
    cur = [b for b, comp in captured if comp["curriculum"] > 0]
    early, late = curriculum_numbers(tokenizer, cur[:4], slice(2, 4)), curriculum_numbers(tokenizer, cur[-4:], slice(2, 4))
    assert early > 3 * late
    assert out.details["curriculum"]["history"] and out.details["curriculum"]["band"] == [0.55, 0.75]


# --------------------------------------------------------------------------------------------- dreams


def test_dream_filter_keeps_only_answer_checked_samples():
    arith = Example(kind="arithmetic", text="", prompt="Q: What is 3 + 4?\nA:", answer="7")
    assert check_dream(arith, " 3 + 4 = 7. The answer is 7.\n") == "Q: What is 3 + 4?\nA: 3 + 4 = 7. The answer is 7.\n"
    assert check_dream(arith, " 3 + 4 = 8. The answer is 8.\n") is None
    assert check_dream(arith, " seven") is None
    tool = Example(kind="tool", text="", prompt="User: Compute 6 * 7.\nAssistant:", answer="42")
    kept = check_dream(tool, " <tool>calculator(6 * 7)</tool>")
    assert kept == "User: Compute 6 * 7.\nAssistant: <tool>calculator(6 * 7)</tool>\nTool: 42\nAssistant: The answer is 42.\n"
    assert check_dream(tool, " <tool>calculator(6 + 7)</tool>") is None
    assert check_dream(tool, " <tool>calculator(6 * x)</tool>") is None


def test_dreams_trigger_on_schedule_and_are_replayed_at_the_ratio(data, monkeypatch):
    _, tokenizer = data
    # Keep every dream (the filter itself is tested above) so the buffer fills with a tiny untrained model.
    monkeypatch.setattr(loop_module, "check_dream", lambda task, reply: f"{task.prompt} DREAM{reply}\n")
    captured = []
    original = loop_module.Loop.batch

    def spy(self, step, stage):
        batch, comp = original(self, step, stage)
        captured.append((step, batch.clone(), comp))
        return batch, comp

    monkeypatch.setattr(loop_module.Loop, "batch", spy)
    stages = [StageConfig(name="warm", group="adapt", steps=3, exit="val_improved"),
              StageConfig(name="dream", group="dream", steps=10, exit="dreams_kept", dreams=True, replay=True),
              StageConfig(name="after", group="stabilise", steps=4, exit="stable", replay=True)]
    cfg = small_config(stages=stages, warmup_steps=1, batch_size=8, min_improvement=100.0,
                       dreams={"every": 4, "n_samples": 3, "max_new_tokens": 6, "replay_ratio": 0.25, "min_cycles": 99},
                       self_model={"enabled": False})
    out = run_phase(data, cfg)
    cycles = out.details["dreams"]["cycles"]
    assert [c["step"] for c in cycles] == [3, 7, 11]  # stage start (step 3) and every 4 steps of the stage
    assert all(c["generated"] == 3 and c["kept"] == 3 for c in cycles)
    assert all(c["val_after"] is not None for c in cycles)  # effect measured at the next check
    for step, batch, comp in captured:
        if step < 3:
            assert comp["dream"] == 0
        else:  # dream and replay stages: 2 of 8 rows from the buffer, the rest real data
            assert comp == {"real": 6, "curriculum": 0, "dream": 2}
            for row in batch[6:]:
                assert "DREAM" in tokenizer.decode(row.tolist())
            for row in batch[:6]:
                assert "DREAM" not in tokenizer.decode(row.tolist())
    # The stage whose criterion cannot be met (min_cycles 99; min_improvement 100) ran its whole budget.
    records = {r["name"]: r for r in out.details["stages"]}
    assert records["warm"]["ended_by"] == "budget" and records["warm"]["steps"] == 3
    assert records["dream"]["ended_by"] == "budget" and records["dream"]["steps"] == 10
    assert out.metrics["dream/cycles"] == 3 and out.metrics["dream/kept"] == 9


def test_stage_exits_early_only_when_its_criterion_holds(data):
    stages = [StageConfig(name="warm", group="adapt", steps=30, exit="warmed_up"),
              StageConfig(name="never", group="adapt", steps=9, exit="val_improved")]
    cfg = small_config(stages=stages, warmup_steps=3, min_improvement=50.0, self_model={"enabled": False})
    out = run_phase(data, cfg)
    warm, never = out.details["stages"]
    assert warm["ended_by"] == "criterion" and warm["steps"] < 30 and warm["exit_met"]
    assert never["ended_by"] == "budget" and never["steps"] == 9 and not never["exit_met"]
    assert out.metrics["steps"] == warm["steps"] + 9
    assert {"entry", "exit", "entry_criterion", "exit_criterion", "seconds"} <= set(never)


# ----------------------------------------------------------------------------------------- self-model


def test_trained_self_model_head_beats_a_head_that_copies_its_input(data):
    corpus, tokenizer = data
    model = tiny_cognate(tokenizer)
    sampler = TokenSampler(corpus.train, tokenizer, {"arithmetic": 1, "tool": 1, "persona": 1, "narrative": 1}, 32, 8, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(60):  # a model with peaked predictions, so the target is not near uniform
        batch = sampler.batch(step)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tap = LayerTap(decoder_layers(model)[0])
    torch.manual_seed(0)
    head = SelfModelHead(32, len(tokenizer))
    untrained = copy.deepcopy(head)
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for step in range(100, 250):
        batch = sampler.batch(step)
        tap.reset()
        with torch.no_grad():
            logits = model(input_ids=batch).logits
        loss = self_model_loss(head(tap.take()), logits, 2.0)
        loss.backward()
        head_opt.step()
        head_opt.zero_grad()
    held = TokenSampler(corpus.validation, tokenizer, {"arithmetic": 1, "tool": 1, "persona": 1, "narrative": 1},
                        32, 16, 99).batch(0)
    with torch.no_grad():
        tap.reset()
        logits = model(input_ids=held).logits
        h = tap.take()
        trained_loss = float(self_model_loss(head(h), logits, 2.0))
        copy_loss = float(self_model_loss(logit_lens(model, h, 2.0), logits, 2.0))
        fresh_loss = float(self_model_loss(untrained(h), logits, 2.0))
    tap.remove()
    assert trained_loss < 0.5 * copy_loss, (trained_loss, copy_loss)
    assert trained_loss < fresh_loss, (trained_loss, fresh_loss)  # a sanity floor only: the copy baseline is the test


# ------------------------------------------------------------------------------ the phase end to end


def test_full_loop_resume_reproduces_the_uninterrupted_run(data, tmp_path: Path):
    cfg = small_config()
    reference = run_phase(data, cfg, checkpoint_dir=tmp_path / "reference")
    assert len(reference.details["stages"]) == 10
    assert reference.details["dreams"]["cycles"], "dream stages ran no dream cycle"
    assert reference.details["curriculum"]["history"], "the curriculum never measured success"
    assert "lambda" not in reference.metrics and reference.details["lambda"] is None
    assert set(reference.evaluations) == {"before", "after"}
    assert not any(n.startswith("head") for n in reference.models["model"].state_dict())  # head not exported

    folder = tmp_path / "resumed"
    saved: list[Path] = []
    with pytest.raises(Interrupted):
        run_phase(data, cfg, checkpoint_dir=folder, tracker=StopAt(33), on_checkpoint=saved.append)
    assert [p.name for p in saved] == [f"step-{s:06d}" for s in (7, 14, 21, 28)]
    resumed = run_phase(data, cfg, checkpoint_dir=folder)
    assert resumed.details["resumed_from"] == 28
    assert resumed.details["steps_run"] == reference.details["steps_run"] - 28
    ref, new = reference.models["model"].state_dict(), resumed.models["model"].state_dict()
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    assert resumed.curves == reference.curves
    assert [r["ended_by"] for r in resumed.details["stages"]] == [r["ended_by"] for r in reference.details["stages"]]
    assert resumed.details["dreams"]["cycles"] == reference.details["dreams"]["cycles"]

    again = run_phase(data, cfg, checkpoint_dir=folder)  # finished: loaded, not retrained
    assert again.details["steps_run"] == 0
    assert all(torch.equal(ref[k], again.models["model"].state_dict()[k]) for k in ref)


def test_quality_gate_fails_when_the_loop_makes_the_model_worse(data, monkeypatch):
    """Damage the model after its training: the default gate (max_loss_increase 0.2) must refuse it."""
    original = loop_module.Loop.train

    def train_then_damage(self):
        original(self)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)

    monkeypatch.setattr(loop_module.Loop, "train", train_then_damage)
    cfg = small_config(stages=ten_stages(2), self_model={"enabled": False}, dreams={"enabled": False})
    with pytest.raises(QualityGateFailed, match="made the model worse"):
        run_phase(data, cfg)


def test_nan_loss_raises_training_diverged(data, monkeypatch):
    poison_loss(monkeypatch, at_call=4, labelled_only=True)
    with pytest.raises(TrainingDiverged, match="step 4"):
        run_phase(data, small_config())


def test_regression_rolls_back_to_the_best_state(data, monkeypatch):
    original = loop_module.Loop._held_out
    calls = {"n": 0}

    def worse_once(self):
        values = original(self)
        calls["n"] += 1
        if calls["n"] == 3:  # the second check after the initial one reports a large regression
            values["val_loss"] += 10.0
        return values

    monkeypatch.setattr(loop_module.Loop, "_held_out", worse_once)
    cfg = small_config(stages=[StageConfig(name="warm", group="adapt", steps=9, exit="val_improved")],
                       min_improvement=50.0, self_model={"enabled": False})
    out = run_phase(data, cfg)
    assert len(out.details["rollbacks"]) == 1
    rollback = out.details["rollbacks"][0]
    assert rollback["step"] == 6 and rollback["check_loss"] > rollback["best_loss"] + cfg.max_regression
    assert out.metrics["rollbacks"] == 1


def test_trains_the_latent_weights_of_a_bitnet_converted_model(data):
    _, tokenizer = data
    model = tiny_cognate(tokenizer)
    convert_to_bitnet(model, keep_patterns=["lm_head", "halt"], act_norm="rms")
    stages = [StageConfig(name="warm", group="adapt", steps=6, exit="val_improved"),
              StageConfig(name="ramp", group="ramp", steps=6, exit="in_band", curriculum=True, chaos=0.1)]
    tracker = RecordingTracker()
    out = run_phase(data, small_config(stages=stages), model=model, tracker=tracker)
    assert out.metrics["lambda"] == 1.0
    assert [v for _, v in tracker.series("train/lambda")] == [1.0] * int(out.metrics["steps"])  # logged at every step
    trained = dict(bit_linears(out.models["model"]))
    for name, layer in bit_linears(model):
        assert not torch.equal(layer.weight, trained[name].weight), name
        assert trained[name].quant_strength == 1.0
    assert math.isfinite(out.metrics["model/loss"])


def test_config_guard_rails():
    with pytest.raises(ValidationError, match="chaos"):
        StageConfig(name="x", group="ramp", steps=1, exit="in_band", chaos=0.5)
    with pytest.raises(ValidationError, match="band_low"):
        TrainingConfig(curriculum={"band_low": 0.8, "band_high": 0.7})
    with pytest.raises(ValidationError, match="unknown exit criterion"):
        StageConfig(name="x", group="adapt", steps=1, exit="vibes")
    with pytest.raises(ValidationError, match="real data"):
        TrainingConfig(batch_size=2, curriculum={"batch_fraction": 0.5}, dreams={"replay_ratio": 0.5})
    assert len(TrainingConfig().stages) == 10


def test_loop_state_round_trips_through_json_and_refuses_unknown_entries():
    from forge_models.training.state import LoopState

    s = LoopState(step=7, records=[{"entry": {"val_loss": 2.0}}], curves={"train/loss": [[1, 2.5]]})
    assert LoopState.from_json(s.to_json()) == s
    with pytest.raises(ValueError, match="unknown entries"):
        LoopState.from_json({**s.to_json(), "stepz": 1})


def test_exit_criteria_are_a_registry_that_the_config_validates_against():
    from forge_models.training.criteria import EXIT_CRITERIA as REGISTRY
    from forge_models.training.criteria import exit_criterion
    from forge_models.training.state import LoopState

    assert tuple(REGISTRY) == EXIT_CRITERIA
    cfg = small_config()
    stage = cfg.stages[2]
    s = LoopState(stage_vals=[2.0, 2.001], records=[{"entry": {"val_loss": 2.5}}], last={"val_loss": 2.001})
    met, reason = exit_criterion("val_plateau")(s, stage, cfg, False)
    assert met and "relative change 0.0005" in reason
    s.stage_vals.append(2.5)
    assert not exit_criterion("val_plateau")(s, stage, cfg, False)[0]
    assert exit_criterion("self_model_fit")(s, stage, cfg, False) == (False, "self-model disabled: criterion cannot be met")
    with pytest.raises(ConfigError, match="unknown exit criterion"):
        exit_criterion("bored")


def test_the_loops_validation_checks_never_read_eval_source_units(data):
    """Checks drive rollbacks: a held-out-only source must not steer training, wherever its units sit."""
    corpus, tokenizer = data
    units = tuple(Example(kind="text", text=f"held out passage number {i} " * 8, source="wiki") for i in range(40))
    with_units = Corpus(train=corpus.train, validation=units + corpus.validation, test=corpus.test)
    cfg, ctx = small_config(), PhaseContext(seed=0, precision="fp32")
    plain = loop_module.Loop(tiny_cognate(tokenizer), tokenizer, corpus, cfg, ctx, "d").check_rows
    mixed = loop_module.Loop(tiny_cognate(tokenizer), tokenizer, with_units, cfg, ctx, "d").check_rows
    assert torch.equal(plain, mixed)
