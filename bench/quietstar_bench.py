"""Quiet-STaR figures for docs/phases/quietstar.md (CPU, minutes).

    OMP_NUM_THREADS=1 python bench/quietstar_bench.py throughput [--positions 128]
    OMP_NUM_THREADS=1 python bench/quietstar_bench.py table [--pretrain-steps 300] [--steps 60]

throughput: training tokens/s (forward + backward of the full Quiet-STaR objective) of the parallel
implementation (one forward per thought step for all positions: diagonal-block mask + KV cache) against a
sequential reference loop on the same model (per position: a KV-cached forward of the prefix, then the
thought and talk tokens one at a time), same settings, same number of scored positions.

table: a tiny Llama (random init) is pretrained on the synthetic corpus's train split with the plain LM
loss, then the phase runs (train split only) and reports, on the validation split, with vs without thoughts.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from forge_models.config import DataConfig, EvalConfig, SyntheticConfig
from forge_models.data import build_corpus
from forge_models.data.stream import TokenSampler
from forge_models.quietstar import QuietStar, QuietStarConfig, QuietStarInputs, quietstar_loss, run
from forge_models.quietstar.thoughts import NEG, advantages, sample_thought_token
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import train_bpe


def model_for(vocab: int, hidden: int = 128, layers: int = 4, positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=positions, tie_word_embeddings=True))


def sequential_loss(qs: QuietStar, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same objective, one position at a time (the naive implementation the parallel pass replaces)."""
    cfg, (_, T) = qs.cfg, x.shape
    total = 0.0
    for j in range(T - 1):
        rewards, logps, talks = [], [], []
        for _ in range(cfg.n_passes):
            cache = DynamicCache()
            pre = x[:, : j + 1]
            out = qs.model.model(inputs_embeds=qs.embed(pre), cache=cache, use_cache=True)
            hb_all = out.last_hidden_state
            pos = j + 1

            def step(tok):
                nonlocal pos
                h = qs.model.model(inputs_embeds=qs.embed(tok), position_ids=torch.tensor([[pos]]), cache=cache,
                                   use_cache=True).last_hidden_state
                pos += 1
                return h

            h = step(torch.tensor([[qs.start_id]]))
            lp = 0.0
            for _ in range(cfg.thought_tokens):
                lg = qs.logits(h)
                tok = sample_thought_token(lg, qs, cfg.gumbel_temperature, gen)
                lg = lg.clone()
                lg[..., [qs.start_id, qs.end_id]] = NEG
                lp = lp + F.log_softmax(lg / cfg.policy_temperature, -1).gather(-1, tok[..., None]).sum()
                h = step(tok)
            h = step(torch.tensor([[qs.end_id]]))
            r, talk = 0.0, []
            for i in range(cfg.n_ahead_talk):
                if j + 1 + i >= T:
                    break
                if i > 0:
                    h = step(x[:, j + i: j + i + 1])
                    # the base hidden at j+i needs the longer prefix (no thought): one more cached-free forward
                    hb = qs.model.model(input_ids=x[:, : j + i + 1]).last_hidden_state[:, -1:]
                else:
                    hb = hb_all[:, -1:]
                w = qs.head(hb, h)
                mixed = (1 - w) * hb + w * h
                nll = F.cross_entropy(qs.logits(mixed)[0], x[0, j + 1 + i: j + 2 + i])
                with torch.no_grad():
                    nb = F.cross_entropy(qs.logits(hb)[0], x[0, j + 1 + i: j + 2 + i])
                r = r + (nb - nll.detach())
                talk.append(nll)
            rewards.append(torch.as_tensor(r)), logps.append(lp), talks.append(torch.stack(talk).mean())
        adv = advantages(torch.stack(rewards), cfg.remove_negative_rewards)
        policy = -sum(a * lp for a, lp in zip(adv, logps)) / cfg.n_passes
        loss = (1 - cfg.original_loss_weight) * torch.stack(talks).mean() + cfg.policy_loss_beta * policy
        loss.backward()  # per position, as a naive loop would (bounded memory)
        total += float(loss)
    return torch.tensor(total)


def throughput(positions: int, repeats: int) -> dict:
    from tests.factories import save_tokenizer  # noqa: F401  (not used: a word-level tokenizer is enough)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = 512
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    cfg = QuietStarConfig(thought_tokens=4, n_ahead_talk=4, n_passes=2)
    qs = QuietStar.wrap(model_for(vocab), tokenizer, cfg)
    x = torch.randint(2, vocab, (1, positions), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    par = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        quietstar_loss(qs, x, gen)["loss"].backward()
        par.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    sequential_loss(qs, x, gen)
    seq = time.perf_counter() - t0
    p = sorted(par)[len(par) // 2]
    return {"positions": positions, "model": "Llama hidden 128, 4 layers, vocab 512", "settings": cfg.model_dump(
        include={"thought_tokens", "n_ahead_talk", "n_passes"}), "parallel_s": p, "sequential_s": seq,
        "parallel_tokens_per_s": positions / p, "sequential_tokens_per_s": positions / seq, "speedup": seq / p}


def table(pretrain_steps: int, steps: int, trunk_lr_scale: float | None = None) -> dict:
    corpus = build_corpus(DataConfig(seed=1234, synthetic=SyntheticConfig(n_examples=4000, max_operand=20),
                                     validation_percent=10))
    tokenizer = train_bpe([ex.text for ex in corpus.train], 512)
    model = model_for(len(tokenizer), hidden=96, layers=3, positions=256)
    sampler = TokenSampler(corpus.train, tokenizer, {"arithmetic": 1.0, "text": 1.0, "narrative": 1.0,
                                                     "persona": 1.0, "tool": 1.0}, 64, 16, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for s in range(pretrain_steps):
        x = sampler.batch(s)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pre_s = time.perf_counter() - t0
    scale = {} if trunk_lr_scale is None else {"trunk_lr_scale": trunk_lr_scale}  # None: the config's default
    cfg = QuietStarConfig(steps=steps, eval_examples=48, gen_examples=48, **scale)
    ev = EvalConfig(max_examples=48, bootstrap_samples=1000)
    t0 = time.perf_counter()
    out = run(QuietStarInputs(model.eval(), tokenizer, corpus, ev), cfg, PhaseContext(precision="fp32"))
    phase_s = time.perf_counter() - t0
    curves = {k: [round(v, 4) for _, v in out.curves[k][:: max(1, steps // 6)]] for k in out.curves}
    return {"pretrain_steps": pretrain_steps, "pretrain_final_loss": float(loss), "pretrain_s": pre_s,
            "phase_wall_s": phase_s, "config": cfg.model_dump(mode="json", exclude={"data_mix"}),
            "metrics": out.metrics, "curves_every_n": curves,
            "before": out.evaluations["before"]["input"], "after_no_thought": out.evaluations["after"]["quietstar"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["throughput", "table"])
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--trunk-lr-scale", type=float, default=None)
    a = ap.parse_args()
    res = throughput(a.positions, a.repeats) if a.what == "throughput" else table(a.pretrain_steps, a.steps, a.trunk_lr_scale)
    print(json.dumps(res, indent=1, default=str))
