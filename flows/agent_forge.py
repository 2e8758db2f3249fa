"""The Agent Forge flow: data, then the configured phases in order, each a cached Prefect task.

Which task (or sub-flow) runs a phase, and what it is given, is the phase table's (`tasks.phases`); this
module names no phase.

From Python:

    from flows.agent_forge import agent_forge
    from flows.config import load_config
    result = agent_forge(load_config(preset="tiny"))
    print(result.phases[-1].artifact.uri)

From the shell: ``forge run --preset tiny``. The flow's single parameter is the `ForgeConfig`, so the
Prefect UI shows it as a form and validates it. Results (small `PhaseResult` JSON documents) are stored
under ``<store>/prefect-results``; the result-storage block is created here, never by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from prefect import Flow, flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.runners import subflow_options
from tasks import phases
from tasks.config import ForgeConfig
from tasks.runtime import PhaseResult, prefect_ui_url, resolve_device
from tasks.store import ArtifactRef, Store
from tasks.tracking import Tracking, flatten

log = logging.getLogger("agent_forge")


class PhaseSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    status: str = Field(description="completed or failed")
    cached: bool = Field(description="True when the output was reused instead of computed.")
    artifact: ArtifactRef | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    steps_run: int = 0


class PipelineResult(BaseModel):
    """What the flow returns: per step (data + phases) status, cache hit, metrics and artifact."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str | None
    store: str
    mlflow_run_id: str | None
    mlflow_ui: str | None = None
    prefect_ui: str | None = None
    phases: list[PhaseSummary]
    test_metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per model of the last phase: the harness on the test split."
    )
    registered: dict[str, Any] | None = Field(
        None, description="The final agent in the MLflow registry: name, version, model_uri, seconds (None: not registered)."
    )

    def phase(self, name: str) -> PhaseSummary:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)


def result_storage_block(store_url: str):
    """The block that stores Prefect results under ``<store>/prefect-results`` (not saved)."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    store = Store(store_url)
    if store.protocol == "file":
        return LocalFileSystem(basepath=f"{store.root}/prefect-results")
    # Keys come from the standard AWS environment variables; the endpoint is the one in the environment now
    # and the s3fs instance is fresh, like the Store's: without settings, fsspec handed every later run in
    # this process the first run's cached client, endpoint included (a test suite's later runs then wrote
    # their results to a server that no longer existed and hung).
    settings: dict = {"skip_instance_cache": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["client_kwargs"] = {"endpoint_url": endpoint}
    return RemoteFileSystem(basepath=store.uri("prefect-results"), settings=settings)


def ensure_result_storage(store_url: str):
    """Save (idempotently) the block that stores Prefect results under ``<store>/prefect-results``."""
    block = result_storage_block(store_url)
    block.save("forge-results-" + hashlib.sha256(Store(store_url).url.encode()).hexdigest()[:12], overwrite=True)
    return block


def preflight(config: ForgeConfig) -> Store:
    """Checks that need the environment, done before any data is read or model built."""
    resolve_device(config.device.device)
    store = Store(config.store.url)
    probe = store.uri(f".forge-probe-{time.time_ns()}")
    store.write_bytes(probe, b"ok")
    store.delete(probe)
    return store


def _run_step(task_fn, label: str, *args, **kwargs) -> tuple[PhaseResult, bool]:
    """Run a task; if Prefect's cache points at an output that no longer verifies, recompute it."""
    state = task_fn(*args, return_state=True, **kwargs)
    result: PhaseResult = state.result()  # raises the task's exception on failure
    cached = state.name == "Cached"
    if cached:
        store = Store(args[0].store.url)
        try:
            store.verify(result.ref.uri, expected_digest=result.ref.digest, deep=False)
        except Exception as exc:  # noqa: BLE001
            get_run_logger().warning("%s: cached result no longer valid (%s); recomputing", label, exc)
            state = task_fn.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
            result = state.result()
            cached = False
    return result, cached or not result.executed


