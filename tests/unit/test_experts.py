"""SVF experts (phase 7): basis, composition, functional attachment, training, dispatch, storage, ternary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forge_models.config import EvalConfig
from forge_models.data.synthetic import Example
from forge_models.experts import (SKILLS, ExpertsConfig, MaskState, Skill, TrainSettings, UNKNOWN, attached, cem,
                                  compose, decompose, find_targets, load_experts, mask_from_z, mix_masks,
                                  reference_reply, run_grouped, save_experts, skill_with, train_expert,
                                  z_count)
from forge_models.runtime import ArtifactIntegrityError, ConfigError, PhaseContext
from tests.factories import save_tokenizer, tiny_cognate, tiny_llama

CTX = PhaseContext(device=torch.device("cpu"), precision="fp32")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, saved) -> bool:
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def _ids(vocab=97, n=3, t=12, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _random_z(bases, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(b.rank, generator=g) * std for n, b in bases.items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_cognate])
def test_svd_reconstructs_and_uniform_mask_returns_w(make):
    model = make()
    targets = find_targets(model, ["mlp"])
    assert len(targets) == 6 and all("mlp" in t for t in targets)  # MLP only, as released
    bases = decompose(model, targets)
    modules = dict(model.named_modules())
    for name, b in bases.items():
        w = modules[name].weight.detach()
        assert (b.U * b.S) @ b.Vh == pytest.approx(w, abs=1e-5)  # noqa: PT009 (tensors: see next line)
        assert torch.allclose((b.U * b.S) @ b.Vh, w, atol=1e-5)
        for value in (0.525, 0.9, 0.1):  # any uniform mask: the renormalisation cancels it
            assert torch.allclose(compose(w, b, torch.full((b.rank,), value)), w, atol=1e-5)
        # a non-uniform mask does change W (the test above is not vacuous)
        assert (compose(w, b, torch.linspace(0.1, 0.9, b.rank)) - w).abs().max() > 1e-3
    assert z_count(bases) == sum(min(modules[n].weight.shape) for n in targets)


def test_z_count_is_sum_of_min_dims():
    model = tiny_llama(hidden=64, inter=128)
    bases = decompose(model, find_targets(model, ["mlp"]))
    assert z_count(bases) == 2 * 3 * 64 == 384


def test_only_z_gets_gradients_and_base_stays_bit_identical():
    model = tiny_llama()
    params_before = {n: p for n, p in model.named_parameters()}
    saved = _state(model)
    bases = decompose(model, find_targets(model, ["mlp"]))
    z = {n: t.requires_grad_(True) for n, t in _random_z(bases, 0.5).items()}
    for p in model.parameters():
        p.requires_grad_(False)
    state = MaskState()
    with attached(model, bases, state):
        state.masks = {n: mask_from_z(t, 1.0) for n, t in z.items()}
        loss = model(input_ids=_ids()).logits.float().logsumexp(-1).mean()
        loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in z.values())
    assert all(p.grad is None for p in model.parameters())
    assert _same_state(model, saved)
    # the very same Parameter objects are back (nothing was written through .data)
    assert all(p is params_before[n] for n, p in model.named_parameters())


def test_attached_changes_outputs_and_restores_base():
    model = tiny_cognate()
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    saved = _state(model)
    bases = decompose(model, find_targets(model, ["mlp"]))
    state = MaskState()
    state.masks = {n: mask_from_z(t, 1.0) for n, t in _random_z(bases).items()}
    with torch.no_grad(), attached(model, bases, state):
        adapted = model(input_ids=ids).logits
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-4
    assert torch.equal(after, base) and _same_state(model, saved)


def _toy_setup(tmp_path):
    """The reference's toy: a random Llama (init 0.1) and a reward = share of sampled tokens in a target set."""
    from transformers import AutoTokenizer

    vocab = 64
    save_tokenizer(tmp_path, vocab)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = tiny_llama(vocab=vocab, initializer_range=0.1)
    model.generation_config.eos_token_id = None
    tok.eos_token = "t1"
    target = {f"t{i}" for i in range(16, 24)}  # 8 of 64 tokens: chance 12.5%

    def reward(reply: str, _ex: Example) -> float:
        words = reply.split()
        return sum(w in target for w in words) / max(len(words), 1)

    skill = Skill("toy", "arithmetic", "toy", "reinforce", (), reward)
    examples = [Example(kind="arithmetic", text=f"t{i} t{i + 2}", prompt=f"t{i} t{i + 2}", answer="x")
                for i in range(30, 46)]
    return model, tok, skill, examples


