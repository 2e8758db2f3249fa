"""Cold run against fully cached rerun of the tiny preset, plus the `make demo`-style wall time.

    .venv/bin/python bench/cache_rerun.py [--preset tiny] [--workdir bench/out/cache]

Runs `forge run --preset P` twice in fresh subprocesses on a fresh local store (each pays Prefect's
ephemeral server start, as a user does). Goal: the rerun takes at most 10% of the cold run.
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


def run(workdir: Path, preset: str, summary: str) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FORGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--summary-json", summary],
                          cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return seconds, json.loads((workdir / summary).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "cache"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cold, s1 = run(workdir, args.preset, "cold.json")
    warm, s2 = run(workdir, args.preset, "warm.json")
    assert all(p["cached"] for p in s2["phases"]), "rerun was not fully cached"
    report = {
        "preset": args.preset,
        "cold_s": round(cold, 1),
        "rerun_s": round(warm, 1),
        "rerun_over_cold": round(warm / cold, 3),
        "cold_phase_seconds": {p["name"]: p["seconds"] for p in s1["phases"]},
        "cognate_metrics": {k: v for k, v in s1["phases"][-1]["metrics"].items()
                            if k.split("/")[-1] in ("ppl", "unigram_gain", "arith_em", "tool_valid", "choice_acc", "params", "refine_steps", "tokens_per_s")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