@flow(name="agent-forge", persist_result=False, log_prints=True, validate_parameters=True)
def agent_forge(config: ForgeConfig) -> PipelineResult:
    """Run Agent Forge: build the data, then each phase in ``config.phases`` (cached by content)."""
    from prefect.runtime import flow_run

    from tasks.data import data_task
    from tasks.imports import import_task

    logger = get_run_logger()
    store = preflight(config)
    storage = ensure_result_storage(config.store.url)
    tracking = Tracking.from_config(config.tracking, store, config.name)
    parent = None
    if tracking:
        parent = tracking.start_run(
            f"{config.name}-{flow_run.name}",
            {
                "prefect.flow_run_id": flow_run.id,
                "prefect.flow_run_name": flow_run.name,
                "prefect.ui_url": prefect_ui_url(flow_run.ui_url),
                "forge.store": store.url,
                "forge.phases": ",".join(config.phases),
            },
        )
        tracking.log_params(parent, flatten("", config.model_dump(mode="json", exclude={"store", "tracking"}), {}))
    summaries: list[PhaseSummary] = []
    try:
        t0 = time.monotonic()
        data, cached = _run_step(data_task.with_options(result_storage=storage), "data", config, parent_run_id=parent)
        summaries.append(_summary("data", data, cached, time.monotonic() - t0))
        previous = data
        if phases.phase(config.phases[0]).input_kind != "dataset":  # the pipeline starts from a given model folder
            t0 = time.monotonic()
            previous, cached = _run_step(import_task.with_options(result_storage=storage), "import", config, parent_run_id=parent)
            summaries.append(_summary("import", previous, cached, time.monotonic() - t0))
        for name in config.phases:
            t0 = time.monotonic()
            result, cached = _run_phase(phases.phase(name), config, data, previous, parent, storage)
            summaries.append(_summary(name, result, cached, time.monotonic() - t0))
            logger.info("%s: %s -> %s", name, "cached" if cached else "computed", result.ref.uri)
            previous = result
        test_metrics: dict[str, dict[str, float]] = {}
        if config.final_test_eval:
            from flows.evaluate import run_evaluation

            for ev in run_evaluation(config, data.ref, previous.ref, "test", result_storage=storage):
                test_metrics[ev.model] = ev.metrics
        registered = None
        if tracking and parent:
            tracking.log_metrics(parent, {f"test/{m}/{k}": v for m, ms in test_metrics.items() for k, v in ms.items()})
            final = summaries[-1]
            tracking.log_metrics(parent, {f"{final.name}/{k}": v for k, v in final.metrics.items()})
            tracking.log_metrics(parent, {f"seconds/{s.name}": s.seconds for s in summaries})
            tracking.set_tags(parent, {"forge.final_uri": final.artifact.uri if final.artifact else None})
            if config.tracking.register_final and final.artifact is not None:
                registered = _register(config, tracking, parent, final.artifact, test_metrics, str(flow_run.id))
                tracking.log_metrics(parent, {"seconds/register": registered["seconds"]} if registered else {})
            tracking.end(parent, "FINISHED")
    except BaseException:
        if tracking and parent:
            tracking.end(parent, "FAILED")
        raise
    return PipelineResult(
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        store=store.url,
        mlflow_run_id=parent,
        mlflow_ui=tracking.ui_command() if tracking else None,
        prefect_ui=prefect_ui_url(flow_run.ui_url),
        phases=summaries,
        test_metrics=test_metrics,
        registered=registered if tracking and parent else None,
    )


def _register(config: ForgeConfig, tracking: Tracking, parent: str, final: ArtifactRef,
              test_metrics: dict[str, dict[str, float]], flow_run_id: str) -> dict[str, Any] | None:
    """The final agent into the MLflow registry as ``<name>@candidate`` (see flows/serving.py).

    Only a final artifact with exactly one model is an agent; anything else is logged and left unregistered.
    """
    import json as _json

    from flows.serving import register_agent

    if len(test_metrics) > 1 or not any(k.endswith("/config.json") and k.count("/") == 1
                                        for k in Store(final.uri).read_manifest(final.uri)[0]["files"]):
        get_run_logger().warning("final artifact %s holds %d models: not registered as an agent", final.uri,
                                 max(1, len(test_metrics)))
        return None
    metrics = next(iter(test_metrics.values()), {})
    config_sha = hashlib.sha256(_json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    out = register_agent(
        final.uri, tracking_uri=tracking.uri, name=config.name, run_id=parent, test_metrics=metrics,
        tags={"prefect.flow_run_id": flow_run_id, "forge.config_sha256": config_sha,
              "forge.report": Store.uri_join(final.uri, "report.md")},
        run_url=tracking.run_url(parent),
    )
    get_run_logger().info("registered %s version %s as %s (%.1f s)", out["name"], out["version"], out["model_uri"],
                          out["seconds"])
    return out


def _run_phase(spec: phases.PhaseSpec, config: ForgeConfig, data: PhaseResult, previous: PhaseResult,
               parent: str | None, storage) -> tuple[PhaseResult, bool]:
    """Run one phase as the table declares it: a task (cached by content), or a sub-flow on ``config.runner``."""
    step = spec.load()
    inputs = {} if spec.input_kind == "dataset" else {"previous": previous}  # later phases take the previous output
    if isinstance(step, Flow):  # e.g. evomerge: its candidates are the tasks, fanned out on config.runner
        result = step.with_options(**subflow_options(config.runner, storage))(
            config, dataset=data, parent_run_id=parent, **inputs)
        return result, not result.executed
    return _run_step(step.with_options(result_storage=storage), spec.name, config, dataset=data,
                     parent_run_id=parent, **inputs)


def _summary(name: str, result: PhaseResult, cached: bool, seconds: float) -> PhaseSummary:
    return PhaseSummary(
        name=name, status="completed", cached=cached, artifact=result.ref, metrics=dict(result.ref.metrics),
        seconds=seconds, steps_run=0 if cached else result.steps_run,
    )


def result_json(result: PipelineResult) -> dict[str, Any]:
    """The `--summary-json` document."""
    return {
        "flow_run_id": result.flow_run_id,
        "store": result.store,
        "mlflow_run_id": result.mlflow_run_id,
        "phases": [
            {
                "name": p.name,
                "status": p.status,
                "cached": p.cached,
                "artifact": {"uri": p.artifact.uri, "digest": p.artifact.digest} if p.artifact else None,
                "metrics": p.metrics,
                "seconds": round(p.seconds, 3),
                "steps_run": p.steps_run,
            }
            for p in result.phases
        ],
        "test_metrics": result.test_metrics,
        "registered": result.registered,
    }
