"""The phase table (`tasks.phases`), the pipeline config (`tasks.config`), Prefect wrappers of the phases and
the shared runtime: artifact store, cache keys, MLflow tracking."""

from tasks.env import configure as _configure

_configure()
