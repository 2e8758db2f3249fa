"""Prefect wrappers of the phases plus the shared runtime: artifact store, cache keys, MLflow tracking."""

from tasks.env import configure as _configure

_configure()
