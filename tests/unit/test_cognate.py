"""Cognate: the ACT-refiner architecture (counts, HF round trip, halting, compute skipping) and the phase
(learning, determinism, resume, divergence, quality gate, pretrained route). Tiny models, seconds each."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, ViTConfig

import forge_models  # noqa: F401  (registers "cognate" with the Auto classes)
from forge_models import cognate
from forge_models.cognate.model import CognateForCausalLM, CognateModelConfig, _rope, count_parameters
from forge_models.config import (
    CognateArchConfig,
    CognateConfig,
    DataConfig,
    EvalConfig,
    SyntheticConfig,
    TrainConfig,
    VariantConfig,
)
from forge_models.data import build_corpus
from forge_models.runtime import (
    ConfigError,
    PhaseContext,
    QualityGateFailed,
    RecordingTracker,
    TrainingDiverged,
)
from forge_models.tokenizer import train_bpe
from tests.helpers import Interrupted, StopAt, poison_loss

# ------------------------------------------------------------------------------------------ helpers


def tiny_config(**overrides) -> CognateModelConfig:
    fields = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=64, max_refine_steps=3)
    fields.update(overrides)
    return CognateModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> CognateForCausalLM:
    torch.manual_seed(seed)
    return CognateForCausalLM(tiny_config(**overrides)).eval()


def expected_params(vocab: int, hidden: int, layers: int, inter: int) -> int:
    """Embedding (tied head counted once) + per layer 4 attention + 3 SwiGLU matrices and 2 norms
    + the final norm + the halting head (hidden weights + 1 bias)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden + (hidden + 1)


def set_halting(model: CognateForCausalLM, probability: float) -> None:
    """Make every token's halting probability exactly ``probability`` at every step."""
    with torch.no_grad():
        model.model.halt.weight.zero_()
        model.model.halt.bias.fill_(math.log(probability / (1 - probability)))


class StackCounter:
    """Counts forward calls of the first block: one per application of the block stack."""

    def __init__(self, model: CognateForCausalLM) -> None:
        self.calls = 0
        self.handle = model.model.layers[0].register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = build_corpus(DataConfig(seed=1, synthetic=SyntheticConfig(n_examples=600), validation_percent=10))
    tokenizer = train_bpe([ex.text for ex in corpus.train], 400)
    return corpus, tokenizer


EVAL = EvalConfig(max_examples=4, ppl_max_tokens=1024, max_new_tokens=8, batch_size=8, seq_len=64)
ARCH = CognateArchConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=128,
                         max_position_embeddings=128, max_refine_steps=2)


def phase_config(trunk_steps: int = 150, variant_steps: int = 20, **overrides) -> CognateConfig:
    fields = dict(
        arch=ARCH,
        trunk=TrainConfig(steps=trunk_steps, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=min(10, trunk_steps - 1)),
        variants=[
            VariantConfig(
                name="math",
                train=TrainConfig(steps=variant_steps, batch_size=8, seq_len=64, lr=1e-3,
                                  warmup_steps=min(2, variant_steps - 1), data_mix={"arithmetic": 3.0, "tool": 1.0}),
                act_threshold=0.9,
                max_refine_steps=2,
            )
        ],
        min_unigram_gain=0.5,
    )
    fields.update(overrides)
    return CognateConfig(**fields)


def run_phase(corpus_and_tokenizer, cfg: CognateConfig, **ctx_fields):
    corpus, tokenizer = corpus_and_tokenizer
    ctx = PhaseContext(seed=ctx_fields.pop("seed", 0), precision="fp32", **ctx_fields)
    return cognate.run(cognate.CognateInputs(corpus=corpus, tokenizer=tokenizer, eval_cfg=EVAL), cfg, ctx)


# ------------------------------------------------------------------------------------- architecture


def test_parameter_count_matches_hand_formula_with_tied_embedding_counted_once():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == model.num_parameters() == expected_params(97, 32, 2, 64) == 23_777


