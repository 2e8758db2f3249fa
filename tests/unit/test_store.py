"""Manifest write/verify and tamper detection on the local store (the same code serves s3://)."""

import json
from pathlib import Path

import pytest

from forge_models.runtime import ArtifactIntegrityError
from tasks.store import Store, TransientStorageError, is_transient, normalise_url


def _make_output(folder: Path) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"\x00" * 1000 + b"weights")
    (folder / "model" / "config.json").write_text('{"a": 1}')
    (folder / "phase.json").write_text('{"metrics": {"loss": 1.5}}')
    return folder


@pytest.fixture
def store(tmp_path):
    return Store(f"file://{tmp_path}/store")


def test_write_then_verify_and_manifest_is_last(store, tmp_path):
    src = _make_output(tmp_path / "out")
    uri = store.uri("cognate", "abc")
    digest = store.write_prefix(src, uri, kind="model-set")
    manifest = store.verify(uri, expected_digest=digest)
    assert set(manifest["files"]) == {"model/model.safetensors", "model/config.json", "phase.json"}
    assert manifest["files"]["model/model.safetensors"]["size"] == 1007
    # the manifest is the newest object: written after every file it lists
    root = Path(store.root) / "cognate" / "abc"
    mtime = (root / "manifest.json").stat().st_mtime_ns
    assert all((root / rel).stat().st_mtime_ns <= mtime for rel in manifest["files"])


def test_missing_manifest_is_incomplete(store, tmp_path):
    src = _make_output(tmp_path / "out")
    uri = store.uri("cognate", "abc")
    store.write_prefix(src, uri, kind="model-set")
    (Path(store.root) / "cognate" / "abc" / "manifest.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match="manifest.json is missing"):
        store.verify(uri)


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda r: (r / "model" / "model.safetensors").write_bytes(b"\x01" * 1000 + b"weights"), "model/model.safetensors does not match its sha256"),
        (lambda r: (r / "model" / "config.json").write_text('{"a": 12}'), "model/config.json has 9 bytes"),
        (lambda r: (r / "model" / "config.json").unlink(), "model/config.json is listed in the manifest but missing"),
        (lambda r: (r / "model" / "evil.pkl").write_bytes(b"x"), "'model/evil.pkl' is not in the manifest"),
    ],
)
def test_tampering_is_detected_naming_the_file(store, tmp_path, tamper, match):
    src = _make_output(tmp_path / "out")
    uri = store.uri("cognate", "abc")
    store.write_prefix(src, uri, kind="model-set")
    tamper(Path(store.root) / "cognate" / "abc")
    with pytest.raises(ArtifactIntegrityError, match=match):
        store.verify(uri)
    with pytest.raises(ArtifactIntegrityError):
        store.download(uri, tmp_path / "dl")


def test_download_round_trip_and_digest_pinning(store, tmp_path):
    src = _make_output(tmp_path / "out")
    uri = store.uri("data", "k1")
    digest = store.write_prefix(src, uri, kind="dataset")
    store.download(uri, tmp_path / "dl", expected_digest=digest)
    assert (tmp_path / "dl" / "model" / "model.safetensors").read_bytes() == (src / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ArtifactIntegrityError, match="replaced after it was referenced"):
        store.verify(uri, expected_digest="0" * 64)


def test_committed_outputs_are_immutable(store, tmp_path):
    src = _make_output(tmp_path / "out")
    uri = store.uri("data", "k1")
    store.write_prefix(src, uri, kind="dataset")
    with pytest.raises(ArtifactIntegrityError, match="immutable"):
        store.write_prefix(src, uri, kind="dataset")


def test_interrupted_write_leftovers_are_replaced(store, tmp_path):
    uri = store.uri("data", "k2")
    store.write_bytes(store.uri_join(uri, "stale.bin"), b"half-written")
    src = _make_output(tmp_path / "out")
    store.write_prefix(src, uri, kind="dataset")
    assert "stale.bin" not in store.verify(uri)["files"]


def test_empty_output_refused(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactIntegrityError, match="empty output"):
        store.write_prefix(tmp_path / "empty", store.uri("x", "y"), kind="dataset")


def test_uri_outside_store_refused(store):
    with pytest.raises(ArtifactIntegrityError, match="not inside the store"):
        store.exists("file:///somewhere/else")


def test_url_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalise_url("file://./forge-store/") == f"file://{tmp_path}/forge-store"
    assert normalise_url("s3://bucket/prefix/") == "s3://bucket/prefix"
    with pytest.raises(ValueError, match="unsupported store URL"):
        Store("ftp://host/x")


def test_transient_classification():
    assert is_transient(ConnectionResetError("reset"))
    assert is_transient(TransientStorageError("x"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = TimeoutError("slow")
    assert is_transient(wrapped)
    assert not is_transient(ValueError("bad config"))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(ArtifactIntegrityError("tampered"))


def test_prefect_result_storage_follows_the_current_s3_endpoint(monkeypatch):
    """Prefect results go to the endpoint in the environment when the run starts, on a fresh s3fs client: a
    cached client kept an earlier run's endpoint (a stopped server) and a later run's results hung on it."""
    from flows.agent_forge import result_storage_block

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    first = result_storage_block("s3://bucket/forge").filesystem
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    second = result_storage_block("s3://bucket/forge").filesystem
    assert first is not second
    assert first.client_kwargs["endpoint_url"] == "http://127.0.0.1:1"
    assert second.client_kwargs["endpoint_url"] == "http://127.0.0.1:2"
    assert str(result_storage_block("file:///tmp/x").basepath).endswith("/tmp/x/prefect-results")
