"""What every phase task shares: reuse-or-compute at a cache key, resumable checkpoints in the store,
the MLflow child run, Prefect artifacts (report, progress, link) and the returned `PhaseResult`.

A phase task (tasks/<phase>.py) only says how to compute its key, which inputs to download, how to call
its pure `forge_models` phase and how to write the output folder. Everything else is here:

1. A committed output at ``<store>/<phase>/<key>/`` (valid manifest) is returned as is: idempotent retries.
2. Inputs are downloaded and verified against their manifests (a corrupted input stops the phase).
3. Checkpoints of an interrupted attempt are pulled from ``<store>/checkpoints/<phase>/<key>/`` so the
   phase resumes from its last complete checkpoint; new checkpoints are mirrored there as they are made.
4. The output folder is uploaded with manifest.json last, then the checkpoints are deleted.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

import forge_models
from forge_models.config import DATA_KINDS, HEADLINE_METRICS  # noqa: F401  (HEADLINE_METRICS: every phase's report columns)
from forge_models.runtime import ArtifactIntegrityError, ForgeError, PhaseContext
from tasks.locks import StoreLock
from tasks.store import ArtifactRef, Store, is_transient
from tasks.tracking import Tracking, flatten

log = logging.getLogger("agent_forge")

MODEL_LOAD_LOCK = threading.Lock()
"""Serialises from_pretrained across threads: it switches torch's process-wide default device to meta."""


class PhaseResult(BaseModel):
    """A phase task's return value (JSON-serialised as the Prefect result; never weights)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phase: str = Field(description="Phase name.")
    key: str = Field(description="Cache key of this phase run.")
    ref: ArtifactRef = Field(description="The committed output.")
    executed: bool = Field(description="True if this call computed the output, False if it reused one.")
    seconds: float = Field(description="Wall-clock seconds of this call.")
    steps_run: int = Field(0, description="Optimizer steps executed by this call (0 when reused).")


@dataclass
class PhaseWritten:
    """What a phase body reports after writing its output folder."""

    metrics: dict[str, float]
    report_md: str
    params: int | None = None
    steps_run: int = 0
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name.json -> rows, logged to MLflow


# ---------------------------------------------------------------------------------- Prefect glue


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry storage/network errors only (never config, NaN, OOM, integrity)."""
    try:
        state.result()
    except ForgeError:
        return False
    except Exception as exc:  # noqa: BLE001
        transient = is_transient(exc)
        log.warning("task %s failed with %s: %s", task.name, type(exc).__name__, "retrying" if transient else "not retried")
        return transient
    return False


PHASE_TASK_OPTIONS = dict(
    retries=2, retry_condition_fn=retry_transient, result_serializer="json", persist_result=True,
)
"""What every stored step's @task shares: transient-only retries, JSON results persisted under the store."""


def _prefect_run_ids() -> dict[str, str | None]:
    try:
        from prefect.runtime import flow_run, task_run

        return {
            "prefect.flow_run_id": flow_run.id,
            "prefect.flow_run_name": flow_run.name,
            "prefect.task_run_id": task_run.id,
            "prefect.task_run_name": task_run.name,
            "prefect.ui_url": prefect_ui_url(flow_run.ui_url),
        }
    except Exception:  # noqa: BLE001 - outside a Prefect run
        return {}


def executor_name() -> str:
    """Where a task runs: ``dask:<worker address>`` on a Dask worker, else ``<host>:<thread name>``."""
    import socket

    try:
        from distributed import get_worker

        return f"dask:{get_worker().address}"
    except Exception:  # noqa: BLE001 - not on a Dask worker
        return f"{socket.gethostname()}:{threading.current_thread().name}"


def prefect_ui_url(url: str | None) -> str | None:
    """The flow run's UI URL, or None without a UI (ephemeral mode renders it as 'None/flow-runs/...')."""
    return url if url and url.startswith("http") else None


def prefect_artifact(kind: str, **kwargs):
    """Create a Prefect artifact when inside a run; never fail the phase because of the UI."""
    try:
        from prefect import artifacts
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return None  # plain library call: no run to attach to (and no API to start)
        return getattr(artifacts, kind)(**kwargs)
    except Exception as exc:  # noqa: BLE001
        log.debug("prefect artifact %s not created: %s", kind, exc)
        return None


