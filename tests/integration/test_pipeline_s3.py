"""The tiny pipeline against real local services: a moto S3 server, a Prefect test harness, SQLite MLflow.

Each test uses its own bucket and MLflow experiment; the Prefect harness and the S3 server are shared by
the session (see conftest.py).
"""

from __future__ import annotations

import json
import uuid

import boto3
import pytest

from flows.agent_forge import agent_forge
from flows.config import load_config
from forge_models.runtime import ArtifactIntegrityError, ForgeError
from tests.factories import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _config(bucket: str, mlflow_uri: str, *extra: str):
    name = "t-" + uuid.uuid4().hex[:8]
    return load_config(
        "tiny",
        overrides=tiny_overrides() + [f"name={name}", f"tracking.uri={mlflow_uri}", *extra],
        store=f"s3://{bucket}/forge",
    )


def _keys(bucket: str, endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "ContinuationToken": token} if token else {"Bucket": bucket}
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def test_s3_run_manifests_mlflow_and_cached_rerun(bucket, s3_server, mlflow_uri):
    cfg = _config(bucket, mlflow_uri)
    first = agent_forge(cfg)
    assert [p.name for p in first.phases] == ["data", "cognate", "evomerge", "bitnet", "training"]
    assert not any(p.cached for p in first.phases)
    cognate = first.phase("cognate")
    assert cognate.steps_run == 120 + 30 + 30
    # every trained model beat the unigram baseline on held-out data (measured, gate enforced)
    for name in ("trunk", "math", "story"):
        assert cognate.metrics[f"{name}/unigram_gain"] >= 0.3
    # objects and manifests are in the bucket; weights are safetensors, never pickles
    keys = _keys(bucket, s3_server)
    prefix = cognate.artifact.uri.removeprefix(f"s3://{bucket}/")
    assert f"{prefix}/manifest.json" in keys
    for name in ("trunk", "math", "story"):
        assert f"{prefix}/{name}/model.safetensors" in keys
        assert f"{prefix}/{name}/config.json" in keys
    assert not [k for k in keys if k.endswith((".bin", ".pkl", ".pt")) and k.startswith(prefix)]
    assert any(k.startswith("forge/prefect-results/") for k in keys)
    assert not [k for k in keys if k.startswith("forge/checkpoints/")], "checkpoints are removed once committed"
    manifest = json.loads(boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    assert manifest["kind"] == "model-set"

    # MLflow: a parent run and one child per step, tagged with Prefect ids
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(first.mlflow_run_id)
    assert parent.data.tags["prefect.flow_run_id"] == first.flow_run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.mlflow_run_id]
    assert sorted(r.data.tags["forge.phase"] for r in children) == ["bitnet", "cognate", "data", "evomerge", "training"]
    for child in children:
        if child.data.tags["forge.phase"] == "evomerge":  # a sub-flow (its candidates are the tasks)
            assert child.data.tags["prefect.flow_run_id"] != first.flow_run_id
        else:
            assert child.data.tags["prefect.task_run_id"]
            assert child.data.tags["prefect.flow_run_id"] == first.flow_run_id
        assert child.info.status == "FINISHED"
    cog_run = next(r for r in children if r.data.tags["forge.phase"] == "cognate")
    assert cog_run.data.params["trunk.steps"] == "120"
    assert len(client.get_metric_history(cog_run.info.run_id, "trunk/loss")) >= 100
    artifacts = {a.path for a in client.list_artifacts(cog_run.info.run_id)}
    assert {"report.md", "loss_curve.png"} <= artifacts
    # EvoMerge: per-generation best / mean / diversity, lineage and population tables, the fitness plot
    evo = first.phase("evomerge")
    evo_run = next(r for r in children if r.data.tags["forge.phase"] == "evomerge")
    best = [m.value for m in client.get_metric_history(evo_run.info.run_id, "generation/best")]
    assert len(best) == evo.metrics["generations"] and best == sorted(best)
    assert len(client.get_metric_history(evo_run.info.run_id, "generation/diversity")) == len(best)
    assert {"lineage.json", "population.json", "comparison.json", "fitness.png", "report.md"} <= {
        a.path for a in client.list_artifacts(evo_run.info.run_id)}
    evo_prefix = evo.artifact.uri.removeprefix(f"s3://{bucket}/")
    assert {f"{evo_prefix}/merged/model.safetensors.index.json", f"{evo_prefix}/recipe.yaml", f"{evo_prefix}/search.json"} <= set(keys)
    # losers were deleted from the store; what is left is at most the final population plus the winner's lineage
    search = json.loads(boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=bucket, Key=f"{evo_prefix}/search.json")["Body"].read())
    kept = {k.split("/")[3] for k in keys if k.startswith("forge/evomerge-candidates/") and k.endswith("/manifest.json")}
    allowed = {c["key"] for c in search["population"]} | {c["key"] for c in search["lineage"]}
    assert search["winner"] and kept <= allowed and evo.metrics["evaluations"] > len(kept)
    # training on the ternary model: stored packed again, with its latent weights
    train = first.phase("training")
    train_prefix = train.artifact.uri.removeprefix(f"s3://{bucket}/")
    assert {f"{train_prefix}/model/bitnet.json", f"{train_prefix}/model/latent/model.safetensors"} <= set(keys)
    assert train.metrics["lambda"] == 1.0 and train.metrics["dream/cycles"] >= 1

    # the same config again: every step is a cache hit and no training step runs
    second = agent_forge(cfg)
    assert all(p.cached for p in second.phases)
    assert all(p.steps_run == 0 for p in second.phases)
    assert second.phase("cognate").artifact.digest == cognate.artifact.digest

    # one phase's config changed: that phase recomputes, the one before it does not
    changed = load_config(
        "tiny", overrides=tiny_overrides(**{"cognate.trunk.lr": "0.002"}) + [f"name={cfg.name}", f"tracking.uri={mlflow_uri}"],
        store=cfg.store.url,
    )
    third = agent_forge(changed)
    assert third.phase("data").cached
    assert not third.phase("cognate").cached
    assert not third.phase("bitnet").cached, "phases after a changed one recompute too"
    assert third.phase("cognate").artifact.uri != cognate.artifact.uri


