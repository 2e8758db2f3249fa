"""Numerics and resources: a NaN injected into a loss, an out-of-memory error, a disk that fills up while the
output is written. The phase fails at once with its message (never retried), nothing is published, the lock is
released, the checkpoints already stored stay usable, and a rerun without the fault completes.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch

from forge_models.runtime import OutOfMemory, TrainingDiverged, translate_oom
from tasks.runtime import PhaseWritten, run_phase
from tasks.store import Store, is_transient
from tests.faults import child

pytestmark = pytest.mark.fault

KEY = "t" * 64


def _run(store_url: str, body):
    return run_phase(phase="train", kind="model", key=KEY, store_url=store_url, config_section={}, inputs=[],
                     body=body, tracking=None, parent_run_id=None, device="cpu", precision="fp32")


def _consistent(store: Store) -> list[str]:
    """The store after a failure: no output manifest, no lock; returns the checkpoint files kept."""
    assert not store.exists(store.uri("train", KEY, "manifest.json")), "a failed phase published its output"
    assert not store.exists(store.uri("locks", "train", KEY + ".json")), "the lock was not released"
    return store.list_files(store.uri("checkpoints", "train", KEY))


def test_nan_loss_fails_at_once_and_publishes_nothing(tmp_path, monkeypatch, fault_row):
    store = Store(f"file://{tmp_path}/store")
    real = torch.nn.functional.mse_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 15 else loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 15") as err:
        _run(store.url, child.train_body(steps=20, every=5, step_s=0))
    assert not is_transient(err.value), "a diverged run would be retried"
    kept = _consistent(store)
    assert "train/step-000010/COMPLETE" in kept
    monkeypatch.setattr(torch.nn.functional, "mse_loss", real)
    again = _run(store.url, child.train_body(steps=20, every=5, step_s=0))
    assert again.executed and again.steps_run == 10  # resumed from the last checkpoint before the NaN
    store.verify(again.ref.uri)
    fault_row(
        fault="NaN in the loss", injected="the loss of step 15 multiplied by NaN (monkeypatched loss function)",
        did=f"TrainingDiverged ('{str(err.value)[:60]}...'), classified not transient (no retry); no manifest, lock "
            "released, checkpoint of step 10 kept; the rerun resumed from it and committed",
        lost="the 5 steps after the last checkpoint",
    )


def test_out_of_memory_fails_at_once_with_advice(tmp_path, fault_row):
    store = Store(f"file://{tmp_path}/store")

    def body(ctx, inputs, out_dir):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except Exception as exc:  # what the phases do with a device OOM
            raise translate_oom(exc) from exc

    with pytest.raises(OutOfMemory) as err:
        _run(store.url, body)
    assert not is_transient(err.value)
    _consistent(store)
    fault_row(
        fault="out of memory", injected="the phase body raises torch.OutOfMemoryError",
        did=f"OutOfMemory with advice ('{str(err.value)[:70]}...'), not retried; nothing published, lock released",
        lost="the phase's compute (nothing stored)",
    )


@pytest.mark.parametrize("when", ["checkpoint", "output"])
def test_disk_full_fails_the_phase_and_leaves_the_store_consistent(tmp_path, monkeypatch, when, fault_row):
    store = Store(f"file://{tmp_path}/store")
    real_put = Store.put_file
    puts = {"n": 0}

    def full_disk(self, local, uri):
        puts["n"] += 1
        target = "/checkpoints/" in uri if when == "checkpoint" else "/checkpoints/" not in uri
        if target and (when == "checkpoint" and "step-000010" in uri or when == "output" and "phase.json" in uri):
            # the write starts, then the device is full: a torn file is left behind, as a real ENOSPC would
            path = self._path(uri)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"\0" * 7)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_put(self, local, uri)

    monkeypatch.setattr(Store, "put_file", full_disk)
    with pytest.raises(OSError, match="No space left on device") as err:
        _run(store.url, child.train_body(steps=20, every=5, step_s=0))
    assert not is_transient(err.value), "a full disk would be retried at once"
    kept = _consistent(store)
    if when == "checkpoint":
        # the torn checkpoint has no COMPLETE marker: a rerun never trusts it; the one before it stays whole
        assert "train/step-000005/COMPLETE" in kept and "train/step-000010/COMPLETE" not in kept
    monkeypatch.setattr(Store, "put_file", real_put)
    again = _run(store.url, child.train_body(steps=20, every=5, step_s=0))
    store.verify(again.ref.uri)
    meta = json.loads(store.read_bytes(store.uri_join(again.ref.uri, "phase.json")))
    if when == "checkpoint":
        assert meta["resumed_from"] == ["train/step-000005"] and again.steps_run == 15
    fault_row(
        fault=f"disk full while writing the {when}",
        injected="Store.put_file writes 7 bytes of the "
                 + ("checkpoint of step 10" if when == "checkpoint" else "output's phase.json") + " then raises ENOSPC",
        did="the phase failed with 'No space left on device' (not retried); no manifest, lock released; the torn "
            f"file was never trusted; the rerun {'resumed from step 5 and ' if when == 'checkpoint' else ''}committed",
        lost="the steps after the last complete checkpoint" if when == "checkpoint" else "the output write (redone)",
    )
