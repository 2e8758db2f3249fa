"""A child process for the fault tests: two phases through the real runtime (lock, checkpoints, store, manifest).

``python -m tests.faults.child STORE_URL SUMMARY_JSON [--steps N] [--every K] [--step-s S] [--upload-s S]``

Phase ``prep`` writes a small file at once; phase ``train`` runs ``--steps`` deterministic SGD steps on a tiny
linear model (seeded data), checkpointing every ``--every`` steps with the project's own
``save_checkpoint`` / ``load_checkpoint`` (mirrored to the store by the runtime), and stores its weights.
Each step sleeps ``--step-s`` so a test can kill the process mid-step; ``--upload-s`` slows every file upload so
it can be killed mid-upload. It prints ``STEP n`` and ``UPLOAD name`` lines as it goes, and the summary (per
phase: executed, steps run, manifest digest, resumed-from) when both phases are done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

from forge_models.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from forge_models.runtime import check_finite
from tasks.runtime import PhaseWritten, run_phase
from tasks.store import Store


def train_body(steps: int, every: int, step_s: float):
    def body(ctx, _inputs, out_dir: Path) -> PhaseWritten:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        y = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
        stage_dir = ctx.checkpoint_dir / "train"
        start = 0
        last = latest_checkpoint(stage_dir)
        if last is not None:
            state = load_checkpoint(last, config_digest="toy", model=model, optimizer=opt, device=ctx.device,
                                    what="toy")
            start = state["step"]
            print(f"RESUMED {start}", flush=True)
        for step in range(start + 1, steps + 1):
            i = (step * 8) % 64
            loss = torch.nn.functional.mse_loss(model(x[i:i + 8]), y[i:i + 8])
            check_finite(loss, step, "toy loss")  # the phases' own guard
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"STEP {step}", flush=True)
            time.sleep(step_s)
            if step % every == 0 and step < steps:
                save_checkpoint(stage_dir, stage="train", step=step, total=steps, config_digest="toy", model=model,
                                optimizer=opt, ctx=ctx, extra={})
        safetensors.torch.save_model(model, str(out_dir / "model.safetensors"))
        return PhaseWritten(metrics={"loss": float(loss.detach())}, report_md="# toy", steps_run=steps - start)

    return body


def prep_body(ctx, _inputs, out_dir: Path) -> PhaseWritten:
    (out_dir / "prep.txt").write_text("prepared\n")
    return PhaseWritten(metrics={}, report_md="# prep")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("summary")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--step-s", type=float, default=0.0)
    p.add_argument("--upload-s", type=float, default=0.0)
    p.add_argument("--barrier", nargs=2, metavar=("DIR", "N"), help="start the phases only when N children are ready")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stdout)
    if a.upload_s:
        put = Store.put_file

        def slow_put(self, local, uri):
            print(f"UPLOAD {Path(local).name}", flush=True)
            time.sleep(a.upload_s)
            put(self, local, uri)

        Store.put_file = slow_put
    if a.barrier:  # racers start their phases together, whatever their import times were
        folder, n = Path(a.barrier[0]), int(a.barrier[1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ready-{os.getpid()}").touch()
        while len(list(folder.glob("ready-*"))) < n:
            time.sleep(0.02)
    out = {}
    for phase, body in (("prep", prep_body), ("train", train_body(a.steps, a.every, a.step_s))):
        r = run_phase(phase=phase, kind="model", key=phase[0] * 64, store_url=a.store, config_section={},
                      inputs=[], body=body, tracking=None, parent_run_id=None, device="cpu", precision="fp32")
        store = Store(a.store)
        meta = json.loads(store.read_bytes(Store.uri_join(r.ref.uri, "phase.json")))
        files = store.verify(r.ref.uri)["files"]
        out[phase] = {"executed": r.executed, "steps_run": r.steps_run, "digest": r.ref.digest, "uri": r.ref.uri,
                      "resumed_from": meta["resumed_from"], "sha256": {k: v["sha256"] for k, v in files.items()}}
    Path(a.summary).write_text(json.dumps(out))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
