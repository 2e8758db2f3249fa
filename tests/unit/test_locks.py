"""Concurrency: two runs of the same phase with the same key compute it once; a stale lock is broken."""

import json
import time

import pytest

from forge_models.runtime import ArtifactIntegrityError
from tasks.locks import LockTimeout, StoreLock
from tasks.store import Store
from tests.factories import racing_runs


def test_two_concurrent_runs_write_the_output_once(tmp_path):
    url = f"file://{tmp_path}/store"
    calls, results, errors = racing_runs(url, n=3)
    assert errors == []
    assert len(calls) == 1, "the phase body ran once"
    assert sorted(r.executed for r in results) == [False, False, True]
    assert len({r.ref.digest for r in results}) == 1
    store = Store(url)
    store.verify(results[0].ref.uri)
    assert not store.exists(store.uri("locks", "demo", "k" * 64 + ".json")), "the lock is released"


def test_stale_lock_is_broken_and_live_lock_waits(tmp_path):
    store = Store(f"file://{tmp_path}/store")
    dead = StoreLock(store, "p/key", ttl_s=0.5)
    assert dead.acquire(done=lambda: False)
    # a second run waits while the lock is fresh...
    live = StoreLock(store, "p/key", ttl_s=0.5, poll_s=0.05)
    dead.refresh()
    with pytest.raises(LockTimeout):
        live.acquire(done=lambda: False, timeout_s=0.2)
    # ...and takes it over once the owner stopped refreshing for longer than the TTL
    time.sleep(0.6)
    assert live.acquire(done=lambda: False, timeout_s=5)
    assert json.loads(store.read_bytes(live.uri))["owner"] == live.owner
    dead.release()  # a dead owner's late release must not delete the new owner's lock
    assert store.exists(live.uri)
    live.release()
    assert not store.exists(live.uri)


def test_manifest_is_create_only(tmp_path):
    store = Store(f"file://{tmp_path}/store")
    uri = store.uri("x", "m.json")
    store.create_bytes(uri, b"1")
    with pytest.raises(ArtifactIntegrityError, match="another writer committed"):
        store.create_bytes(uri, b"2")
    assert store.read_bytes(uri) == b"1"
