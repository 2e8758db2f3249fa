# MLflow tracking server for Agent Forge: PostgreSQL backend, proxied artifacts on S3, basic auth.
# Built by infra/compose.yaml (context: infra/); on Kubernetes push it to your registry and reference it
# from infra/k8s/mlflow.yaml. Credentials are never baked in: they come from the environment at run time.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# mlflow[auth] brings Flask-WTF, without which `--app-name basic-auth` refuses to start.
# boto3/botocore pinned as in the project's requirements.lock.
RUN pip install "mlflow[auth]==3.17.2" psycopg2-binary==2.9.13 boto3==1.43.117 botocore==1.43.117

# Auth store settings (database URI without credentials: libpq reads PGHOST/PGUSER/PGPASSWORD).
COPY mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    HOME=/tmp

RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mlflow
USER 10001
WORKDIR /tmp
EXPOSE 5000
CMD ["mlflow", "server", "--app-name=basic-auth", "--host=0.0.0.0", "--port=5000"]
