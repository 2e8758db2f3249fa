"""MLflow tracking: one parent run per flow run, one child run per phase, linked to Prefect by tags.

Uses `MlflowClient` with explicit run ids (no global active run), so it is safe from task threads.
Embedded default: a SQLite file under the local store; `MLFLOW_TRACKING_URI` (or tracking.uri) points
at a server instead. Params are write-once in MLflow: a retried task reuses its child run (found by the
Prefect task run id) and only logs params that are not there yet, so retries never crash on them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from tasks.store import Store

log = logging.getLogger(__name__)

MAX_PARAM = 6000
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
"""The experiment tag MLflow 3's UI reads to open an experiment in its model-training view."""


def resolve_tracking_uri(uri: str | None, store: Store) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if store.protocol == "file":
        Path(store.root).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store.root}/mlflow.db"
    local = Path("forge-mlflow").absolute()
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local}/mlflow.db"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
        out[prefix] = text[:MAX_PARAM]
    return out


class Tracking:
    """A thin wrapper over MlflowClient for the pipeline's run tree."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._mlflow = mlflow
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # noqa: BLE001 - created concurrently by another process
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        # MLflow 3's UI files an experiment without this tag under GenAI ("Evaluation runs"); ours trains models.
        if (exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND):
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    @classmethod
    def from_config(cls, tracking_cfg, store: Store, pipeline_name: str) -> "Tracking | None":
        if not tracking_cfg.enabled:
            return None
        uri = resolve_tracking_uri(tracking_cfg.uri, store)
        artifacts = store.uri("mlflow-artifacts") if store.protocol != "file" else f"{store.root}/mlflow-artifacts"
        if uri.startswith("http"):
            artifacts = None  # the server decides (proxied artifacts)
        return cls(uri, tracking_cfg.experiment or pipeline_name, artifacts)

    # ------------------------------------------------------------------ runs

    def start_run(self, name: str, tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def child_run(self, parent_run_id: str | None, phase: str, tags: Mapping[str, str]) -> str:
        """The child run of this phase attempt; a retry of the same Prefect task run reuses it."""
        task_run_id = tags.get("prefect.task_run_id")
        if task_run_id:
            existing = self.find_run("prefect.task_run_id", task_run_id)
            if existing:
                self.client.update_run(existing, status="RUNNING")
                return existing
        return self.start_run(phase, {**tags, "forge.phase": phase}, parent_run_id)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log params that are not yet on the run (MLflow params are write-once)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 90):
            self.client.log_batch(run_id, params=new[i : i + 90])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        import math
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_metric_name(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            if v is not None:
                self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_table(self, run_id: str, rows: list[Mapping[str, Any]], name: str) -> None:
        """A table artifact (MLflow's table format, shown in the run's Artifacts / Evaluation view)."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = {c: [_cell(row.get(c)) for row in rows] for c in columns}
        self.client.log_table(run_id, data=data, artifact_file=name)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_url(self, run_id: str) -> str:
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def ui_command(self) -> str:
        if self.uri.startswith("http"):
            return f"open {self.uri}"
        return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000"


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _metric_name(name: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)
