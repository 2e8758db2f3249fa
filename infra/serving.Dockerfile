# syntax=docker/dockerfile:1
# Agent Forge serving image: the registered agent behind `mlflow models serve --env-manager local`
# (docs/serving.md). CPU by default (the tiny and SmolLM2 agents answer on CPU); build context: the repository root:
#   docker build -f infra/serving.Dockerfile -t agent-forge/serving:0.1.0 .
#   docker run --rm -p 127.0.0.1:8080:8080 -e MLFLOW_TRACKING_URI=http://HOST:5000 \
#     -e FORGE_MODEL_URI=models:/agent-forge@champion agent-forge/serving:0.1.0
# Not built in this repository's tests (no Docker engine there); tests/unit/test_infra.py checks the file.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/agent-forge
# torch's CPU wheel first (the PyPI wheel is the CUDA build, ~2 GB of unused libraries here); `torch==2.13.0`
# in the lock is then already satisfied by 2.13.0+cpu.
COPY requirements.lock ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==$(grep -E '^torch==' requirements.lock | cut -d= -f3)" \
 && pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY forge_models ./forge_models
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import flows.serving"

RUN useradd --uid 10001 --create-home --home-dir /home/forge --shell /usr/sbin/nologin forge
USER 10001
# The model is downloaded from the registry at start; the metrics listen on all interfaces inside the
# container so Prometheus in the cluster can scrape them (the Kubernetes NetworkPolicy limits who can).
ENV FORGE_MODEL_URI=models:/agent-forge@champion \
    FORGE_METRICS_HOST=0.0.0.0 \
    FORGE_METRICS_PORT=9109 \
    HF_HUB_OFFLINE=1 \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
EXPOSE 8080 9109
CMD ["sh", "-c", "exec mlflow models serve -m \"$FORGE_MODEL_URI\" --env-manager local -h 0.0.0.0 -p 8080 -w 1"]
