"""The `smollm2` preset's whole effect on the test split: the base model against the final (compressed) artifact.

The pipeline's final evaluation scores only the final model; this runs the same harness, with the same config
(`eval.for_split("test")`: `final_max_examples` per task), on the common base too, and gives paired differences
on the same test examples with 95% bootstrap intervals. The final artifact is loaded with
`AutoModelForCausalLM.from_pretrained` (the phase-8 quantizer registered by `import forge_models`), and its
logits are checked against `load_compressed` first.

    forge run --preset smollm2 --store file:///work/smol-store --set 'data.eval_sources=[{path: FILE}]'
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/smollm2_preset_final.py --store /work/smol-store \\
        --set 'data.eval_sources=[{path: FILE}]' --out bench/results/smollm2_preset_final.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import forge_models  # noqa: E402,F401  (registers the forge_compressed quantizer)
from flows.config import load_config  # noqa: E402
from forge_models.compression.artifact import load_compressed  # noqa: E402
from forge_models.data import Corpus  # noqa: E402
from forge_models.eval import evaluate, paired_metrics  # noqa: E402
from forge_models.runtime import PhaseContext  # noqa: E402
from forge_models.tokenizer import load_tokenizer  # noqa: E402


def one(pattern: str) -> Path:
    found = glob.glob(pattern)
    if len(found) != 1:
        raise SystemExit(f"expected exactly one match for {pattern}, found {found}")
    return Path(found[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="local store folder of a finished smollm2 run")
    ap.add_argument("--set", action="append", default=[], help="the run's --set overrides (for the eval config)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/smollm2_preset_final.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(preset="smollm2", overrides=args.set)
    eval_cfg = cfg.eval.for_split("test")
    corpus = Corpus.load(one(f"{args.store}/data/*/corpus"))
    test = corpus.split("test")
    base_dir = one(f"{args.store}/cognate/*/base")
    final_dir = one(f"{args.store}/compression/*/model")
    ctx = PhaseContext(precision=cfg.device.precision, seed=cfg.seed)  # as the pipeline's final evaluation

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    probe = torch.arange(1, 33)[None]
    with torch.no_grad():
        diff = float((final(input_ids=probe).logits - load_compressed(final_dir)(input_ids=probe).logits).abs().max())
    if diff != 0.0:
        raise SystemExit(f"from_pretrained and load_compressed disagree by {diff}")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(final_dir)

    result: dict = {"store": args.store, "final": str(final_dir), "base": str(base_dir),
                    "from_pretrained_vs_load_compressed_max_diff": diff, "precision": ctx.precision,
                    "examples_per_task": eval_cfg.max_examples}
    outcomes: dict[str, dict] = {}
    for name, model in (("base", base), ("final", final)):
        t0 = time.perf_counter()
        o: dict = {}
        result[name] = evaluate(model, tok, test, eval_cfg, ctx, o)
        result[f"{name}_wall_s"] = time.perf_counter() - t0
        outcomes[name] = o
        print(name, {k: round(v, 4) for k, v in result[name].items() if not k.endswith(("_lo", "_hi"))}, flush=True)
    result["paired_final_minus_base"] = paired_metrics(outcomes["final"], outcomes["base"],
                                                       eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed)
    result["machine"] = {"threads": args.threads, "load_avg": list(os.getloadavg()), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["paired_final_minus_base"], indent=1))


if __name__ == "__main__":
    main()
