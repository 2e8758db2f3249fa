"""A flaky S3 (connections dropped, responses lost, 500/503, slow answers) between the pipeline and moto:
store round trips and a two-phase run with a checkpointing phase complete through retries, the outputs are
bit-identical to a run without faults, and no partial artifact is ever trusted. The faults injected are printed.
"""

from __future__ import annotations

import json
import os

import pytest

from forge_models.runtime import ArtifactIntegrityError
from tasks.store import Store, is_transient
from tests.faults import child
from tests.faults.flaky_s3 import FlakyS3Proxy

pytestmark = pytest.mark.fault


def with_retries(fn, attempts: int = 4):
    """What the Prefect tasks do (`retry_transient`): retry transient storage errors only."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if not is_transient(exc) or i == attempts - 1:
                raise


@pytest.fixture
def flaky(s3_server, bucket, monkeypatch):
    with FlakyS3Proxy(s3_server, rate=0.2, seed=int(os.environ.get("FORGE_FLAKY_SEED", "7"))) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy, bucket
        print(f"\nflaky S3: {proxy.injected} faults injected in {proxy.requests} requests: {dict(proxy.counts)}")


def test_store_round_trips_through_a_flaky_s3(flaky, tmp_path, fault_row):
    proxy, bucket = flaky
    store = Store(f"s3://{bucket}/rt")
    ok = refused = 0
    for i in range(6):
        src = tmp_path / f"src{i}"
        (src / "sub").mkdir(parents=True)
        files = {f"sub/f{j}.bin": os.urandom(20_000 + 997 * j) for j in range(3)}
        for rel, data in files.items():
            (src / rel).write_bytes(data)
        uri = store.uri("p", str(i))
        try:
            with_retries(lambda: store.write_prefix(src, uri, "model"))
        except Exception as exc:  # noqa: BLE001 - retries exhausted: the prefix must not be trusted
            refused += 1
            with pytest.raises(ArtifactIntegrityError):
                with_retries(lambda: store.verify(uri))
            continue
        with_retries(lambda: store.verify(uri))
        dest = tmp_path / f"dl{i}"
        with_retries(lambda: store.download(uri, dest))
        assert {rel: (dest / rel).read_bytes() for rel in files} == files
        ok += 1
    assert ok >= 5 and proxy.injected >= 5, (ok, dict(proxy.counts))
    fault_row(
        fault="flaky S3: store round trips",
        injected=f"proxy before moto; 20% of {proxy.requests} requests faulted: {dict(proxy.counts)}",
        did=f"{ok}/6 prefixes written, verified and downloaded byte-identical through retries; {refused} gave up "
            "and were refused by verify (no manifest)",
    )


@pytest.mark.slow
def test_a_run_completes_through_a_flaky_s3_bit_identical(flaky, s3_server, tmp_path, monkeypatch, fault_row):
    proxy, bucket = flaky
    url = f"s3://{bucket}/store"
    with_retries(lambda: child.main([url, str(tmp_path / "a.json"), "--steps", "12", "--every", "4"]))
    got = json.loads((tmp_path / "a.json").read_text())
    assert got["train"]["resumed_from"] in ([], ["train/step-000004"], ["train/step-000008"])
    with_retries(lambda: child.main([url, str(tmp_path / "b.json"), "--steps", "12", "--every", "4"]))
    again = json.loads((tmp_path / "b.json").read_text())
    assert not again["prep"]["executed"] and not again["train"]["executed"]
    faults = dict(proxy.counts)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)  # the reference: the same run on a healthy S3
    child.main([f"s3://{bucket}/reference", str(tmp_path / "ref.json"), "--steps", "12", "--every", "4"])
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert got["train"]["sha256"] == {**ref["train"]["sha256"], "phase.json": got["train"]["sha256"]["phase.json"]}
    Store(url).verify(got["train"]["uri"])
    assert not Store(url).exists(Store(url).uri("locks", "train", "t" * 64 + ".json"))
    assert proxy.injected >= 5
    fault_row(
        fault="flaky S3: a run with checkpoints",
        injected=f"the same proxy (20%) for a two-phase run (checkpoints, lock heartbeats, manifests): {faults}",
        did="both phases committed through retries; weights and report bit-identical to a run on a healthy S3; "
            "the rerun reused both outputs; lock released",
    )


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_the_tiny_pipeline_completes_through_a_flaky_s3(flaky, tmp_path, fault_row):
    """The real flow (data, cognate, evomerge, bitnet, training on the reduced tiny preset) with every S3 request
    of the store and of Prefect's results going through the proxy: it completes through retries, every committed
    output verifies against its manifest, nothing partial is left (no lock, no checkpoint), and a rerun through
    the same flaky S3 reuses every output without running a step."""
    import uuid

    from flows.agent_forge import agent_forge
    from flows.config import load_config
    from tests.factories import tiny_overrides

    proxy, bucket = flaky
    cfg = load_config("tiny", store=f"s3://{bucket}/forge", overrides=tiny_overrides() + [
        f"name=flaky-{uuid.uuid4().hex[:8]}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    first = agent_forge(cfg)
    assert [p.name for p in first.phases] == ["data", "cognate", "evomerge", "bitnet", "training"]
    assert not any(p.cached for p in first.phases)
    faults_first, requests_first = dict(proxy.counts), proxy.requests
    assert proxy.injected >= 5, faults_first  # the run really met faults
    store = Store(cfg.store.url)
    for p in first.phases:  # deep: every file's sha256 against the manifest, written last
        with_retries(lambda: store.verify(p.artifact.uri, expected_digest=p.artifact.digest))
    left = with_retries(lambda: store.list_files(cfg.store.url))
    assert not [k for k in left if k.split("/")[0] in ("locks", "checkpoints")], "a lock or a checkpoint was left behind"

    second = agent_forge(cfg)
    assert all(p.cached for p in second.phases) and all(p.steps_run == 0 for p in second.phases)
    assert [p.artifact.digest for p in second.phases] == [p.artifact.digest for p in first.phases]
    fault_row(
        fault="flaky S3: the tiny pipeline",
        injected=f"the same proxy (20%) for every S3 request of a reduced tiny run (5 phases, Prefect results, "
                 f"locks): {faults_first} in {requests_first} requests",
        did="all five phases committed through retries; every output verified file by file against its manifest; "
            "no lock or checkpoint left; the rerun through the same proxy reused every output without a step",
    )
