"""Prompt baking (Phase 6) measured on a real folder: the issue's goal on the stored, reloaded artifact.

Goal: held-out KL(prompted input || baked, unprompted) <= 40% of KL(prompted input || input, unprompted), with a
bootstrap interval over held-out inputs; plus real-text perplexity before/after (Alice in Wonderland, never
trained on) with a paired bootstrap interval over windows.

    # a tiny Cognate trained with system dialogues (the command in docs/phases/baking.md)
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/baking_bench.py --model /tmp/bk2/cognate/dialog \
        --steps 150 --out bench/results/baking_tiny_system.json --compress 0.25
    # SmolLM2-135M-Instruct (forge import smollm2-135m --out /tmp/bk/smollm2); hours at the paper's budget
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/baking_bench.py --model /tmp/bk/smollm2 --steps 40 \
        --inputs-per-step 2 --samples-per-input 4 --trajectory-tokens 24 --out bench/results/baking_smollm2.json

Prompts (``--prompts``, baked in that order): ``tools`` (the corpus's tool sentence for calculator and lookup) and
a persona's sentence (``nova``, ``atlas``, ``pip``, ``sage``). A persona then ``tools`` joins into exactly the
corpus's system prompt, so the phase also checks the behaviour (persona rules, tool-loop answers, tool policy:
forge_models.baking.behaviour) of the stored model without the prompt against the input with it.
``--compress STEP`` then compresses the baked model (phase 8, ECSQ at that step on every tensor), reloads the
folder and checks the behaviour again on it.

Inputs x: the user turns of the synthetic corpus (train split for baking, validation split for measuring; a
system dialogue's system line removed); with a chat template the question is the user message and the baked
prompt goes in the system slot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import forge_models  # noqa: F401  (registers Cognate)
from forge_models.baking import BakePrompt, BakingConfig, BakingInputs, run
from forge_models.config import DataConfig, EvalConfig, SyntheticConfig
from forge_models.data import build_corpus
from forge_models.eval.real_text import window_losses
from forge_models.eval.stats import paired_difference
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer
from tasks.baking import task_inputs
from tasks.inputs import load_input_model

def builtin_prompts() -> dict[str, str]:
    from forge_models.data.system_prompts import PERSONAS, system_prompt

    return {"tools": system_prompt(None, ("calculator", "lookup")),
            **{name.lower(): p.instruction for name, p in PERSONAS.items()},
            **{f"system-{name.lower()}": system_prompt(name, ("calculator", "lookup")) for name in PERSONAS}}


class _Progress:
    """Prints the bake's progress every 10 steps (the phase's tracker hook)."""

    def log_metrics(self, metrics, step=None):
        pass

    def progress(self, done, total, message=""):
        if done % 10 == 0 or done == total:
            print(f"  {time.strftime('%H:%M:%S')} {done}/{total} {message}", flush=True)


def compressed_check(args, out, cfg, tok, alice: str, seq_len: int, ppl_before, ctx, examples) -> dict:
    """Phase 8 on the baked model (ECSQ at ``args.compress`` on every tensor), the folder reloaded, and the
    behaviour checked again on it: the compressed model without the prompt against the input with it."""
    from forge_models.baking.behaviour import baked_spec, behaviour_cases, compare, run_cases
    from forge_models.compression.artifact import artifact_bytes, load_compressed
    from forge_models.compression.phase import CompressionConfig, CompressionInputs
    from forge_models.compression.phase import run as compress

    ids = torch.tensor(tok(alice)["input_ids"][: 40 * 128], dtype=torch.long)
    windows = ids[: (ids.numel() // 128) * 128].view(-1, 128)  # calibration and rollback windows
    folder = Path(args.work).with_name(Path(args.work).name + "-compressed")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    ccfg = CompressionConfig(candidates=({"name": "ecsq", "step": args.compress},), target_bpw=32.0,
                             max_loss_increase=10.0)
    t = time.monotonic()
    compress(CompressionInputs(out.models["model"], tok, windows[:8], windows[8:12], windows[12:14], folder), ccfg, ctx)
    small = load_compressed(folder).eval()
    spec = baked_spec([p.prompt_text() for p in cfg.prompts])
    cases = behaviour_cases(examples, spec, cfg.max_behaviour_inputs)
    input_model, _ = load_input_model(Path(args.model))
    limit = int(getattr(small.config, "max_position_embeddings", 1 << 30))
    kw = dict(ctx=ctx, max_new_tokens=cfg.behaviour_max_new_tokens, max_positions=limit)
    runs = {"input_prompted": run_cases(input_model.float().eval(), tok, cases, spec, prompted=True, **kw),
            "compressed_plain": run_cases(small, tok, cases, spec, prompted=False, **kw)}
    metrics = compare(runs, "compressed_plain", "compressed/behaviour", args.seed)
    after = np.asarray(window_losses(small, tok, [alice], seq_len, args.ppl_tokens, torch.device("cpu")))
    d, lo, hi = paired_difference(after, ppl_before, seed=args.seed)
    return {"ecsq_step": args.compress, "folder_bytes": artifact_bytes(folder), "seconds": time.monotonic() - t,
            "metrics": metrics, "real_text": {"ppl": float(np.exp(after.mean())), "loss_diff_vs_input": d,
                                              "lo": lo, "hi": hi},
            "summary": {b: [metrics.get(f"compressed/behaviour/{b}/compressed_plain"),
                            metrics.get(f"compressed/behaviour/{b}/compressed_plain_minus_input_prompted_lo"),
                            metrics.get(f"compressed/behaviour/{b}/compressed_plain_minus_input_prompted_hi")]
                        for b in ("persona_adherence", "answer_correct", "tool_policy")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face folder (or a BitNet folder with latent/).")
    ap.add_argument("--out", required=True, help="JSON result file.")
    ap.add_argument("--work", default="/tmp/bk/bench-out", help="Where the baked model is stored and reloaded from.")
    ap.add_argument("--prompts", default="nova,tools", help="Which built-in prompts to bake, in order.")
    ap.add_argument("--behaviour", type=int, default=48, help="Held-out system-dialogue questions checked.")
    ap.add_argument("--compress", type=float, default=0.0, help="ECSQ step: compress the baked model and re-check.")
    ap.add_argument("--n-examples", type=int, default=6000, help="Synthetic corpus size (inputs x).")
    ap.add_argument("--inputs", choices=["all", "dialogue"], default="all",
                    help="Inputs x: every kind's user prompt, or only dialogue turns (User: Q / Assistant:).")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--inputs-per-step", type=int, default=4)
    ap.add_argument("--samples-per-input", type=int, default=8)
    ap.add_argument("--trajectory-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--half-bake", default="", help="Comma-separated half-bake steps.")
    ap.add_argument("--alice", default="/work/shared/data/carroll-alice.txt")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.monotonic()
    model, latent = load_input_model(Path(args.model))
    tok = load_tokenizer(args.model)
    bitnet_meta = None
    if latent is not None:
        packed = json.loads((Path(args.model) / "bitnet.json").read_text())
        bitnet_meta = {"packing": packed["packing"], "kept_dtype": packed["kept_dtype"],
                       "keep_patterns": latent["keep_patterns"], "act_norm": latent["act_norm"]}
    # The tiny preset's split percentages (a split is a function of the key's hash and these), so the held-out
    # questions are held out from a tiny model trained on the preset's corpus too; every kind, system included.
    corpus = build_corpus(DataConfig(seed=1, validation_percent=5, test_percent=15, synthetic=SyntheticConfig(
        n_examples=args.n_examples, kinds={k: 1.0 for k in ("arithmetic", "tool", "persona", "narrative", "system")})))
    train_x, held_x = task_inputs(corpus.train), task_inputs(corpus.validation)
    if args.inputs == "dialogue":  # the turns a system prompt is about (persona, tool and system dialogues)
        from forge_models.data.system_prompts import dialogue_question

        train_x = [x for x in train_x if dialogue_question(x) is not None]
        held_x = [x for x in held_x if dialogue_question(x) is not None]
    texts = builtin_prompts()
    prompts = tuple(BakePrompt(name=n, text=texts[n]) for n in args.prompts.split(","))
    half = tuple(int(s) for s in args.half_bake.split(",") if s)
    cfg = BakingConfig(prompts=prompts, steps=args.steps, lr=args.lr, lora={"rank": args.rank, "alpha": 2.0 * args.rank},
                       inputs_per_step=args.inputs_per_step, samples_per_input=args.samples_per_input,
                       trajectory_tokens=args.trajectory_tokens, temperature=args.temperature,
                       eval_samples_per_input=args.eval_samples, max_heldout_inputs=args.heldout,
                       half_bake_steps=half, seed=args.seed, max_behaviour_inputs=args.behaviour)
    alice = Path(args.alice).read_text(encoding="utf-8")
    seq_len = min(256, int(getattr(model.config, "max_position_embeddings", 256)))
    cpu = torch.device("cpu")
    # The compressed check compares against the input's windows; run() bakes the input in place, so first.
    ppl_before = (np.asarray(window_losses(model, tok, [alice], seq_len, args.ppl_tokens, cpu))
                  if args.compress > 0 else None)

    ctx = PhaseContext(device=cpu, seed=args.seed, precision="fp32", tracker=_Progress())
    # Alice is the phase's held-out text: measured on the input before baking and the stored model after.
    out = run(BakingInputs(model, tok, train_x, held_x, Path(args.work), bitnet_meta=bitnet_meta,
                           behaviour_examples=corpus.validation, retention_texts={"alice": [alice]},
                           retention_seq_len=seq_len, retention_max_tokens=args.ppl_tokens), cfg, ctx)
    t = {k.rsplit("/", 1)[1]: v for k, v in out.metrics.items() if k.startswith("baking/text/alice/")}
    result = {
        "model": args.model, "params": out.details["params"], "bitnet": out.details["bitnet"],
        "config": cfg.model_dump(mode="json"), "metrics": out.metrics,
        "prompts": out.details["prompts"], "combined_prompt_tokens": out.details.get("combined_prompt_tokens"),
        "real_text": {"windows": int(t["windows"]), "seq_len": seq_len, "ppl_before": t["ppl_before"],
                      "ppl_after": t["ppl_after"], "loss_diff": t["loss_rise"], "loss_diff_lo": t["loss_rise_lo"],
                      "loss_diff_hi": t["loss_rise_hi"], "bound": t["bound"], "goal_met": bool(t["goal_met"])},
        "behaviour": out.details.get("behaviour"),
        "compressed": compressed_check(args, out, cfg, tok, alice, seq_len, ppl_before, ctx, corpus.validation)
        if args.compress > 0 else None,
        "wall_s": time.monotonic() - t0, "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, shared 2-core CPU (loaded)",
        "command": "bench/baking_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for p in prompts:
        k = f"baking/{p.name}"
        m = out.metrics
        print(f"{p.name}: KL input {m[k + '/kl_input']:.4f} [{m[k + '/kl_input_lo']:.4f}, {m[k + '/kl_input_hi']:.4f}] "
              f"-> baked {m[k + '/kl_baked']:.4f} [{m[k + '/kl_baked_lo']:.4f}, {m[k + '/kl_baked_hi']:.4f}], ratio "
              f"{m[k + '/kl_ratio']:.3f}, goal margin {m[k + '/goal_margin']:+.4f} [{m[k + '/goal_margin_lo']:+.4f}, "
              f"{m[k + '/goal_margin_hi']:+.4f}], re-prompted {m[k + '/kl_reprompted']:.4f}, half-baked "
              f"{out.details['prompts'][p.name]['half_baked']}")
    m = out.metrics
    for b in ("persona_adherence", "answer_correct", "tool_policy"):
        k = f"baking/behaviour/{b}"
        if f"{k}/baked_plain" in m:
            dk = f"{k}/baked_plain_minus_input_prompted"
            print(f"{b} (n {int(m[k + '/n'])}): input prompted {m[k + '/input_prompted']:.3f}, input plain "
                  f"{m[k + '/input_plain']:.3f}, baked plain {m[k + '/baked_plain']:.3f}; baked - prompted "
                  f"{m[dk]:+.3f} [{m[dk + '_lo']:+.3f}, {m[dk + '_hi']:+.3f}]")
    if result["compressed"]:
        print("compressed:", json.dumps(result["compressed"]["summary"]))
    rt = result["real_text"]
    print(f"real-text ppl {rt['ppl_before']:.3f} -> {rt['ppl_after']:.3f} (loss diff {rt['loss_diff']:+.4f} "
          f"[{rt['loss_diff_lo']:+.4f}, {rt['loss_diff_hi']:+.4f}], bound {rt['bound']}: "
          f"{'met' if rt['goal_met'] else 'not met'}); {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
