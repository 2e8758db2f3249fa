# syntax=docker/dockerfile:1
# Agent Forge GPU worker: the project installed from requirements.lock on a CUDA runtime image, running a
# Prefect process worker. Build context: the repository root (infra/compose.yaml does this:
#   docker build -f infra/worker.Dockerfile -t agent-forge/worker:0.1.0 .
# ). The same image runs the flow-run pods of the Kubernetes work pool (infra/k8s/base-job-template.json).
# The GPU driver comes from the host (NVIDIA Container Toolkit); torch's wheel brings its own CUDA
# libraries, so the host driver must support the CUDA version of the torch wheel.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}
ARG PYTHON_VERSION=3.11
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Python 3.11 (the project's tested version; Ubuntu 24.04 ships 3.12) in a virtual environment with pip.
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /opt/agent-forge
# Dependencies first (own layer, reused while only the code changes). torch==2.13.0 from PyPI is the
# CUDA build and pulls its nvidia-* libraries.
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY forge_models ./forge_models
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import forge_models, tasks, flows.agent_forge"

# Unprivileged user; the checkout is writable because flow runs start in it (deployments'
# set_working_directory pull step, FORGE_CHECKOUT) and write small local files there.
RUN useradd --uid 10001 --create-home --home-dir /home/forge --shell /usr/sbin/nologin forge \
 && mkdir -p /var/cache/forge \
 && chown -R forge:forge /opt/agent-forge /var/cache/forge
ENV FORGE_CHECKOUT=/opt/agent-forge \
    PREFECT_HOME=/var/cache/forge/prefect \
    HF_HOME=/var/cache/forge/hf \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
USER 10001

CMD ["prefect", "worker", "start", "--pool", "forge-gpu", "--type", "process", "--limit", "1"]
