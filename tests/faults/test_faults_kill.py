"""Kill -9 of a process running a phase (mid-step and mid-upload, on a local store and on S3), and races of
identical runs on one store: the rerun takes the dead run's lock over at once, resumes from the last complete
checkpoint, does not recompute the finished phase, and stores weights bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tasks.store import Store

pytestmark = pytest.mark.fault

STEPS, EVERY = 30, 10


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.slow)])
def store_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return f"s3://{request.getfixturevalue('bucket')}/store"


def _reference(children, tmp_path, store_url: str) -> dict:
    """An uninterrupted run on a fresh prefix of the same kind of store (in this process: no start-up cost)."""
    from tests.faults import child

    ref_url = store_url.rsplit("/", 1)[0] + "/reference"
    assert child.main([ref_url, str(tmp_path / "ref.json"), "--steps", str(STEPS), "--every", str(EVERY)]) == 0
    return json.loads((tmp_path / "ref.json").read_text())


def _checkpoint_done(store: Store, step: int) -> bool:
    uri = store.uri("checkpoints", "train", "t" * 64, "train", f"step-{step:06d}", "COMPLETE")
    try:
        return store.exists(uri)
    except Exception:  # noqa: BLE001 - the store may be mid-write
        return False


def test_kill9_mid_step_resumes_from_last_checkpoint_bit_identical(children, tmp_path, store_url, fault_row):
    ref = _reference(children, tmp_path, store_url)
    store = Store(store_url)
    run = children([store_url, str(tmp_path / "a.json"), "--steps", str(STEPS), "--every", str(EVERY),
                    "--step-s", "0.15"], tmp_path)
    # kill in the middle of step 2*EVERY+3: two checkpoints are complete in the store, the third is not
    run.wait_for(lambda: _checkpoint_done(store, 2 * EVERY) and f"STEP {2 * EVERY + 3}" in run.lines)
    run.kill9()
    assert store.exists(store.uri("locks", "train", "t" * 64 + ".json")), "the crash left its lock behind"
    assert store.exists(store.uri("prep", "p" * 64, "manifest.json"))
    t0 = time.monotonic()
    rerun = children([store_url, str(tmp_path / "b.json"), "--steps", str(STEPS), "--every", str(EVERY)], tmp_path)
    rerun.wait_for(lambda: any(line.startswith("RESUMED") for line in rerun.lines), timeout=60)
    resumed_after = time.monotonic() - t0
    assert rerun.finish() == 0, rerun.output[-3000:]
    got = json.loads((tmp_path / "b.json").read_text())
    assert f"RESUMED {2 * EVERY}" in rerun.lines
    assert got["prep"]["executed"] is False, "the finished phase was recomputed"
    assert got["train"]["executed"] is True and got["train"]["steps_run"] == STEPS - 2 * EVERY
    assert got["train"]["resumed_from"] == ["train/step-000020"]
    assert got["train"]["sha256"]["model.safetensors"] == ref["train"]["sha256"]["model.safetensors"]
    assert not store.exists(store.uri("locks", "train", "t" * 64 + ".json"))
    assert store.list_files(store.uri("checkpoints", "train", "t" * 64)) == [], "checkpoints are dropped once stored"
    kind = "local store" if store_url.startswith("file") else "S3 (moto)"
    fault_row(
        fault=f"kill -9 mid-step ({kind})",
        injected=f"SIGKILL to the process group during step {2 * EVERY + 3} of {STEPS}, checkpoints every {EVERY}",
        did=f"rerun took the dead run's lock over and resumed from step {2 * EVERY} after {resumed_after:.1f} s "
            f"(process start included); finished phase reused; weights sha256 equal to an uninterrupted run's",
        lost=f"{3} steps of compute (after the last checkpoint)",
    )


def test_kill9_mid_upload_never_trusts_the_partial_output(children, tmp_path, store_url, fault_row):
    ref = _reference(children, tmp_path, store_url)
    store = Store(store_url)
    run = children([store_url, str(tmp_path / "a.json"), "--steps", str(STEPS), "--every", str(STEPS),
                    "--upload-s", "0.4"], tmp_path)
    # prep uploads prep.txt, phase.json, report.md; train uploads model.safetensors first: kill after it landed
    run.wait_for(lambda: sum(line.startswith("UPLOAD") for line in run.lines) >= 5)
    run.kill9()
    out_uri = store.uri("train", "t" * 64)
    partial = store.list_files(out_uri)
    assert partial and "manifest.json" not in partial, partial
    from forge_models.runtime import ArtifactIntegrityError

    with pytest.raises(ArtifactIntegrityError, match="manifest.json is missing"):
        store.verify(out_uri)
    rerun = children([store_url, str(tmp_path / "b.json"), "--steps", str(STEPS), "--every", str(STEPS)], tmp_path)
    assert rerun.finish() == 0, rerun.output[-3000:]
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["prep"]["executed"] is False and got["train"]["executed"] is True
    assert got["train"]["sha256"]["model.safetensors"] == ref["train"]["sha256"]["model.safetensors"]
    store.verify(out_uri)
    kind = "local store" if store_url.startswith("file") else "S3 (moto)"
    fault_row(
        fault=f"kill -9 mid-upload ({kind})",
        injected="SIGKILL while the output's files are uploaded (before its manifest)",
        did=f"the partial prefix ({len(partial)} of 3 files, no manifest) was refused by every reader; the rerun "
            "rewrote it and committed a manifest; weights equal to an uninterrupted run's",
        lost="the upload (recomputed: the phase had no checkpoint)",
    )


@pytest.mark.parametrize("n", [2, 4])
def test_identical_runs_race_on_one_store(children, tmp_path, store_url, n, fault_row):
    if store_url.startswith("file") == (n == 4):
        pytest.skip("two racers on the local store, four on S3 (the expensive cases are not doubled)")
    runs = [children([store_url, str(tmp_path / f"r{i}.json"), "--steps", "12", "--every", "6",
                      "--step-s", "0.1", "--barrier", str(tmp_path / "barrier"), str(n)], tmp_path)
            for i in range(n)]
    for r in runs:
        assert r.finish() == 0, r.output[-3000:]
    docs = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(n)]
    for phase in ("prep", "train"):
        assert sum(d[phase]["executed"] for d in docs) == 1, f"{phase} computed more than once"
        assert len({d[phase]["digest"] for d in docs}) == 1
    store = Store(store_url)
    store.verify(docs[0]["train"]["uri"])
    waited = sum(bool(re.search(r"waiting for .*\(another run", r.output)) for r in runs)
    assert waited >= 1, "no run met another's lock: the race did not happen\n" + "\n---\n".join(r.output[-1500:] for r in runs)
    kind = "local store" if store_url.startswith("file") else "S3 (moto)"
    fault_row(
        fault=f"{n} identical runs at once ({kind})",
        injected=f"{n} processes started together on one store, same phases and keys",
        did=f"each phase computed by exactly one run; {n - 1} reused it ({waited} logged waiting on the lock); "
            "one manifest per output, verified",
    )


def _forge_cli_env(tmp_path) -> dict[str, str]:
    """The user's environment for `forge run`: no Prefect, MLflow, AWS or Forge settings of this test session."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FORGE_"))}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    return env


