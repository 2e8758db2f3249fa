"""Concurrency: two runs of the same phase with the same key compute it once; a stale lock is broken,
a live one (heartbeat) is not, and refresh/break are conditional on a local store and on S3 (moto)."""

import json
import os
import socket
import subprocess
import time

import pytest

from forge_models.runtime import ArtifactIntegrityError
from tasks.locks import LockLost, LockTimeout, StoreLock, owner_alive
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
    dead = StoreLock(store, "p/key", ttl_s=0.5, heartbeat_s=60)  # its heartbeat never fires: a stalled owner
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


@pytest.fixture(params=["file", "s3"])
def any_store(request, tmp_path):
    if request.param == "file":
        return Store(f"file://{tmp_path}/store")
    bucket = request.getfixturevalue("bucket")
    return Store(f"s3://{bucket}/root")


def test_heartbeat_keeps_a_lock_alive_past_its_ttl(any_store):
    owner = StoreLock(any_store, "p/hb", ttl_s=0.6, heartbeat_s=0.1)
    assert owner.acquire(done=lambda: False)
    try:
        waiter = StoreLock(any_store, "p/hb", ttl_s=0.6, poll_s=0.05)
        with pytest.raises(LockTimeout):  # 3 TTLs pass; the owner's thread refreshed it all along
            waiter.acquire(done=lambda: False, timeout_s=1.8)
        assert owner.beats >= 5 and not owner.lost
    finally:
        owner.release()
    assert not any_store.exists(owner.uri)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(any_store):
    uri = any_store.uri("locks", "p/dead.json")
    pid = _dead_pid()
    info = {"owner": f"{socket.gethostname()}:{pid}:x", "host": socket.gethostname(), "pid": pid,
            "start": "1", "heartbeat": time.time(), "ttl_s": 1800.0, "beat": 0}
    assert owner_alive(info) is False
    assert owner_alive({**info, "pid": os.getpid(), "start": None}) is True
    assert owner_alive({**info, "host": "another-host"}) is None  # cannot tell: the TTL decides
    any_store.write_bytes(uri, json.dumps(info).encode())
    lock = StoreLock(any_store, "p/dead", poll_s=0.05)
    t0 = time.monotonic()
    assert lock.acquire(done=lambda: False, timeout_s=10)
    assert time.monotonic() - t0 < 5, "a 30-minute TTL did not make the rerun wait"
    assert json.loads(any_store.read_bytes(uri))["owner"] == lock.owner
    lock.release()


def test_refresh_and_break_are_conditional(any_store):
    a = StoreLock(any_store, "p/cas", ttl_s=0.3, heartbeat_s=60)
    assert a.acquire(done=lambda: False)
    time.sleep(0.4 + 0.0)
    # two waiters judge the same stale lock; only the first break succeeds
    w1, w2 = StoreLock(any_store, "p/cas", ttl_s=60), StoreLock(any_store, "p/cas", ttl_s=60)
    seen1, seen2 = w1._read(), w2._read()
    assert seen1[1] == seen2[1]
    assert w1._break(seen1[1]) is True
    assert w1._create()
    w1.held = True
    mine = any_store.read_bytes(w1.uri)
    assert w2._break(seen2[1]) is False, "a second breaker removed the new owner's lock"
    assert any_store.read_bytes(w1.uri) == mine
    # the stalled first owner wakes up: its refresh must not overwrite the new owner's lock
    a.refresh()
    assert a.lost and any_store.read_bytes(w1.uri) == mine
    with pytest.raises(LockLost):
        a.ensure_held()
    a.release()  # and its release must not delete it either
    assert any_store.read_bytes(w1.uri) == mine
    w1.refresh()
    assert not w1.lost and json.loads(any_store.read_bytes(w1.uri))["beat"] == 1
    w1.release()
    assert not any_store.exists(w1.uri)


def test_a_torn_local_lock_ages_by_its_mtime(tmp_path):
    store = Store(f"file://{tmp_path}/store")
    uri = store.uri("locks", "p/torn.json")
    store.write_bytes(uri, b"{\"owner\": ")  # a crash mid-write of the old scheme
    old = time.time() - 3600
    os.utime(store._path(uri), (old, old))
    lock = StoreLock(store, "p/torn", ttl_s=60, poll_s=0.05)
    assert lock.acquire(done=lambda: False, timeout_s=5)
    lock.release()