def _mean_reward(model, tok, skill, examples, bases, z, max_mult=1.0):
    from forge_models.generation import GenerationConfig, generate

    state = MaskState()
    state.masks = None if z is None else {n: mask_from_z(t, max_mult) for n, t in z.items()}
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, batch_size=64)
    with attached(model, bases, state):
        outs = generate(model, tok, [ex.prompt for ex in examples for _ in range(8)], cfg, CTX,
                        generator=torch.Generator().manual_seed(123))
    return float(np.mean([skill.reward(o.text, None) for o in outs]))


@pytest.fixture
def one_thread():
    """Sampling many short sequences: two threads on a loaded 2-core machine were 30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_toy_reward_rises_by_at_least_0_10(tmp_path, one_thread):
    model, tok, skill, examples = _toy_setup(tmp_path)
    saved = _state(model)
    bases = decompose(model, find_targets(model, ["mlp"]))
    # Budget: 100 steps (reference: 150). Measured: +0.25 to +0.39 over seeds 0-2 (60 steps gave only +0.10).
    settings = TrainSettings(steps=100, batch_size=16, samples=4, temperature=1.0, max_new_tokens=16, lr=0.1,
                             kl_coeff=0.0, max_grad_norm=1.0, init_value=0.1, init_std=0.01, max_mult=1.0)
    before = _mean_reward(model, tok, skill, examples, bases, None)
    z, log = train_expert(model, tok, bases, skill, examples, settings, CTX, seed=0)
    after = _mean_reward(model, tok, skill, examples, bases, z)
    assert after - before >= 0.10, (before, after, [round(e["reward"], 3) for e in log[::10]])
    assert _same_state(model, saved)


def test_one_hot_alpha_reproduces_expert_k(tmp_path):
    model = tiny_llama()
    bases = decompose(model, find_targets(model, ["mlp"]))
    experts = {"a": _random_z(bases, seed=1), "b": _random_z(bases, seed=2), "c": _random_z(bases, seed=3)}
    save_experts(tmp_path / "lib", bases, experts, 1.0, {})
    lib = load_experts(tmp_path / "lib")
    ids = _ids()
    for k in experts:
        alpha = {e: float(e == k) for e in experts}
        mixed = mix_masks(lib.z, alpha, 1.0)
        assert all(torch.equal(mixed[n], mask_from_z(lib.z[k][n], 1.0)) for n in bases)
        with torch.no_grad(), lib.apply(model, alpha=alpha):
            a = model(input_ids=ids).logits
        with torch.no_grad(), lib.apply(model, k):
            b = model(input_ids=ids).logits
        assert torch.equal(a, b)


def test_cem_reaches_a_planted_optimum():
    target = np.random.default_rng(7).uniform(0, 1, size=4)
    result = cem(lambda a: -float(np.sum((a - target) ** 2)), 4, population=32, elite=0.2, iterations=50, seed=0)
    assert np.abs(result.best - target).max() < 0.05
    assert result.history == sorted(result.history)  # best-so-far never gets worse


def test_cem_breaks_ties_of_a_flat_score_by_the_second_value():
    """A few-shot accuracy is flat over most of the box (8 shots: steps of 1/8); ranked by it alone CEM keeps its
    first draw, ranked by (accuracy, log-likelihood of the correct answers) it still climbs."""
    target = np.random.default_rng(7).uniform(0, 1, size=4)
    flat = cem(lambda a: 1.0, 4, population=32, iterations=50, seed=0)
    tied = cem(lambda a: (1.0, -float(np.sum((a - target) ** 2))), 4, population=32, iterations=50, seed=0)
    assert np.abs(flat.best - target).max() > 0.05  # the control: no signal, no progress
    assert np.abs(tied.best - target).max() < 0.05 and tied.best_score == 1.0 and tied.best_key[0] == 1.0


def test_stored_expert_reloads_with_identical_outputs_and_refuses_tampering(tmp_path):
    model = tiny_cognate()
    bases = decompose(model, find_targets(model, ["mlp"]))
    z = {"arithmetic": _random_z(bases, seed=4)}
    ids = _ids()
    state = MaskState()
    state.masks = {n: mask_from_z(t, 1.0) for n, t in z["arithmetic"].items()}
    with torch.no_grad(), attached(model, bases, state):
        trained = model(input_ids=ids).logits
    folder = save_experts(tmp_path / "lib", bases, z, 1.0, {"note": "x"})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["basis.safetensors", "experts.json", "experts.safetensors", "manifest.json"]
    lib = load_experts(folder)
    with torch.no_grad(), lib.apply(model, "arithmetic"):
        reloaded = model(input_ids=ids).logits
    assert torch.equal(trained, reloaded)
    with pytest.raises(ConfigError, match="already holds"):
        save_experts(folder, bases, z, 1.0, {})
    data = bytearray((folder / "experts.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "experts.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="experts.safetensors"):
        load_experts(folder)


def test_library_refuses_another_model(tmp_path):
    bases = decompose(tiny_llama(seed=0), find_targets(tiny_llama(seed=0), ["mlp"]))
    save_experts(tmp_path / "lib", bases, {"tool": _random_z(bases)}, 1.0, {})
    with pytest.raises(ConfigError, match="fingerprint"):
        with load_experts(tmp_path / "lib").apply(tiny_llama(seed=1), "tool"):
            pass


def test_ternary_expert_survives_storage(tmp_path):
    from forge_models import bitnet
    from forge_models.bitnet.quant import weight_quant

    model = tiny_llama(seed=3)
    bitnet.convert_to_bitnet(model, keep_patterns=["lm_head"])
    model.eval()
    ids = _ids()
    bases = decompose(model, find_targets(model, ["mlp"]), ternary_rank=8)
    assert all(b.ternary and b.rank == 8 for b in bases.values())
    z = {"persona": _random_z(bases, std=2.0, seed=5)}
    state = MaskState()
    state.masks = {n: mask_from_z(t, 1.0) for n, t in z["persona"].items()}
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with attached(model, bases, state):
            trained = model(input_ids=ids).logits
    change = (trained - base).abs().max()
    assert change > 1e-3
    # The naive form (scale the latent weight's singular values, then re-ternarise) loses most of it:
    modules = dict(model.named_modules())
    flipped = []
    for n, b in bases.items():
        w = modules[n].weight.detach()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        m = torch.ones_like(S)
        m[: b.rank] = state.masks[n] * (S[: b.rank].sum() / (S[: b.rank] * state.masks[n]).sum())
        flipped.append(float((weight_quant((U * (S * m)) @ Vh)[0] != weight_quant(w)[0]).float().mean()))
    assert max(flipped) < 0.5  # most ternary codes do not move at all under the naive form
    bitnet.save_latent(model, tmp_path / "latent", keep_patterns=["lm_head"], act_norm="rms")
    save_experts(tmp_path / "lib", bases, z, 1.0, {})
    again = bitnet.load_latent(tmp_path / "latent").eval()
    lib = load_experts(tmp_path / "lib")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, base)
        with lib.apply(again, "persona"):
            reloaded = again(input_ids=ids).logits
    assert torch.allclose(reloaded, trained, atol=1e-6)
    assert (reloaded - base).abs().max() > 1e-3


def test_ternary_expert_trains_only_z():
    from forge_models import bitnet

    model = tiny_llama(seed=3)
    bitnet.convert_to_bitnet(model, keep_patterns=["lm_head"])
    saved = _state(model)
    bases = decompose(model, find_targets(model, ["mlp"]), ternary_rank=4)
    z = {n: t.requires_grad_(True) for n, t in _random_z(bases, 0.5).items()}
    for p in model.parameters():
        p.requires_grad_(False)
    state = MaskState()
    with attached(model, bases, state):
        state.masks = {n: mask_from_z(t, 1.0) for n, t in z.items()}
        model(input_ids=_ids()).logits.float().logsumexp(-1).mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in z.values())
    assert all(p.grad is None for p in model.parameters()) and _same_state(model, saved)


def test_dispatch_groups_restore_base_and_unknown_means_base():
    model = tiny_llama()
    saved = _state(model)
    bases = decompose(model, find_targets(model, ["mlp"]))
    masks = {k: {n: mask_from_z(t, 1.0) for n, t in _random_z(bases, seed=s).items()} for k, s in (("a", 1), ("b", 2))}
    ids = _ids(n=6)

    def score(idx):
        with torch.no_grad():
            return [float(model(input_ids=ids[i : i + 1]).logits.sum()) for i in idx]

    base = score(list(range(6)))
    routed = run_grouped(model, bases, ["a", UNKNOWN, "b", "a", UNKNOWN, "b"], masks, score)
    assert routed[1] == base[1] and routed[4] == base[4]  # unknown -> base weights
    assert routed[0] != base[0] and routed[2] != base[2]
    assert _same_state(model, saved)
    assert run_grouped(model, bases, [UNKNOWN] * 6, masks, score) == base


def test_config_refuses_unknown_skill_and_names_the_choices():
    with pytest.raises(ValueError, match="arithmetic"):
        ExpertsConfig(skills=["juggling"])
    from forge_models.experts.config import SKILL_NAMES

    assert set(ExpertsConfig().skills) == set(SKILLS) == set(SKILL_NAMES)


def test_skill_rewards_are_the_harness_checks():
    ex = Example(kind="tool", text="", prompt="p", answer="7")
    assert SKILLS["tool"].reward(" <tool>calculator(15 - 8)</tool>", ex) == 1.0
    assert SKILLS["tool"].reward(" <tool>calculator(15 - 7)</tool>", ex) == -1.0
    ex = Example(kind="arithmetic", text="", prompt="p", answer="18")
    assert SKILLS["arithmetic"].reward(" 13 + 5 = 18. The answer is 18.", ex) == 1.0
    assert SKILLS["arithmetic"].reward(" The answer is 17.", ex) == -1.0


def test_objectives_are_chosen_only_for_generation_skills_of_the_run():
    assert ExpertsConfig(objectives={"arithmetic": "answer"}).objectives == {"arithmetic": "answer"}
    with pytest.raises(ValueError, match="not generation skills"):
        ExpertsConfig(objectives={"persona": "answer"})
    with pytest.raises(ValueError, match="not generation skills"):
        ExpertsConfig(skills=["tool"], objectives={"arithmetic": "answer"})
    with pytest.raises(ValueError):
        ExpertsConfig(objectives={"arithmetic": "sft"})
    assert skill_with("arithmetic", "answer").objective == "answer" and SKILLS["arithmetic"].objective == "reinforce"
    with pytest.raises(ConfigError, match="cannot be trained"):
        skill_with("narrative", "answer")


def test_the_reference_reply_is_what_one_model_call_generates():
    tool = Example(kind="tool", text="User: q\nAssistant: <tool>calculator(15 - 8)</tool>\nTool: 7\nAssistant: The "
                                     "answer is 7.\n", prompt="User: q\nAssistant:", answer="7")
    assert reference_reply(tool, SKILLS["tool"].stops) == " <tool>calculator(15 - 8)</tool>"
    arith = Example(kind="arithmetic", text="Q: 1+1?\nA: 1 + 1 = 2. The answer is 2.\n", prompt="Q: 1+1?\nA:", answer="2")
    assert reference_reply(arith, SKILLS["arithmetic"].stops) == " 1 + 1 = 2. The answer is 2.\n"
    with pytest.raises(ConfigError, match="no reference reply"):
        reference_reply(Example(kind="arithmetic", text="Q: 1+1?\nA:", prompt="Q: 1+1?\nA:", answer="2"))


def _reply_nll(model, tok, examples, bases, z, reply):
    from forge_models.generation import GenerationConfig, prompt_ids

    state = MaskState()
    state.masks = None if z is None else {n: mask_from_z(t, 1.0) for n, t in z.items()}
    total = 0.0
    with attached(model, bases, state), torch.no_grad():
        for ex in examples:
            p = prompt_ids(tok, ex.prompt, GenerationConfig())  # the context generation (and training) sees
            r = tok(reply, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            total -= float(sum(logp[len(p) + i - 1, t] for i, t in enumerate(r))) / len(r)
    return total / len(examples)


def test_where_every_reward_is_minus_one_reinforce_cannot_move_and_the_answer_objective_learns(tmp_path, one_thread):
    model, tok, _skill, _ = _toy_setup(tmp_path)
    reply = " t20 t21 t22"
    examples = [Example(kind="arithmetic", text=f"t{i} t{i + 2}{reply}", prompt=f"t{i} t{i + 2}", answer="9")
                for i in range(30, 46)]
    never = Skill("never", "arithmetic", "arith_em", "reinforce", (), lambda _r, _e: -1.0)  # a base that never succeeds
    bases = decompose(model, find_targets(model, ["mlp"]))
    settings = TrainSettings(steps=20, batch_size=8, samples=2, temperature=1.0, max_new_tokens=4, lr=0.1,
                             kl_coeff=0.0, max_grad_norm=1.0, init_value=0.1, init_std=0.01, max_mult=1.0)
    z0 = {n: t.clone() for n, t in train_expert(model, tok, bases, never, examples,
                                                TrainSettings(**{**settings.__dict__, "steps": 1, "lr": 1e-12}),
                                                CTX, seed=0)[0].items()}
    z_rl, log = train_expert(model, tok, bases, never, examples, settings, CTX, seed=0)
    assert all(e["grad_norm"] == 0.0 for e in log)  # constant reward: zero advantage, zero gradient
    assert all(torch.allclose(z_rl[n], z0[n], atol=1e-9) for n in z0)
    answer = Skill("never", "arithmetic", "arith_em", "answer", ())
    z_ce, log = train_expert(model, tok, bases, answer, examples, settings, CTX, seed=0)
    before = _reply_nll(model, tok, examples, bases, None, reply)
    after = _reply_nll(model, tok, examples, bases, z_ce, reply)
    assert after < 0.8 * before, (before, after, [round(e["ce"], 3) for e in log[::5]])
    assert log[-1]["ce"] < log[0]["ce"]


def test_an_answer_objective_example_without_a_reply_is_refused_before_any_compute(tmp_path, monkeypatch):
    import dataclasses

    from forge_models.experts import ExpertsInputs, run
    from forge_models.experts import phase as phase_mod
    from tests.factories import corpus_and_tokenizer

    corpus, tok = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    bad = Example(kind="tool", text="User: what is 2 plus 2?\nAssistant:", prompt="User: what is 2 plus 2?\nAssistant:",
                  answer="4")
    corpus = dataclasses.replace(corpus, train=(*corpus.train, bad))
    model = tiny_llama(vocab=len(tok), max_position_embeddings=256)
    monkeypatch.setattr(phase_mod, "decompose", lambda *a, **k: pytest.fail("SVD ran before the refusal"))
    eval_cfg = EvalConfig(max_examples=4, max_new_tokens=4, ppl_max_tokens=64, seq_len=32, bootstrap_samples=200)
    cfg = ExpertsConfig(skills=["tool"], steps=2, objectives={"tool": "answer"})
    with pytest.raises(ConfigError, match="no reference reply"):
        run(ExpertsInputs(model, tok, corpus, eval_cfg, tmp_path / "lib"), cfg, CTX)
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("ternary", [False, True])
def test_phase_run_stores_a_library_and_leaves_the_model_unchanged(tmp_path, one_thread, ternary):
    from forge_models import bitnet
    from forge_models.experts import ExpertsInputs, run
    from tests.factories import corpus_and_tokenizer

    corpus, tok = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    model = tiny_llama(vocab=len(tok), max_position_embeddings=256)
    if ternary:
        bitnet.convert_to_bitnet(model, keep_patterns=["lm_head"])
        model.eval()
    saved = _state(model)
    # Tool by the answer objective (the others by their defaults): recorded in the stored library.
    cfg = ExpertsConfig(steps=2, batch_size=2, samples=2, max_new_tokens=4, eval_examples=4, ternary_rank=4,
                        objectives={"tool": "answer"})
    eval_cfg = EvalConfig(max_examples=4, max_new_tokens=4, ppl_max_tokens=64, seq_len=32, bootstrap_samples=200)
    out = run(ExpertsInputs(model, tok, corpus, eval_cfg, tmp_path / "lib"), cfg, CTX)
    assert _same_state(model, saved)
    lib = load_experts(tmp_path / "lib")
    assert lib.skills == sorted(cfg.skills)
    assert out.details["ternary_targets"] == (6 if ternary else 0)
    assert out.metrics["z_per_expert"] == (6 * 4 if ternary else 2 * 3 * 64)
    for k in cfg.skills:
        assert out.metrics[f"{k}/d_lo"] <= out.metrics[f"{k}/d"] <= out.metrics[f"{k}/d_hi"]
    assert 0.0 <= out.metrics["dispatch/accuracy"] <= 1.0
    meta = json.loads((tmp_path / "lib" / "experts.json").read_text())
    assert meta["dispatch"]["method"] == "exemplar"
    assert {k: v["objective"] for k, v in meta["skills_info"].items()} == {
        "arithmetic": "reinforce", "tool": "answer", "persona": "choice", "narrative": "choice"}


# ------------------------------------------------------------------ basis-free storage, re-based on the model


def _library(model, ternary_rank=16, seed=7):
    from forge_models.experts import ExpertLibrary

    bases = decompose(model, find_targets(model, ["mlp"]), ternary_rank=ternary_rank)
    z = {"arithmetic": _random_z(bases, seed=seed), "tool": _random_z(bases, seed=seed + 1)}
    return ExpertLibrary(bases, z, 1.0, {"note": "kept"})


def _ternary_model():
    from forge_models import bitnet

    model = tiny_llama(seed=3)
    bitnet.convert_to_bitnet(model, keep_patterns=["lm_head"])
    return model.eval()


def _packed(model):
    """The model with every BitLinear replaced by the PackedBitLinear the compressed artifact loads."""
    import copy

    from forge_models.bitnet.layers import BitLinear, PackedBitLinear

    packed = copy.deepcopy(model)
    for name, module in list(packed.named_modules()):
        if isinstance(module, BitLinear):
            parent, _, child = name.rpartition(".")
            setattr(packed.get_submodule(parent), child, PackedBitLinear.from_bitlinear(module))
    return packed


@pytest.mark.parametrize("kind", ["dense", "ternary", "ternary_packed"])
def test_basis_free_library_rebased_on_the_same_weights_is_the_trained_expert(tmp_path, kind):
    from forge_models.experts import save_expert_vectors, svf_delta

    model = tiny_llama(seed=2) if kind == "dense" else _ternary_model()
    lib = _library(model, ternary_rank=8)
    target = model if kind != "ternary_packed" else _packed(model)
    folder = save_expert_vectors(tmp_path / "vec", lib)
    assert sorted(p.name for p in folder.iterdir()) == [
        "experts.json", "experts.safetensors", "manifest.json", "trained_singular_values.safetensors"]
    doc = json.loads((folder / "experts.json").read_text())
    assert doc["storage"] == "vectors" and doc["note"] == "kept"
    assert [t["fingerprint"] for t in doc["targets"]] == [b.fingerprint for b in lib.bases.values()]
    with pytest.raises(ConfigError, match="stores no basis"):
        load_experts(folder)
    again = load_experts(folder, model=target)
    assert all(not r.changed and r.s_rel_change == 0.0 for r in again.rebased.values())
    assert again.rebase_summary()["targets_changed"] == 0
    for skill in lib.skills:
        for name, b in lib.bases.items():
            mask = mask_from_z(lib.z[skill][name], 1.0)
            assert again.bases[name].ternary == b.ternary
            assert torch.allclose(svf_delta(again.bases[name], mask), svf_delta(b, mask), atol=1e-5, rtol=0)
    ids = _ids()
    with torch.no_grad():
        base = target(input_ids=ids).logits
        with lib.apply(model, "tool"):
            trained = model(input_ids=ids).logits
        with again.apply(target, "tool"):
            rebased = target(input_ids=ids).logits
        assert torch.equal(target(input_ids=ids).logits, base)  # restored bit for bit
    assert (rebased - base).abs().max() > 1e-3
    assert torch.allclose(rebased, trained, atol=1e-4, rtol=0)
    # Saving the re-based library again keeps the trained fingerprints and singular values.
    save_expert_vectors(tmp_path / "vec2", again)
    assert json.loads((tmp_path / "vec2" / "experts.json").read_text())["targets"] == doc["targets"]


def test_the_composition_does_not_depend_on_the_sign_of_a_singular_pair():
    from forge_models.experts import TargetBasis, svf_delta

    model = tiny_llama(seed=4)
    bases = decompose(model, find_targets(model, ["mlp"]))
    z = _random_z(bases, seed=9)
    g = torch.Generator().manual_seed(0)
    for name, b in bases.items():
        flip = torch.where(torch.rand(b.rank, generator=g) < 0.5, -1.0, 1.0)
        flipped = TargetBasis(name, b.U * flip, b.S, flip[:, None] * b.Vh, b.ternary, b.full_rank, b.fingerprint)
        mask = mask_from_z(z[name], 1.0)
        assert (flip < 0).any()
        assert torch.allclose(svf_delta(flipped, mask), svf_delta(b, mask), atol=1e-6, rtol=0)


def test_basis_free_library_on_other_weights_records_the_moved_basis(tmp_path, caplog):
    from forge_models.experts import save_expert_vectors

    model = tiny_llama(seed=2)
    lib = _library(model)
    save_expert_vectors(tmp_path / "vec", lib)
    other = tiny_llama(seed=2)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.01 * torch.randn_like(other.model.layers[0].mlp.up_proj.weight))
    with caplog.at_level("WARNING", logger="forge_models.experts"):
        again = load_experts(tmp_path / "vec", model=other)
    moved = {n for n, r in again.rebased.items() if r.changed}
    assert moved == {"model.layers.0.mlp.up_proj"}
    assert again.rebased["model.layers.0.mlp.up_proj"].s_rel_change > 0
    assert "re-based on other weights" in caplog.text and "1 of 6 targets" in caplog.text


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / "experts.safetensors").write_bytes((f / "experts.safetensors").read_bytes()[:-1] + b"\x00"),
     "experts.safetensors"),
    (lambda f: (f / "experts.safetensors").unlink(), "experts.safetensors"),
    (lambda f: (f / "trained_singular_values.safetensors").unlink(), "trained_singular_values.safetensors"),
    (lambda f: (f / "manifest.json").unlink(), "manifest.json"),
])
def test_a_tampered_or_missing_expert_vector_file_is_refused_naming_it(tmp_path, damage, named):
    from forge_models.experts import save_expert_vectors

    model = tiny_llama(seed=2)
    folder = save_expert_vectors(tmp_path / "vec", _library(model))
    damage(folder)
    with pytest.raises(ArtifactIntegrityError, match=named.replace(".", r"\.")):
        load_experts(folder, model=model)


@pytest.mark.parametrize("other, problem", [
    (lambda: tiny_llama(seed=2, num_hidden_layers=1), "no such layer"),
    (lambda: tiny_llama(seed=2, inter=96), "shape"),
    (lambda: _ternary_model(), "ternary"),
])
def test_a_library_whose_targets_the_model_lacks_is_refused_before_any_svd(tmp_path, monkeypatch, other, problem):
    from forge_models.experts import library, save_expert_vectors

    folder = save_expert_vectors(tmp_path / "vec", _library(tiny_llama(seed=2)))
    model = other()
    calls = []
    monkeypatch.setattr(library, "basis_of", lambda *a, **k: calls.append(a))
    with pytest.raises(ConfigError, match=problem):
        load_experts(folder, model=model)
    assert calls == []