def test_transient_storage_error_is_retried(bucket, s3_server, mlflow_uri, monkeypatch):
    from tasks import store as store_mod

    calls = {"n": 0}
    real = store_mod.Store.put_file

    def flaky(self, local, uri):
        if "/cognate/" in uri and "/checkpoints/" not in uri and calls["n"] == 0:
            calls["n"] += 1
            raise ConnectionResetError("connection reset by peer (injected)")
        return real(self, local, uri)

    monkeypatch.setattr(store_mod.Store, "put_file", flaky)
    result = agent_forge(_config(bucket, mlflow_uri))
    assert calls["n"] == 1, "the fault was injected once"
    cognate = result.phase("cognate")
    assert cognate.status == "completed"
    # the retry found the checkpoints of the failed attempt and did not retrain from scratch
    assert cognate.steps_run == 0


def test_non_transient_error_is_not_retried(bucket, mlflow_uri, monkeypatch):
    from forge_models import cognate as cognate_mod

    attempts = {"n": 0}

    def diverge(*args, **kwargs):
        attempts["n"] += 1
        from forge_models.runtime import TrainingDiverged

        raise TrainingDiverged("loss became nan at step 3 (injected)")

    monkeypatch.setattr(cognate_mod, "run", diverge)
    with pytest.raises(ForgeError, match="injected"):
        agent_forge(_config(bucket, mlflow_uri))
    assert attempts["n"] == 1


def test_corrupted_artifact_stops_next_phase(bucket, s3_server, mlflow_uri):
    cfg = _config(bucket, mlflow_uri, "phases=[cognate]")
    first = agent_forge(cfg)
    data_uri = first.phase("data").artifact.uri
    key = data_uri.removeprefix(f"s3://{bucket}/") + "/corpus/validation.jsonl"
    client = boto3.client("s3", endpoint_url=s3_server)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[10] = (body[10] + 1) % 128  # same size, different content
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    changed = load_config(
        "tiny", overrides=tiny_overrides(**{"cognate.trunk.lr": "0.0025"}) + [f"name={cfg.name}", f"tracking.uri={mlflow_uri}"],
        store=cfg.store.url,
    )
    with pytest.raises(ArtifactIntegrityError, match=r"corpus/validation.jsonl does not match its sha256"):
        agent_forge(changed)


def test_interrupted_training_resumes_from_store_checkpoint(bucket, s3_server, mlflow_uri, monkeypatch):
    from forge_models.runtime import ForgeError as _FE
    from tasks import runtime as rt

    class Preempted(_FE):
        pass

    real = rt.TaskTracker.log_metrics

    def preempt(self, metrics, step=None):
        if step is not None and step >= 100 and any(k.startswith("trunk/") for k in metrics):
            raise Preempted("worker preempted at step 100 (injected)")
        return real(self, metrics, step)

    cfg = _config(bucket, mlflow_uri)
    monkeypatch.setattr(rt.TaskTracker, "log_metrics", preempt)
    with pytest.raises(Preempted):
        agent_forge(cfg)
    keys = _keys(bucket, s3_server)
    ckpts = [k for k in keys if k.startswith("forge/checkpoints/cognate/") and k.endswith("COMPLETE")]
    assert ckpts, "a complete checkpoint was mirrored to the store before the interruption"
    monkeypatch.setattr(rt.TaskTracker, "log_metrics", real)
    resumed = agent_forge(cfg)
    cognate = resumed.phase("cognate")
    # trunk resumed at step 80 (checkpoint_every=40): 40 trunk steps + 2 x 30 variant steps
    assert cognate.steps_run == 40 + 30 + 30


def test_real_corpus_source_on_s3_is_mixed_in(bucket, s3_server, tmp_path):
    import boto3

    from forge_models.data import build_corpus
    from tasks.data import _materialize_sources

    lines = "\n".join(json.dumps({"body": f"Document number {i} talks about rivers and stones."}) for i in range(300))
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key="corpora/docs.jsonl", Body=lines.encode())
    cfg = load_config("tiny", overrides=[
        f"data.sources=[{{path: 's3://{bucket}/corpora/docs.jsonl', text_field: body}}]",
        "data.synthetic.n_examples=500",
    ])
    paths = _materialize_sources(cfg, tmp_path)
    corpus = build_corpus(cfg.data, paths)
    texts = [ex for split in ("train", "validation", "test") for ex in corpus.split(split) if ex.kind == "text"]
    assert len(texts) == 300
    assert all("rivers and stones" in ex.text for ex in texts)
    missing = load_config("tiny", overrides=[f"data.sources=[{{path: 's3://{bucket}/corpora/nope.jsonl'}}]"])
    with pytest.raises(ForgeError, match="nope.jsonl does not exist"):
        _materialize_sources(missing, tmp_path)


def test_concurrent_runs_on_s3_write_the_output_once(bucket):
    from tests.factories import racing_runs

    calls, results, errors = racing_runs(f"s3://{bucket}/forge", n=2)
    assert errors == [] and len(calls) == 1
    assert sorted(r.executed for r in results) == [False, True]
    assert results[0].ref.digest == results[1].ref.digest
