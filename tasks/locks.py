"""One writer per output: a create-only lock object in the store, with a heartbeat and a time-to-live.

Two flow runs that reach the same phase with the same inputs at the same time (on one host or on many
GPU workers sharing an S3 bucket) must not both compute and write ``<phase>/<key>/``. The first to create
``locks/<phase>/<key>.json`` owns the output; the others wait until its manifest appears and reuse it.

Creation is atomic where the store offers it: ``open(..., "xb")`` on a local or network filesystem, and
S3's conditional ``PutObject`` with ``If-None-Match: *`` (s3fs ``mode="create"``; AWS and moto honour it,
other S3-compatible servers vary — see the README). A lock whose heartbeat is older than its TTL belongs
to a dead run and is broken, so a preempted worker never blocks the key forever; the owner refreshes the
heartbeat at every checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Callable

from tasks.store import Store

log = logging.getLogger("agent_forge")


class LockTimeout(Exception):
    """Waited longer than allowed for another run to finish the same output."""


class StoreLock:
    def __init__(self, store: Store, name: str, ttl_s: float = 1800.0, poll_s: float = 1.0):
        self.store = store
        self.uri = store.uri("locks", f"{name}.json")
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False

    def _payload(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time(), "ttl_s": self.ttl_s}).encode()

    def _try_create(self) -> bool:
        path = self.store._path(self.uri)
        try:
            if self.store.protocol == "file":
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "xb") as f:
                    f.write(self._payload())
            else:
                self.store._call(f"lock {self.uri}", self.store.fs.pipe_file, path, self._payload(), mode="create")
            return True
        except FileExistsError:
            return False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:
            # Created but not yet written (or torn by a crash): its age is the object's own timestamp.
            try:
                modified = self.store.fs.modified(self.store._path(self.uri)).timestamp()
            except Exception:  # noqa: BLE001 - vanished meanwhile
                return None
            return {"owner": "?", "heartbeat": modified}

    def acquire(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Take the lock (True), or return False once ``done()`` says another run committed the output."""
        start = time.monotonic()
        waited_for = None
        while True:
            if self._try_create():
                self.held = True
                return True
            if done():
                return False
            info = self._read()
            if info is not None and time.time() - float(info.get("heartbeat", 0)) > float(info.get("ttl_s", self.ttl_s)):
                log.warning("breaking stale lock %s held by %s", self.uri, info.get("owner"))
                self.store.delete(self.uri)
                continue
            if info is not None and info.get("owner") != waited_for:
                waited_for = info.get("owner")
                log.info("waiting for %s (another run is computing the same output)", waited_for)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise LockTimeout(f"waited {timeout_s:.0f} s for {self.uri} held by {waited_for}")
            time.sleep(self.poll_s)

    def refresh(self) -> None:
        if self.held:
            self.store.write_bytes(self.uri, self._payload())

    def release(self) -> None:
        if not self.held:
            return
        info = self._read()
        if info is not None and info.get("owner") == self.owner:
            self.store.delete(self.uri)
        self.held = False