class TaskTracker:
    """Tracker for phases running inside a task: MLflow metrics, Prefect progress, terminal lines.

    Metrics are buffered and flushed every few seconds so per-step logging stays cheap.
    """

    def __init__(self, phase: str, tracking: Tracking | None, run_id: str | None, progress_id=None):
        self.phase = phase
        self.tracking, self.run_id, self.progress_id = tracking, run_id, progress_id
        self._buffer: list[tuple[int | None, dict[str, float]]] = []
        self._last_flush = time.monotonic()
        self._last_progress = 0.0
        self._lock = threading.Lock()
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        with self._lock:
            self._buffer.append((step, dict(metrics)))
        if time.monotonic() - self._last_flush > 5:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            buffer, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        if not (self.tracking and self.run_id):
            return
        for step, metrics in buffer:
            try:
                self.tracking.log_metrics(self.run_id, metrics, step)
            except Exception as exc:  # noqa: BLE001 - tracking must not kill training
                log.warning("MLflow metric logging failed: %s", exc)
                return

    def progress(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last_progress < 3 and done < total:
            return
        self._last_progress = now
        pct = 100.0 * done / max(total, 1)
        log.info("[%s] %5.1f%% %s", self.phase, pct, message)
        if self.progress_id is not None:
            prefect_artifact("update_progress_artifact", artifact_id=self.progress_id, progress=pct)


# ---------------------------------------------------------------------------------- the runner


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ForgeError(f"device {name!r} requested but CUDA is not available; set device.device=cpu or auto")
    return dev


def ref_from_manifest(store: Store, uri: str, manifest: dict, run_id: str | None = None) -> ArtifactRef:
    phase_meta = {}
    if "phase.json" in manifest["files"]:
        phase_meta = json.loads(store.read_bytes(store.uri_join(uri, "phase.json")))
    return ArtifactRef(
        uri=uri,
        digest=manifest["digest"],
        kind=manifest["kind"],
        params=phase_meta.get("params"),
        bytes=store.total_bytes(manifest),
        metrics={k: float(v) for k, v in phase_meta.get("metrics", {}).items() if isinstance(v, (int, float))},
        mlflow_run_id=run_id or phase_meta.get("mlflow_run_id"),
    )


Body = Callable[[PhaseContext, list[Path], Path], PhaseWritten]


def run_phase(
    *,
    phase: str,
    kind: str,
    key: str,
    store_url: str,
    config_section: dict[str, Any],
    inputs: list[ArtifactRef],
    body: Body,
    tracking: Tracking | None,
    parent_run_id: str | None,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    threads: int | None = None,
    download_inputs: bool = True,
) -> PhaseResult:
    """Reuse the committed output at ``<store>/<phase>/<key>`` or compute, store and track it.

    ``download_inputs=False``: the body reads what it needs from the store itself (its ``inputs`` list is
    empty); the inputs are still recorded in phase.json.
    """
    t0 = time.monotonic()
    store = Store(store_url)
    out_uri = store.uri(phase, key)
    manifest_uri = store.uri_join(out_uri, "manifest.json")

    def reuse() -> PhaseResult:
        manifest = store.verify(out_uri)
        log.info("[%s] reusing committed output %s", phase, out_uri)
        return PhaseResult(
            phase=phase, key=key, ref=ref_from_manifest(store, out_uri, manifest), executed=False,
            seconds=time.monotonic() - t0,
        )

    if store.exists(manifest_uri):
        return reuse()
    # One writer per output: a concurrent run with the same key waits here and then reuses our output.
    lock = StoreLock(store, f"{phase}/{key}")
    if not lock.acquire(done=lambda: store.exists(manifest_uri)):
        return reuse()
    try:
        if store.exists(manifest_uri):  # committed between our check and the lock
            return reuse()
        return _compute(
            phase=phase, kind=kind, key=key, store=store, out_uri=out_uri, config_section=config_section,
            inputs=inputs, body=body, tracking=tracking, parent_run_id=parent_run_id, device=device,
            precision=precision, seed=seed, threads=threads, t0=t0, lock=lock, download_inputs=download_inputs,
        )
    finally:
        lock.release()


def _compute(
    *, phase, kind, key, store: Store, out_uri, config_section, inputs, body: Body, tracking, parent_run_id,
    device, precision, seed, threads, t0, lock: StoreLock, download_inputs: bool = True,
) -> PhaseResult:
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    ids = _prefect_run_ids()
    run_id = None
    if tracking:
        run_id = tracking.child_run(parent_run_id, phase, {**ids, "forge.cache_key": key})
        tracking.log_params(run_id, flatten("", config_section, {}))
        tracking.set_tags(run_id, {"forge.output_uri": out_uri})
    progress_id = prefect_artifact(
        "create_progress_artifact", progress=0.0, key=f"{phase}-progress", description=f"{phase}: training progress"
    )
    tracker = TaskTracker(phase, tracking, run_id, progress_id)
    ckpt_uri = store.uri("checkpoints", phase, key)
    work = Path(tempfile.mkdtemp(prefix=f"forge-{phase}-"))
    try:
        local_inputs = []
        for i, ref in enumerate(inputs if download_inputs else []):
            dest = work / "inputs" / str(i)
            store.download(ref.uri, dest, expected_digest=ref.digest)
            local_inputs.append(dest)
        ckpt_dir = work / "checkpoints"
        ckpt_dir.mkdir(parents=True)
        store.download_dir(ckpt_uri, ckpt_dir)
        resumed = sorted(str(p.parent.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("COMPLETE"))
        if resumed:
            log.info("[%s] resuming from checkpoints %s", phase, resumed)

        def mirror(folder: Path) -> None:
            rel = folder.relative_to(ckpt_dir).as_posix()
            stage = rel.rsplit("/", 1)[0] if "/" in rel else ""
            store.upload_dir(folder, store.uri_join(ckpt_uri, rel), last="COMPLETE")
            lock.refresh()
            # Drop older checkpoints of the same stage only once the new one is complete remotely.
            stage_uri = store.uri_join(ckpt_uri, stage) if stage else ckpt_uri
            for other in {f.split("/", 1)[0] for f in store.list_files(stage_uri)}:
                if other != folder.name and other.startswith("step-"):
                    store.delete(store.uri_join(stage_uri, other))

        ctx = PhaseContext(
            device=dev, seed=seed, precision=precision, checkpoint_dir=ckpt_dir, tracker=tracker, on_checkpoint=mirror
        )
        out_dir = work / "out"
        out_dir.mkdir()
        written = body(ctx, local_inputs, out_dir)
        tracker.flush()
        phase_meta = {
            "phase": phase,
            "cache_key": key,
            "code_version": forge_models.CODE_VERSION,
            "config": config_section,
            "inputs": [{"uri": r.uri, "digest": r.digest, "kind": r.kind} for r in inputs],
            "metrics": written.metrics,
            "params": written.params,
            "details": written.details,
            "mlflow_run_id": run_id,
            "resumed_from": resumed,
        }
        (out_dir / "phase.json").write_text(json.dumps(phase_meta, indent=2, sort_keys=True, default=str))
        (out_dir / "report.md").write_text(written.report_md)
        lock.ensure_held()  # a run that stalled past the lock's TTL lost the output to another run: never publish
        digest = store.write_prefix(out_dir, out_uri, kind)
        manifest = store.verify(out_uri, expected_digest=digest, deep=False)
        ref = ref_from_manifest(store, out_uri, manifest, run_id)
        seconds = time.monotonic() - t0
        report = written.report_md + f"\n\n**Output:** `{out_uri}` ({ref.bytes:,} bytes, manifest sha256 `{digest[:16]}`)  \n" \
            f"**Wall time:** {seconds:.1f} s, optimizer steps run: {written.steps_run}\n"
        if tracking and run_id:
            tracking.log_metrics(run_id, {**written.metrics, "seconds": seconds})
            tracking.log_text(run_id, report, "report.md")
            for png in out_dir.glob("*.png"):
                tracking.log_artifact(run_id, png)
            for name, rows in written.tables.items():
                tracking.log_table(run_id, rows, name)
            tracking.set_tags(run_id, {"forge.output_digest": digest})
            tracking.end(run_id, "FINISHED")
        prefect_artifact("create_markdown_artifact", key=f"{phase}-report", markdown=report, description=f"{phase} report")
        if tracking and run_id:
            prefect_artifact(
                "create_link_artifact", key=f"{phase}-mlflow", link=tracking.run_url(run_id),
                link_text=f"MLflow run of {phase}", description=f"Start the UI with: {tracking.ui_command()}",
            )
        if progress_id is not None:
            prefect_artifact("update_progress_artifact", artifact_id=progress_id, progress=100.0)
        store.delete(ckpt_uri)
        return PhaseResult(phase=phase, key=key, ref=ref, executed=True, seconds=seconds, steps_run=written.steps_run)
    except BaseException as exc:
        tracker.flush()
        if tracking and run_id:
            try:
                tracking.set_tags(run_id, {"forge.error": f"{type(exc).__name__}: {exc}"[:4000]})
                tracking.end(run_id, "FAILED")
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------- phase tasks


KeyFn = Callable[[Any, ArtifactRef, "ArtifactRef | None"], str]


def phase_task(
    name: str,
    *,
    kind: str,
    key: KeyFn,
    body: Callable[[Any, "ArtifactRef | None"], Body],
    section: str | None,
    takes_previous: bool = True,
    retry_delay_seconds: tuple[float, ...] = (2, 10),
    doc: str = "",
):
    """The Prefect task of a phase: check the dataset, compute the cache key, `run_phase` the body.

    ``key(config, dataset, previous)`` is the phase's cache key (``previous`` is None when the phase takes
    the dataset only); ``body(config, previous)`` returns the function that writes the output folder.
    The task is called ``task(config, dataset=..., [previous=...,] parent_run_id=...)`` by the flow.
    """
    from prefect import task

    def run(config, dataset: PhaseResult, previous: PhaseResult | None = None,
            parent_run_id: str | None = None) -> PhaseResult:
        check_input_kind(dataset.ref, "dataset", name)
        if takes_previous == (previous is None):
            raise ArtifactIntegrityError(f"{name}: {'needs' if takes_previous else 'takes no'} previous phase output")
        prev = previous.ref if previous is not None else None
        store = Store(config.store.url)
        return run_phase(
            phase=name, kind=kind, key=key(config, dataset.ref, prev), store_url=config.store.url,
            config_section=getattr(config, section).model_dump(mode="json") if section else {},
            inputs=[dataset.ref] + ([prev] if prev is not None else []), body=body(config, prev),
            tracking=Tracking.from_config(config.tracking, store, config.name), parent_run_id=parent_run_id,
            device=config.device.device, precision=config.device.precision, seed=config.seed,
            threads=config.device.threads,
        )

    run.__name__ = run.__qualname__ = f"{name}_task"
    run.__doc__ = doc or f"Run (or reuse) phase {name}."

    def cache_key(_ctx, p) -> str:
        prev = p.get("previous")
        return f"{name}-" + key(p["config"], p["dataset"].ref, prev.ref if prev is not None else None)

    return task(name=name, **PHASE_TASK_OPTIONS, retry_delay_seconds=list(retry_delay_seconds),
                cache_key_fn=cache_key)(run)


# ---------------------------------------------------------------------------------- reports


def metrics_table(evaluations: dict[str, dict[str, dict[str, float]]], columns: list[str]) -> str:
    """Markdown before/after table: one row per (when, model); followed by :func:`breakdown_table` (perplexity
    by kind and eval source) when the evaluations report any."""
    table = _rows_table(evaluations, columns)
    breakdown = breakdown_table(evaluations)
    return table + ("\n\n" + breakdown if breakdown else "")


def breakdown_columns(evaluations: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Every ``ppl_<kind>`` (in DATA_KINDS order) and ``ppl_src_<name>`` (sorted) key in the evaluations."""
    keys = {k for when in evaluations.values() for m in when.values() for k in m}
    kinds = [f"ppl_{kind}" for kind in DATA_KINDS if f"ppl_{kind}" in keys]
    return kinds + sorted(k for k in keys if k.startswith("ppl_src_"))


def breakdown_table(evaluations: dict[str, dict[str, dict[str, float]]]) -> str:
    """The "perplexity by kind and source" table ("" when no evaluation reports one): pooled ``ppl`` hides
    real text under the synthetic kinds, and held-out-only eval sources are never in the pool."""
    columns = breakdown_columns(evaluations)
    if not columns:
        return ""
    return "Perplexity by kind and source (eval sources `ppl_src_*` are not in the pooled `ppl`):\n\n" + \
        _rows_table(evaluations, columns)


def _rows_table(evaluations: dict[str, dict[str, dict[str, float]]], columns: list[str]) -> str:
    head = "| when | model | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns) + "\n"
    rows = []
    for when in ("before", "after"):
        for model, m in evaluations.get(when, {}).items():
            cells = [_fmt(m.get(c)) + (f" [{_fmt(m[c + '_lo'])}, {_fmt(m[c + '_hi'])}]" if c + "_lo" in m else "")
                     for c in columns]  # accuracies carry their 95% bootstrap interval
            rows.append(f"| {when} | {model} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def loss_curve_png(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_input_kind(ref: ArtifactRef, expected: str, phase: str) -> None:
    if ref.kind != expected:
        raise ArtifactIntegrityError(f"{phase} needs a {expected!r} artifact, got {ref.kind!r} at {ref.uri}")
