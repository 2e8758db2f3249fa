"""The tiny preset over several seeds, scored on the fixed test split with 95% intervals and paired differences.

    .venv/bin/python bench/eval_seeds.py [--seeds 0 1 2] [--work bench/out/eval-seeds] [--set KEY=VALUE ...]
                                         [--max-examples N] [--models all|chain]

Per seed S: ``forge run --preset tiny --set seed=S`` in its own folder and store (the data seed is fixed,
so every seed sees the same splits; S changes model initialisation, batches, EvoMerge and the Forge loop).
Then the models of every phase's artifact are scored on the *test* split (every example by default: the
final evaluation's settings), keeping per-example outcomes, and compared pairwise on the same examples:

- each Cognate variant vs the trunk it branched from;
- the EvoMerge winner vs each parent (test split: the search never saw it);
- BitNet vs its input (the EvoMerge winner) and the Forge loop vs its input (the BitNet model).

Prints per seed a table of test metrics with intervals and the paired differences ("within noise" when the
interval covers 0), then across seeds each difference's values and how many seeds found it real. Every
seed's results go to ``<work>/seed-S/eval.json``; a finished run or evaluation is reused, not recomputed.
``--models chain`` skips the variants (trunk, winner, BitNet, Forge loop only) to save time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ACCURACIES = ("arith_em", "tool_valid", "tool_correct", "choice_acc", "persona_acc", "narrative_acc")


def run_pipeline(folder: Path, seed: int, sets: list[str]) -> dict:
    summary = folder / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FORGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--summary-json", str(summary),
           "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        proc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"seed {seed}: forge run failed, see {folder / 'run.log'}")
    (folder / "run_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return json.loads(summary.read_text())


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def evaluate_models(folder: Path, seed: int, summary: dict, sets: list[str], max_examples: int | None,
                    which: str) -> dict:
    out = folder / "eval.json"
    if out.is_file():
        return json.loads(out.read_text())
    import torch
    from transformers import AutoModelForCausalLM

    import forge_models  # noqa: F401  (registers the Cognate architecture)
    from flows.config import load_config
    from forge_models.bitnet import load_packed
    from forge_models.data import Corpus
    from forge_models.eval import evaluate
    from forge_models.runtime import PhaseContext
    from forge_models.tokenizer import load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = load_config("tiny", overrides=[f"seed={seed}", *sets])
    cfg = config.eval.for_split("test")
    if max_examples is not None:
        cfg = cfg.model_copy(update={"max_examples": max_examples})
    phases = {p["name"]: p for p in summary["phases"]}
    corpus = Corpus.load(local(phases["data"]["artifact"]["uri"]) / "corpus")
    models = {"trunk": local(phases["cognate"]["artifact"]["uri"]) / "trunk"}
    if which == "all":
        models.update({v.name: local(phases["cognate"]["artifact"]["uri"]) / v.name for v in config.cognate.variants})
    models.update({"evomerge": local(phases["evomerge"]["artifact"]["uri"]) / "merged",
                   "bitnet": local(phases["bitnet"]["artifact"]["uri"]) / "model",
                   "training": local(phases["training"]["artifact"]["uri"]) / "model"})
    ctx = PhaseContext(device=torch.device("cpu"), seed=seed, precision=config.device.precision)
    results: dict = {"seed": seed, "eval": cfg.model_dump(mode="json"), "models": {}}
    for name, path in models.items():
        t0 = time.perf_counter()
        if (path / "bitnet.json").is_file():  # a packed ternary folder: integer inference (bit-identical backends)
            net = load_packed(path, backend="int_mm")
        else:
            net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        outcomes: dict = {}
        metrics = evaluate(net, load_tokenizer(path), corpus.test, cfg, ctx, outcomes)
        results["models"][name] = {"metrics": metrics, "outcomes": outcomes, "seconds": time.perf_counter() - t0}
        print(f"  seed {seed}: {name} scored on {int(metrics['n_tool'])} tool / {int(metrics['n_arith'])} arith / "
              f"{int(metrics['n_choice'])} choice test examples in {time.perf_counter() - t0:.0f} s", flush=True)
    out.write_text(json.dumps(results))
    return results


def comparisons(models: dict) -> list[tuple[str, str]]:
    pairs = [(v, "trunk") for v in models if v not in ("trunk", "evomerge", "bitnet", "training")]
    pairs += [("evomerge", p) for p in models if p not in ("evomerge", "bitnet", "training")]
    return pairs + [("bitnet", "evomerge"), ("training", "bitnet")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "eval-seeds"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra forge --set override")
    parser.add_argument("--max-examples", type=int, default=None, help="cap per task (default: every test example)")
    parser.add_argument("--models", choices=("all", "chain"), default="all")
    args = parser.parse_args()

    from forge_models.eval import describe_difference, paired_difference, within_noise

    work = Path(args.work)
    per_seed = {}
    for seed in args.seeds:
        folder = work / f"seed-{seed}"
        summary = run_pipeline(folder, seed, args.sets)
        per_seed[seed] = evaluate_models(folder, seed, summary, args.sets, args.max_examples, args.models)

    across: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    for seed, res in per_seed.items():
        models = res["models"]
        first = next(iter(models.values()))["metrics"]
        print(f"\n### seed {seed} (test split: {int(first['n_arith'])} arithmetic, {int(first['n_tool'])} tool, "
              f"{int(first['n_choice'])} multiple-choice examples; 95% bootstrap intervals)\n")
        cols = ["loss", *[a for a in ACCURACIES if a in first]]
        print("| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        for name, r in models.items():
            m = r["metrics"]
            cells = [f"{m['loss']:.3f}"] + [f"{m[a]:.3f} [{m[a + '_lo']:.3f}, {m[a + '_hi']:.3f}]" for a in cols[1:]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
        for after, before in comparisons(models):
            for metric in ("tool_correct", "arith_em", "choice_acc"):
                a, b = models[after]["outcomes"].get(metric), models[before]["outcomes"].get(metric)
                if a is None or b is None:
                    continue
                d = paired_difference(a, b, res["eval"]["bootstrap_samples"], res["eval"]["bootstrap_seed"])
                across.setdefault((after, before, metric), []).append(d)
                print("- " + describe_difference(f"{after} - {before}, {metric}", *d))
            dl = models[after]["metrics"]["loss"] - models[before]["metrics"]["loss"]
            print(f"- {after} - {before}, loss: {dl:+.3f} nats/token")

    if len(per_seed) > 1:
        print(f"\n### across seeds {list(per_seed)}: paired test differences (each seed's value [95% interval])\n")
        print("| comparison | metric | per seed | real in |\n|---|---|---|---|")
        for (after, before, metric), ds in across.items():
            real = sum(not within_noise(lo, hi) for _, lo, hi in ds)
            cells = "; ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in ds)
            print(f"| {after} - {before} | {metric} | {cells} | {real} of {len(ds)} seeds |")


if __name__ == "__main__":
    main()
