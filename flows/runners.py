"""The task runner for fanned-out work, chosen in config: threads (default), Dask or Ray.

Mapped work (model evaluations now, EvoMerge populations later) runs in a sub-flow whose task runner
comes from ``config.runner``, so one pipeline can keep its phases on the GPU worker and spread
evaluations over a cluster. GPU needs are annotated per task: Dask resources ``{"GPU": n}`` (start
workers with ``--resources GPU=1``), Ray ``num_gpus``.
"""

from __future__ import annotations

import contextlib

from tasks.config import RunnerConfig
from forge_models.runtime import ConfigError


def make_task_runner(cfg: RunnerConfig):
    if cfg.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    if cfg.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:  # pragma: no cover - prefect-dask is pinned
            raise ConfigError("runner.kind 'dask' needs prefect-dask installed") from exc
        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": cfg.n_workers, "threads_per_worker": 1, "processes": cfg.processes,
            "dashboard_address": None, "host": "127.0.0.1", "protocol": "tcp://",
            **({"resources": {"GPU": cfg.gpus_per_task}} if cfg.gpus_per_task else {}),
        })
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ConfigError(
            "runner.kind 'ray' needs prefect-ray, which is not installed by default: pip install prefect-ray"
        ) from exc
    return RayTaskRunner(address=cfg.address) if cfg.address else RayTaskRunner()


def subflow_options(cfg: RunnerConfig, result_storage=None) -> dict:
    """``with_options`` of a fan-out sub-flow: the configured task runner and the pipeline's result storage."""
    options = {"task_runner": make_task_runner(cfg)}
    if result_storage is not None:
        options["result_storage"] = result_storage
    return options


def resource_annotation(cfg: RunnerConfig):
    """Context manager around .map()/.submit() that tells the cluster what each task needs."""
    if not cfg.gpus_per_task:
        return contextlib.nullcontext()
    if cfg.kind == "dask":
        import dask

        return dask.annotate(resources={"GPU": cfg.gpus_per_task})
    if cfg.kind == "ray":
        from prefect_ray.context import remote_options

        return remote_options(num_gpus=cfg.gpus_per_task)
    return contextlib.nullcontext()
