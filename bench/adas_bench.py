"""ADAS over real agent configurations on a tiny trained model: search on validation, compare on test.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/adas_bench.py [--train-steps 1500] [--generations 5]
        [--population 6] [--val-per-kind 40] [--test-per-kind 150] [--model-dir /tmp/adas-bench-model]
        [--out bench/results/adas_tiny.json]

1. A tiny Llama (hidden 128, 4 layers, BPE 512; KV cache so generation is quick on a CPU) is trained with
   the plain LM loss on the synthetic corpus' train split (all four task families); kept in --model-dir, so
   a rerun with the same flags reuses it.
2. Validation and test questions are the answer-checked examples of the corpus' validation and test splits
   (arithmetic and tool: the number; persona and narrative: the correct choice), the first N per kind.
3. :func:`forge_models.adas.search` runs the seed agents and ``generations x population`` proposals on
   the validation questions only; then :func:`forge_models.adas.final_comparison` reads the test split once
   and reports the winner, every seed agent (``plain`` is the plain model) and the best typed config, with
   95% bootstrap intervals, the paired difference winner - agent, and the cost per query.

No expert library and no Quiet-STaR head are attached here (those land on other branches), so the space
searched is prompt style, decoding and self-consistency, the tool loop, and answer extraction.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from forge_models.adas import HeldOutSplits, ModelClient, SearchConfig, final_comparison, questions_from_examples, search
from forge_models.config import DataConfig, SyntheticConfig
from forge_models.data import build_corpus
from forge_models.data.stream import TokenSampler
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer, train_bpe

KINDS = ("arithmetic", "tool", "persona", "narrative")


def trained_model(corpus, steps: int, folder: Path, seed: int):
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder), {"reused": str(folder)}
    tok = train_bpe([ex.text for ex in corpus.train], 512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, tie_word_embeddings=True,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         bos_token_id=None))
    sampler = TokenSampler(corpus.train, tok, {k: 1.0 for k in KINDS}, 128, 16, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    start, losses = time.perf_counter(), []
    model.train()
    for s in range(steps):
        x = sampler.batch(s)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if s % 250 == 0:
            print(f"train step {s}: loss {float(loss):.3f}", flush=True)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    info = {"train_steps": steps, "train_seconds": time.perf_counter() - start,
            "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, tok, info


def per_kind(examples, n: int):
    out, counts = [], {k: 0 for k in KINDS}
    for ex in examples:
        if ex.kind in counts and counts[ex.kind] < n and ex.prompt and (ex.answer or ex.choices):
            out.append(ex)
            counts[ex.kind] += 1
    return out, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=1500, help="LM training steps of the tiny model")
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--val-per-kind", type=int, default=40, help="validation questions per task family (fitness)")
    ap.add_argument("--test-per-kind", type=int, default=150, help="test questions per task family (final comparison)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/adas-bench-model"))
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    corpus = build_corpus(DataConfig(seed=1234, synthetic=SyntheticConfig(n_examples=12000, max_operand=20),
                                     validation_percent=10, test_percent=15))
    model, tok, train_info = trained_model(corpus, args.train_steps, args.model_dir, args.seed)
    val_ex, val_counts = per_kind(corpus.validation, args.val_per_kind)
    test_ex, test_counts = per_kind(corpus.test, args.test_per_kind)
    splits = HeldOutSplits(questions_from_examples("validation", val_ex), questions_from_examples("test", test_ex))
    client = ModelClient(model, tok, PhaseContext(precision="fp32", seed=args.seed), batch_size=32)
    cfg = SearchConfig(generations=args.generations, population=args.population, seed=args.seed,
                       bootstrap_samples=10_000)
    t1 = time.perf_counter()
    result = search(splits, client, cfg)
    search_s = time.perf_counter() - t1
    assert splits.touched["test"] == set(), "the search touched the test split"
    t2 = time.perf_counter()
    rows = final_comparison(splits, client, result)
    final_s = time.perf_counter() - t2
    out = {"command": "bench/adas_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
           "train": train_info, "validation_questions": val_counts, "test_questions": test_counts,
           "search_seconds": search_s, "final_seconds": final_s, "total_seconds": time.perf_counter() - t0,
           "winner": result.winner.row(), "archive": result.rows(), "rejected": result.rejected,
           "final_comparison": rows}
    text = json.dumps(out, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    kinds = list(rows[0]["accuracy_by_kind"])
    print("\n| agent | role | test acc [95% CI] | winner - agent [95% CI] | verdict | calls/q | tokens/q (prompt+gen) | ms/q | "
          + " | ".join(kinds) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(kinds))
    for r in rows:
        print(f"| {r['name']} | {r['role']} | {r['test_accuracy']:.3f} [{r['test_low']:.3f}, {r['test_high']:.3f}] | "
              f"{r['winner_minus_this']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] | {r['verdict']} | "
              f"{r['calls_per_query']:.2f} | {r['prompt_tokens_per_query']:.0f}+{r['completion_tokens_per_query']:.0f} | "
              f"{1000 * r['seconds_per_query']:.1f} | " + " | ".join(f"{r['accuracy_by_kind'][k]:.3f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
