"""EvoMerge on the tiny preset: generations, recipes scored, wall time, and the winner against its parents
and their plain average on the test split, for the GA and for CMA-ES.

    .venv/bin/python bench/evomerge_tiny.py [--workdir bench/out/evomerge] [--strategies ga,cmaes]
    .venv/bin/python bench/evomerge_tiny.py --workdir bench/out/evomerge-dfs --strategies cmaes-dfs,ga+dfs

Strategies: ``ga``, ``cmaes`` (DARE-TIES genes), ``cmaes-dfs`` (CMA-ES over the DFS layer-routing indicator),
``ga+dfs`` (the GA with ``dfs`` added to its methods).

Runs ``forge run --preset tiny --set phases=[cognate,evomerge]`` in a fresh subprocess per strategy on
one local store (Cognate is computed once and reused), then reads the EvoMerge artifact's phase.json.
Writes ``<workdir>/evomerge_tiny.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(workdir: Path, sets: list[str], summary: str) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FORGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--summary-json", summary]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - t0, json.loads((workdir / summary).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "evomerge"))
    ap.add_argument("--strategies", default="ga,cmaes")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    rows = []
    variants = {
        "ga": ["evomerge.strategy=ga"],
        "cmaes": ["evomerge.strategy=cmaes"],
        "cmaes-dfs": ["evomerge.strategy=cmaes", "evomerge.cmaes_method=dfs"],
        "ga+dfs": ["evomerge.strategy=ga", "evomerge.methods=[linear, task_arithmetic, ties, dare_ties, dare_linear, "
                   "breadcrumbs, della, model_stock, dfs]"],
    }
    for strategy in args.strategies.split(","):
        if strategy not in variants:
            sys.exit(f"unknown strategy {strategy!r}; choose from {sorted(variants)}")
        wall, summary = run(workdir, ["phases=[cognate, evomerge]", *variants[strategy], "final_test_eval=false"],
                            f"{strategy}.json")
        phase = next(p for p in summary["phases"] if p["name"] == "evomerge")
        folder = workdir / "forge-store" / phase["artifact"]["uri"].split("/forge-store/")[1]
        meta = json.loads((folder / "phase.json").read_text())
        m, d = meta["metrics"], meta["details"]
        rows.append({
            "strategy": strategy, "generations": int(m["generations"]), "recipes_scored": int(m["evaluations"]),
            "stopped_by": d["stopped_by"], "evomerge_seconds": round(phase["seconds"], 1), "run_seconds": round(wall, 1),
            "winner": d["winner"], "comparison": d["comparison"],
            "margins": {k: v for k, v in m.items() if "margin" in k},
        })
    (workdir / "evomerge_tiny.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(f"\n### {r['strategy']}: {r['generations']} generations, {r['recipes_scored']} recipes scored, "
              f"stopped by {r['stopped_by']}, EvoMerge {r['evomerge_seconds']} s (whole run {r['run_seconds']} s)")
        print(f"winner: {r['winner']}\n")
        print("| model | validation fitness | test fitness | test arith_em | test tool_correct | test choice_acc | test loss |")
        print("|---|---|---|---|---|---|---|")
        for c in r["comparison"]:
            print(f"| {c['model']} | {c['validation/fitness']:.4f} | {c.get('test/fitness', float('nan')):.4f} | {c.get('test/arith_em', float('nan')):.4f} | "
                  f"{c.get('test/tool_correct', float('nan')):.4f} | {c.get('test/choice_acc', float('nan')):.4f} | {c.get('test/loss', float('nan')):.4f} |")
        print("margins:", json.dumps({k: round(v, 4) for k, v in r["margins"].items()}))


if __name__ == "__main__":
    main()