@pytest.mark.parametrize(
    "hidden, layers, heads, inter, vocab, llama_golden",
    [(256, 4, 4, 688, 8000, 5_212_416), (512, 8, 8, 1376, 8192, 29_499_904)],
)
def test_golden_sizes_equal_tied_llama_plus_halting_head(hidden, layers, heads, inter, vocab, llama_golden):
    """The reference sizes of phases.md: a tied Llama of the same shape, plus hidden + 1 halting parameters."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = CognateForCausalLM(CognateModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                                                     num_heads=heads, intermediate_size=inter))
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, intermediate_size=inter,
                                             tie_word_embeddings=True))
    assert count_parameters(llama) == llama_golden
    assert count_parameters(ours) == llama_golden + hidden + 1 == expected_params(vocab, hidden, layers, inter)


def test_auto_classes_build_it_and_save_load_round_trips_logits(tmp_path: Path):
    config = AutoConfig.for_model("cognate", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, act_threshold=0.7)
    assert isinstance(config, CognateModelConfig)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(model, CognateForCausalLM)
    ids = torch.randint(0, 97, (2, 12))

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    assert isinstance(loaded, CognateForCausalLM)
    assert loaded.config.act_threshold == 0.7
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert count_parameters(loaded) == count_parameters(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generate_matches_a_manual_greedy_loop():
    model = tiny_model()
    prompt = torch.randint(2, 97, (2, 5))
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=1)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_labels_are_shifted_inside_and_minus_100_is_ignored():
    model = tiny_model(ponder_weight=0.0)
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[:, 5:] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :4].reshape(-1, 97), ids[:, 1:5].reshape(-1))
    assert torch.allclose(out.lm_loss, expected, atol=1e-6)
    assert torch.equal(out.loss, out.lm_loss)  # ponder_weight 0: nothing added


def test_padding_mask_leaves_real_tokens_unchanged():
    model = tiny_model()
    set_halting(model, 0.45)  # tokens need several steps, so the halting path is exercised too
    ids = torch.randint(2, 97, (1, 8))
    padded = torch.cat([torch.ones(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        left_padded = model(padded, attention_mask=mask).logits[:, 3:]
    assert torch.allclose(plain, left_padded, atol=1e-5)


# ---------------------------------------------------------------------------------------------- ACT


def test_ponder_cost_is_differentiable_and_reaches_the_halting_head():
    model = tiny_model(ponder_weight=0.1, max_refine_steps=3).train()
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    assert out.ponder_cost.requires_grad
    assert torch.allclose(out.loss, out.lm_loss + 0.1 * out.ponder_cost)
    out.ponder_cost.backward()
    assert model.model.halt.weight.grad is not None and model.model.halt.weight.grad.abs().sum() > 0
    assert model.model.halt.bias.grad.abs() > 0
    # The gradient of N + R pushes towards halting earlier: R falls as the halting probabilities rise.
    assert model.model.halt.bias.grad < 0


@pytest.mark.parametrize("threshold, steps, remainder", [(0.5, 2, 0.7), (0.95, 4, 0.1)])
def test_refinement_steps_follow_the_halting_threshold(threshold, steps, remainder):
    model = tiny_model(max_refine_steps=6, act_threshold=threshold)
    set_halting(model, 0.3)  # cumulative 0.3, 0.6, 0.9, 1.2: halts when it would reach the threshold
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 7)))
    assert out.refine_steps.item() == steps
    assert out.stack_applications == steps
    assert out.ponder_cost.item() == pytest.approx(steps + remainder, abs=1e-5)


def test_inference_stops_once_every_token_has_halted():
    model = tiny_model(max_refine_steps=4)
    ids = torch.randint(0, 97, (3, 9))

    set_halting(model, 0.999)  # everyone halts at step 1 (threshold 0.99)
    counter = StackCounter(model)
    with torch.no_grad():
        out = model(ids)
    assert counter.calls == 1 and out.stack_applications == 1 and out.refine_steps.item() == 1

    set_halting(model, 0.01)  # nobody halts early: every step runs
    counter.calls = 0
    with torch.no_grad():
        model(ids)
    assert counter.calls == 4


def test_one_refine_step_is_a_plain_decoder():
    model = tiny_model(max_refine_steps=1)
    set_halting(model, 0.01)  # would never halt, but there is only one step
    counter = StackCounter(model)
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, labels=ids)
    assert counter.calls == 1
    assert out.ponder_cost.item() == 2.0 and not out.ponder_cost.requires_grad  # N=1, R=1: a constant
    # Same logits as embed -> blocks -> norm -> head written out by hand.
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        cos, sin = _rope(model.config, torch.arange(9)[None], h.device)
        for layer in model.model.layers:
            h = layer(h, cos, sin, None)
        manual = model.lm_head(model.model.norm(h))
    assert torch.allclose(out.logits, manual, atol=1e-6)


# -------------------------------------------------------------------------------------------- phase


def test_same_seed_gives_bit_identical_first_losses(corpus_and_tokenizer):
    cfg = phase_config(trunk_steps=20)
    series = []
    for seed in (0, 0, 1):
        tracker = StopAt(3)
        with pytest.raises(Interrupted):
            run_phase(corpus_and_tokenizer, cfg, seed=seed, tracker=tracker)
        series.append([v for _, v in tracker.series("trunk/loss")])
    assert len(series[0]) == 3
    assert series[0] == series[1]  # bit-identical floats
    assert series[0] != series[2]  # and the seed matters


def test_scratch_run_learns_and_reports_measured_metrics(corpus_and_tokenizer):
    tracker = RecordingTracker()
    out = run_phase(corpus_and_tokenizer, phase_config(), tracker=tracker)

    assert set(out.models) == {"trunk", "math"}
    unigram = out.metrics["unigram_loss"]
    # Chance sentinel: the random init is no better than uniform over the vocabulary (ln 400 = 5.99).
    assert out.metrics["init/loss"] > unigram and out.metrics["init/loss"] == pytest.approx(math.log(400), abs=0.1)
    for name in ("trunk", "math"):
        assert out.metrics[f"{name}/loss"] < unigram - 0.5
        assert out.metrics[f"{name}/unigram_gain"] == pytest.approx(unigram - out.metrics[f"{name}/loss"])
        assert out.metrics[f"{name}/params"] == count_parameters(out.models[name])
        assert out.metrics[f"{name}/tokens_per_s"] > 0
        assert 1.0 <= out.metrics[f"{name}/refine_steps"] <= 2.0
        for key in ("ppl", "arith_em", "tool_valid", "tool_correct", "choice_acc"):
            assert f"{name}/{key}" in out.metrics
    assert out.models["math"].config.act_threshold == 0.9
    assert out.models["trunk"].config.act_threshold == ARCH.act_threshold
    assert out.details["steps_run"] == 170
    assert out.details["settings"]["math"]["data_mix"] == {"arithmetic": 3.0, "tool": 1.0}
    assert set(out.evaluations["after"]) == {"trunk", "math"} and "init" in out.evaluations["before"]
    # The curve and the tracker saw every step, with global step numbers.
    assert [s for s, _ in out.curves["trunk/loss"]] == list(range(1, 151))
    assert [s for s, _ in out.curves["math/loss"]] == list(range(151, 171))
    assert [s for s, _ in tracker.series("math/ponder")] == list(range(151, 171))
    assert tracker.events[-1][:2] == (170, 170)
    # Real training: the end of the curve is far below its start.
    assert out.curves["trunk/loss"][-1][1] < out.curves["trunk/loss"][0][1] - 2.0


def test_resume_runs_only_the_remaining_steps_and_matches_an_uninterrupted_run(corpus_and_tokenizer, tmp_path):
    cfg = phase_config(trunk_steps=120, variant_steps=10, checkpoint_every=25)
    reference = run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=tmp_path / "reference")

    folder = tmp_path / "resumed"
    saved: list[Path] = []
    with pytest.raises(Interrupted):
        run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=folder, tracker=StopAt(60), on_checkpoint=saved.append)
    # Checkpoints at 25 and 50; only the newest is kept, complete with its marker.
    assert [p.name for p in saved] == ["step-000025", "step-000050"]
    assert [p.name for p in (folder / "trunk").iterdir()] == ["step-000050"]
    assert {p.name for p in (folder / "trunk" / "step-000050").iterdir()} == {
        "model.safetensors", "optimizer.pt", "state.json", "COMPLETE"}

    resumed = run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=folder)
    assert resumed.details["steps_run"] == (120 - 50) + 10
    assert resumed.details["resumed_from"] == {"trunk": 50, "math": None}
    for name in ("trunk", "math"):
        ref_state, new_state = reference.models[name].state_dict(), resumed.models[name].state_dict()
        assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state), name
    assert resumed.curves["trunk/loss"] == reference.curves["trunk/loss"]

    # A finished run is loaded, not retrained.
    again = run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=folder)
    assert again.details["steps_run"] == 0
    assert again.metrics["math/loss"] == resumed.metrics["math/loss"]


def test_checkpoint_of_another_config_is_refused(corpus_and_tokenizer, tmp_path):
    cfg = phase_config(trunk_steps=20, checkpoint_every=5)
    with pytest.raises(Interrupted):
        run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=tmp_path, tracker=StopAt(7))
    changed = phase_config(trunk_steps=20, checkpoint_every=5,
                           trunk=TrainConfig(steps=20, batch_size=8, seq_len=64, lr=1e-3, warmup_steps=5))
    with pytest.raises(ConfigError, match="Clear the checkpoint folder"):
        run_phase(corpus_and_tokenizer, changed, checkpoint_dir=tmp_path)


def test_nan_loss_raises_training_diverged(corpus_and_tokenizer, monkeypatch):
    poison_loss(monkeypatch, at_call=3)
    with pytest.raises(TrainingDiverged, match="step 3"):
        run_phase(corpus_and_tokenizer, phase_config(trunk_steps=20))


def test_quality_gate_rejects_a_model_that_did_not_learn_enough(corpus_and_tokenizer):
    cfg = phase_config(trunk_steps=10, variant_steps=2, min_unigram_gain=100.0)
    with pytest.raises(QualityGateFailed, match="unigram loss is .* min_unigram_gain is 100"):
        run_phase(corpus_and_tokenizer, cfg)


def test_pretrained_route_loads_evaluates_and_passes_models_on(corpus_and_tokenizer, tmp_path):
    _, tokenizer = corpus_and_tokenizer
    for i, name in enumerate(("base", "m0")):
        tiny_model(seed=i, vocab_size=len(tokenizer), max_position_embeddings=128).save_pretrained(tmp_path / name)
    cfg = CognateConfig(source="pretrained", base_models=[str(tmp_path / "m0")], common_base=str(tmp_path / "base"))
    out = run_phase(corpus_and_tokenizer, cfg)
    assert set(out.models) == {"base", "model-0"}
    assert out.tokenizer is tokenizer
    assert out.details["steps_run"] == 0
    assert out.metrics["model-0/loss"] == pytest.approx(math.log(len(tokenizer)), abs=0.1)  # untrained
    assert out.metrics["base/loss"] != out.metrics["model-0/loss"]

    missing = CognateConfig(source="pretrained", base_models=[str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match="not a folder"):
        run_phase(corpus_and_tokenizer, missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        run_phase(corpus_and_tokenizer, CognateConfig(source="pretrained", base_models=[str(tmp_path / "empty")]))
    ViTConfig().save_pretrained(tmp_path / "vision")  # a real HF folder, but no causal LM
    with pytest.raises(ConfigError, match="cannot be loaded as a causal LM"):
        run_phase(corpus_and_tokenizer, CognateConfig(source="pretrained", base_models=[str(tmp_path / "vision")]))
    tiny_model(vocab_size=97).save_pretrained(tmp_path / "small-vocab")  # 97 < the tokenizer's 400 tokens
    with pytest.raises(ConfigError, match="embeds only 97"):
        run_phase(corpus_and_tokenizer, CognateConfig(source="pretrained", base_models=[str(tmp_path / "small-vocab")]))


# --------------------------------------------------------------------------- pretrained route: siblings


def _sibling(name: str, method: str, mix: dict, steps: int = 30, lr: float = 3e-3) -> "SiblingConfig":
    from forge_models.config import LoraSettings, SiblingConfig

    return SiblingConfig(name=name, method=method, lora=LoraSettings(rank=4, alpha=8),
                         train=TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=lr, warmup_steps=2, data_mix=mix))


def _llama_base(tmp_path: Path, vocab: int) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_pretrained_siblings_are_real_fine_tunes_of_one_base_full_and_lora(corpus_and_tokenizer, tmp_path):
    _, tokenizer = corpus_and_tokenizer
    base_dir = _llama_base(tmp_path, len(tokenizer))
    cfg = CognateConfig(source="pretrained", common_base=str(base_dir), siblings=[
        _sibling("math-full", "full", {"arithmetic": 3.0, "tool": 1.0}),
        _sibling("story-lora", "lora", {"narrative": 3.0, "persona": 1.0}, lr=2e-2),
    ])
    out = run_phase(corpus_and_tokenizer, cfg)
    assert set(out.models) == {"base", "math-full", "story-lora"}
    assert out.details["steps_run"] == 60
    assert set(out.evaluations["before"]) == {"base"} and set(out.evaluations["after"]) == {"math-full", "story-lora"}

    # The base is passed on exactly as stored (it is the merge base), the siblings moved away from it.
    stored = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    base = out.models["base"].state_dict()
    assert all(torch.equal(stored[k], base[k]) for k in stored)
    # Both learned: held-out loss below the base's (a random tiny base: LoRA cannot move its embeddings and
    # head, so it gains less than the full fine-tune), and the training loss fell.
    assert out.metrics["math-full/loss"] < out.metrics["base/loss"] - 0.3
    assert out.metrics["story-lora/loss"] < out.metrics["base/loss"] - 0.1
    for name in ("math-full", "story-lora"):
        losses = [v for _, v in out.curves[f"{name}/loss"]]
        assert sum(losses[-5:]) < sum(losses[:5]) - 0.5, name

    # LoRA is merged back: a plain Llama whose adapted projections changed and nothing else did.
    lora = out.models["story-lora"]
    assert type(lora) is LlamaForCausalLM
    assert not any("lora" in k for k in lora.state_dict())
    changed = {k for k, v in lora.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert "model.embed_tokens.weight" not in changed
    full = out.models["math-full"].state_dict()
    assert not torch.equal(full["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # every parameter trains
    assert out.details["settings"]["story-lora"]["lora_rank"] == 4


def test_pretrained_sibling_resumes_bit_identical(corpus_and_tokenizer, tmp_path):
    _, tokenizer = corpus_and_tokenizer
    base_dir = _llama_base(tmp_path, len(tokenizer))
    cfg = CognateConfig(source="pretrained", common_base=str(base_dir), checkpoint_every=5,
                        siblings=[_sibling("a", "lora", {"arithmetic": 1.0}, steps=12),
                                  _sibling("b", "full", {"tool": 1.0}, steps=6)])
    reference = run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=tmp_path / "reference")
    with pytest.raises(Interrupted):
        run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=tmp_path / "resumed", tracker=StopAt(8))
    resumed = run_phase(corpus_and_tokenizer, cfg, checkpoint_dir=tmp_path / "resumed")
    assert resumed.details["resumed_from"] == {"a": 5, "b": None}
    assert resumed.details["steps_run"] == (12 - 5) + 6
    for name in ("a", "b"):
        ref, new = reference.models[name].state_dict(), resumed.models[name].state_dict()
        assert all(torch.equal(ref[k], new[k]) for k in ref), name


def test_sibling_config_is_refused_before_any_compute(tmp_path):
    from pydantic import ValidationError

    sib = _sibling("s", "lora", {"arithmetic": 1.0})
    with pytest.raises(ValidationError, match="fine-tuned from cognate.common_base"):
        CognateConfig(source="pretrained", siblings=[sib])
    with pytest.raises(ValidationError, match="reserved"):
        CognateConfig(source="pretrained", common_base="x", siblings=[_sibling("base", "full", {"tool": 1.0})])
    with pytest.raises(ValidationError, match="unique"):
        CognateConfig(source="pretrained", common_base="x", siblings=[sib, sib])
    with pytest.raises(ValidationError, match="only used with cognate.source 'pretrained'"):
        CognateConfig(siblings=[sib])


def test_lora_sibling_with_targets_that_match_nothing_is_refused(corpus_and_tokenizer, tmp_path):
    from forge_models.config import LoraSettings, SiblingConfig

    _, tokenizer = corpus_and_tokenizer
    base_dir = _llama_base(tmp_path, len(tokenizer))
    bad = SiblingConfig(name="s", method="lora", lora=LoraSettings(targets=("no_such_proj",)),
                        train=TrainConfig(steps=2, warmup_steps=0, batch_size=2, seq_len=16))
    with pytest.raises((ConfigError, ValueError), match="no_such_proj"):
        run_phase(corpus_and_tokenizer, CognateConfig(source="pretrained", common_base=str(base_dir), siblings=[bad]))
