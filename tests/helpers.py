"""Shared test doubles for the training phases: a simulated crash mid-run and a loss that turns NaN."""

from __future__ import annotations

from forge_models.cognate.model import CognateForCausalLM
from forge_models.runtime import RecordingTracker


class Interrupted(Exception):
    """Raised by StopAt to simulate a crash in the middle of a run."""


class StopAt(RecordingTracker):
    """Records everything and raises Interrupted right after global step ``step`` was logged."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.stop_step = step

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step)
        if step == self.stop_step:
            raise Interrupted(f"stopped at step {step}")


def poison_loss(monkeypatch, at_call: int, labelled_only: bool = False) -> None:
    """Make the ``at_call``-th training forward of a Cognate model return a NaN loss.

    ``labelled_only``: count only calls with ``labels`` (phases that also run unlabelled forwards in train mode).
    """
    original = CognateForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and (not labelled_only or kwargs.get("labels") is not None):
            calls["n"] += 1
            if calls["n"] == at_call:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CognateForCausalLM, "forward", poisoned)
