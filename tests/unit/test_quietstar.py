"""Quiet-STaR unit tests (reference "tests that can fail"): tiny random Llama and Cognate, seconds."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from forge_models.quietstar import (
    QuietStar,
    QuietStarConfig,
    advantages,
    generate_ids,
    load_quietstar,
    quietstar_loss,
    save_quietstar,
    sequential_hidden,
    stream_hidden,
    talk_targets,
    thought_logits,
)
from forge_models.quietstar.thoughts import Streams
from tests.factories import save_tokenizer, tiny_cognate, tiny_llama

VOCAB = 97


@pytest.fixture
def tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    save_tokenizer(tmp_path / "tok", VOCAB)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    tok.eos_token = "t1"
    return tok


def _wrap(model, tokenizer, **cfg) -> QuietStar:
    torch.manual_seed(0)
    qs = QuietStar.wrap(model, tokenizer, QuietStarConfig(**cfg))
    return qs.float()


@pytest.mark.parametrize("make", [tiny_llama, tiny_cognate], ids=["llama", "cognate"])
def test_parallel_equals_sequential_and_no_leak(make, tokenizer):
    qs = _wrap(make(), tokenizer).eval()
    assert qs.model.get_input_embeddings().weight.shape[0] == VOCAB + 2
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, VOCAB, (2, 12), generator=g)
    thoughts = torch.randint(2, VOCAB, (2, 12, 4), generator=g)
    thoughts[:, :, 0] = qs.start_id
    with torch.no_grad():
        par = stream_hidden(qs, x, thoughts).float()
        seq = sequential_hidden(qs, x, thoughts)
        torch.testing.assert_close(par, seq, atol=1e-5, rtol=1e-5)
        # Leak test: a different thought at position j changes nothing anywhere else, bit for bit.
        j = 5
        other = thoughts.clone()
        other[:, j, 1:] = (other[:, j, 1:] + 7) % VOCAB
        par2 = stream_hidden(qs, x, other).float()
    keep = [i for i in range(12) if i != j]
    assert torch.equal(par[:, keep], par2[:, keep])
    assert not torch.equal(par[:, j, 1:], par2[:, j, 1:])


def test_cognate_two_d_mask_behaviour_unchanged():
    model = tiny_cognate()
    x = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        plain = model(x).logits
        ones = model(x, attention_mask=torch.ones_like(x)).logits
        causal = torch.zeros(1, 1, 10, 10).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), -1e30)
        four_d = model(x, attention_mask=causal, position_ids=torch.arange(10)[None]).logits
    assert torch.equal(plain, ones)
    torch.testing.assert_close(four_d, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, attention_mask=causal)


@pytest.mark.parametrize("make", [tiny_llama, tiny_cognate], ids=["llama", "cognate"])
def test_zero_init_mixing_reproduces_base_logits(make, tokenizer):
    qs = _wrap(make(), tokenizer).eval()
    x = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        base = qs.logits(Streams(qs, x).base)
        mixed = thought_logits(qs, x)
    base[..., [qs.start_id, qs.end_id]] = float("-inf")
    assert torch.equal(mixed, base)
    out = quietstar_loss(qs, x, torch.Generator().manual_seed(0))
    # w = 0: every talk prediction is the base prediction, so the talk NLL has no gain and rewards are 0.
    assert out["w_abs"].item() == 0.0 and out["reward"].item() == 0.0


def test_advantages_sum_to_zero_before_clamping():
    r = torch.randn(2, 3, 7)
    assert torch.allclose(advantages(r, clamp=False).sum(0), torch.zeros(3, 7), atol=1e-6)
    assert (advantages(r, clamp=True) >= 0).all()
    assert torch.equal(advantages(torch.tensor([[1.0], [-1.0]]), clamp=True), torch.tensor([[1.0], [0.0]]))


def test_one_sgd_step_raises_positive_reward_thought_logprob(tokenizer):
    qs = _wrap(tiny_llama(), tokenizer)
    x = torch.randint(2, VOCAB, (1, 8))

    def thought_logp():
        st = Streams(qs, x)
        h = st.step(torch.full_like(x, qs.start_id))
        return torch.log_softmax(qs.logits(h) / 3.0, -1)[0, 3, 42]  # log p(thought token 42) at position 3

    for adv, should_rise in ((torch.tensor(1.0), True), (advantages(torch.tensor([-1.0, 1.0]), True)[0], False)):
        before = thought_logp().detach()
        opt = torch.optim.SGD(qs.parameters(), lr=0.05)
        opt.zero_grad()
        (-(adv * thought_logp()).sum()).backward()
        opt.step()
        after = thought_logp().detach()
        if should_rise:
            assert after > before
        else:
            assert torch.equal(after, before)  # clamped to 0: no update


def test_talk_labels_shifted_by_one_to_k():
    x = torch.arange(10)[None] + 100
    targets, valid = talk_targets(x, 3)
    for j in range(10):
        for i in range(3):
            assert bool(valid[0, j, i]) == (j + 1 + i < 10)
            if valid[0, j, i]:
                assert targets[0, j, i] == 100 + j + 1 + i


def test_training_step_moves_mixing_weight_and_is_finite(tokenizer):
    qs = _wrap(tiny_llama(), tokenizer, thought_tokens=2, n_ahead_talk=2)
    x = torch.randint(2, VOCAB, (2, 12))
    opt = torch.optim.AdamW(qs.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = quietstar_loss(qs, x, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert torch.isfinite(out["loss"])
    assert quietstar_loss(qs, x, g)["w_abs"].item() > 0


def test_generation_never_emits_thought_tokens_and_survives_reload(tokenizer, tmp_path):
    qs = _wrap(tiny_llama(), tokenizer, thought_tokens=2)
    with torch.no_grad():  # make the delimiters the most likely tokens everywhere, and give w a value
        qs.model.lm_head.weight[[qs.start_id, qs.end_id]] *= 0
        qs.model.lm_head.weight[[qs.start_id, qs.end_id]] += qs.model.lm_head.weight[:VOCAB].sum(0) * 50
        qs.head.net[-1].bias.fill_(0.3)
    qs.eval()
    prompt = [5, 6, 7]
    out = generate_ids(qs, prompt, 12)
    assert out and qs.start_id not in out and qs.end_id not in out
    plain = generate_ids(qs, prompt, 12, budget=0)
    save_quietstar(qs, tokenizer, tmp_path / "qs")
    qs2, tok2 = load_quietstar(tmp_path / "qs")
    assert tok2.convert_tokens_to_ids("<|startthought|>") == qs.start_id
    assert generate_ids(qs2, prompt, 12) == out
    assert generate_ids(qs2, prompt, 12, budget=0) == plain
    thinking = QuietStar.from_pretrained(tmp_path / "qs")
    assert thinking.generate(prompt, 12) == out and thinking.generate(prompt, 12, budget=0) == plain


@pytest.mark.parametrize("make", [tiny_llama, tiny_cognate], ids=["llama", "cognate"])
def test_last_position_decoder_equals_the_parallel_streams(make, tokenizer):
    """Generation thinks at the last position only (cached for Llama); it must predict what the parallel
    all-positions pass predicts there, token after token, and never keep the thought in its context."""
    from forge_models.quietstar.thoughts import ThoughtDecoder

    # ~greedy thoughts so both paths pick the same thought tokens despite different noise draws
    qs = _wrap(make(), tokenizer, thought_tokens=3, eval_temperature=1e-6)
    with torch.no_grad():
        qs.head.net[-1].bias.fill_(0.4)  # w != 0: the thought changes the prediction
    qs.eval()
    ids = [3, 9, 14, 2, 40, 7, 11]
    dec = ThoughtDecoder(qs, gen=torch.Generator().manual_seed(1))
    nxt = ids[:4]
    for step in range(4):
        got = dec.next_logits(nxt)
        seq = torch.tensor([dec.ids])
        ref = thought_logits(qs, seq, None, torch.Generator().manual_seed(2))[0, -1]
        plain = thought_logits(qs, seq, 0)[0, -1]
        assert torch.allclose(got, ref, atol=1e-4), (step, (got - ref).abs().max())
        assert not torch.allclose(got, plain, atol=1e-3)  # the thought mattered
        if dec.cache is not None:
            assert dec.cache.get_seq_length() == len(dec.ids)  # thought cropped off the context
        nxt = [ids[4 + step]] if step < 3 else [int(got.argmax())]
    plain_dec = ThoughtDecoder(qs, budget=0)
    assert torch.equal(plain_dec.next_logits(ids).argmax(), thought_logits(qs, torch.tensor([ids]), 0)[0, -1].argmax())


def test_generation_stops_when_asked(tokenizer):
    qs = _wrap(tiny_llama(), tokenizer, thought_tokens=2).eval()
    full = generate_ids(qs, [5, 6, 7], 8)
    cut = generate_ids(qs, [5, 6, 7], 8, should_stop=lambda out: len(out) >= 3)
    assert cut == full[:3]
    with pytest.raises(Exception, match="non-empty prompt"):
        generate_ids(qs, [], 4)