def _weights_sha256(store_root, uri: str) -> dict[str, str]:
    import hashlib
    from pathlib import Path

    folder = Path(store_root) / uri.split("/forge-store/", 1)[1]
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.slow
def test_kill9_of_forge_run_resumes_the_real_phase_bit_identical(children, tmp_path, fault_row):
    """The real CLI (`forge run`, reduced tiny preset, phases data + cognate) killed with SIGKILL mid-trunk, after
    its first checkpoint: the rerun takes the dead run's lock over at once, reuses the data phase, resumes Cognate
    from the checkpoint, and stores weights bit-identical to an uninterrupted run's."""
    from tests.factories import tiny_overrides

    sets = [a for o in tiny_overrides() + ["phases=[cognate]"] for a in ("--set", o)]
    total_steps = 120 + 30 + 30  # trunk + two variants (tiny_overrides)

    def run(workdir, summary: str):
        workdir.mkdir(exist_ok=True)
        return children(["run", "--preset", "tiny", "--store", f"file://{workdir}/forge-store",
                         "--summary-json", str(workdir / summary), *sets], workdir, module="flows.cli",
                        base_env=_forge_cli_env(workdir))

    ref_dir, dir_ = tmp_path / "reference", tmp_path / "crash"
    ref = run(ref_dir, "ref.json")
    assert ref.finish(900) == 0, ref.output[-3000:]
    ref_doc = json.loads((ref_dir / "ref.json").read_text())
    ref_cog = next(p for p in ref_doc["phases"] if p["name"] == "cognate")

    first = run(dir_, "a.json")
    ckpts = lambda: list((dir_ / "forge-store" / "checkpoints" / "cognate").glob("*/trunk/step-*/COMPLETE"))  # noqa: E731
    first.wait_for(lambda: bool(ckpts()), timeout=900)
    first.kill9()
    assert list((dir_ / "forge-store" / "locks").rglob("*.json")), "the crash left its lock behind"
    at_kill = sorted(p.parent.name for p in ckpts())
    t0 = time.monotonic()
    rerun = run(dir_, "b.json")
    rerun.wait_for(lambda: any("resuming from checkpoints" in line for line in rerun.lines), timeout=300)
    resumed_after = time.monotonic() - t0
    assert rerun.finish(900) == 0, rerun.output[-3000:]
    doc = json.loads((dir_ / "b.json").read_text())
    phases = {p["name"]: p for p in doc["phases"]}
    assert phases["data"]["cached"], "the finished data phase was recomputed"
    cog = phases["cognate"]
    assert not cog["cached"] and 0 < cog["steps_run"] < total_steps, cog["steps_run"]
    store = Store(f"file://{dir_}/forge-store")
    meta = json.loads((dir_ / "forge-store" / cog["artifact"]["uri"].split("/forge-store/", 1)[1] / "phase.json").read_text())
    assert meta["resumed_from"] and all(r.startswith("trunk/step-") for r in meta["resumed_from"]), meta["resumed_from"]
    store.verify(cog["artifact"]["uri"], expected_digest=cog["artifact"]["digest"])
    got, want = (_weights_sha256(dir_ / "forge-store", cog["artifact"]["uri"]),
                 _weights_sha256(ref_dir / "forge-store", ref_cog["artifact"]["uri"]))
    assert got and got == want, "resumed weights differ from an uninterrupted run's"
    assert not list((dir_ / "forge-store" / "locks").rglob("*.json")), "the lock was not released"
    fault_row(
        fault="kill -9 of `forge run` (real Cognate phase, local store)",
        injected=f"SIGKILL to the CLI's process group mid-trunk, after checkpoint(s) {at_kill} were complete",
        did=f"rerun took the lock over and resumed from {meta['resumed_from']} after {resumed_after:.0f} s (CLI and "
            f"Prefect start included); data phase reused; ran {cog['steps_run']} of {total_steps} steps; "
            f"{len(got)} weight files sha256-equal to an uninterrupted run's",
        lost="the steps after the last checkpoint",
    )
