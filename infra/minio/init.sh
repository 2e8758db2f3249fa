#!/bin/sh
# One-shot MinIO set-up for Agent Forge (the minio-init service of infra/compose.yaml); safe to re-run.
#  - buckets: forge (the pipeline store, FORGE_STORE=s3://forge/store) and mlflow (MLflow artifacts)
#  - an access key for the pipeline and MLflow, limited to those two buckets (the root user stays
#    with the operator).
# Every credential comes from the environment.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${FORGE_S3_ACCESS_KEY:?}" "${FORGE_S3_SECRET_KEY:?}"

mc alias set forge http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
for bucket in forge mlflow; do
  mc mb --ignore-existing "forge/$bucket"
done
mc admin policy create forge forge-readwrite /init/forge-policy.json
mc admin user add forge "$FORGE_S3_ACCESS_KEY" "$FORGE_S3_SECRET_KEY"
if ! out=$(mc admin policy attach forge forge-readwrite --user "$FORGE_S3_ACCESS_KEY" 2>&1); then
  case "$out" in
    *"already"*) ;;                       # re-run: the policy is attached already
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
echo "minio-init: buckets forge and mlflow ready; access key $FORGE_S3_ACCESS_KEY has forge-readwrite"
