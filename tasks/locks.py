"""One writer per output: a create-only lock object in the store, kept alive by a heartbeat thread.

Two flow runs that reach the same phase with the same inputs at the same time (on one host or on many
GPU workers sharing an S3 bucket) must not both compute and write ``<phase>/<key>/``. The first to create
``locks/<phase>/<key>.json`` owns the output; the others wait until its manifest appears and reuse it.

Every step is conditional, so an owner never overwrites another run's lock and two waiters never both
break the same stale lock:

- **create**: local ``os.link`` of a fully written private file to the lock name (fails if the name exists;
  the lock is never seen half-written); S3 ``PutObject`` with ``If-None-Match: *``.
- **refresh** (a daemon thread every ``ttl_s / 6`` seconds, and at checkpoints): local, rewrite the file
  through the descriptor the owner created it with, only after checking the name still points at that
  inode (so the write can only ever land in the owner's own file); S3, ``PutObject`` with
  ``If-Match: <the ETag of our last write>``. A failed condition means the lock was broken: the owner
  marks itself ``lost`` and :meth:`StoreLock.ensure_held` raises :class:`LockLost` before it publishes.
- **break** a stale lock: local, ``rename`` it to a private tombstone (atomic: one breaker wins), then
  delete the tombstone only if it is the very inode and bytes that were judged stale, else link it back;
  S3, ``DeleteObject`` with ``If-Match: <the ETag judged stale>``. AWS and moto honour both conditions;
  S3-compatible servers vary (see docs/faults.md).

A lock is stale, and broken, when
1. its owner ran on this host and that process is gone (``kill(pid, 0)`` fails, the pid is a zombie, or
   was reused by a process with another start time): at once, so a rerun after a crash resumes at once;
2. or its heartbeat is older than its TTL plus a clock-skew allowance (the owner's wall clock);
3. or this waiter has seen the same lock bytes (local) / ETag (S3) for longer than the TTL on its own
   monotonic clock (immune to clock skew between hosts).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from tasks.store import Store, TransientStorageError

log = logging.getLogger("agent_forge")

LOCK_TTL_S = float(os.environ.get("FORGE_LOCK_TTL_S", "60"))
"""Default lifetime of a lock without a heartbeat (seconds); the heartbeat refreshes it 6 times per TTL."""
CLOCK_SKEW_S = 30.0
"""Allowance for wall-clock differences between hosts when judging another host's heartbeat by its time."""


class LockTimeout(Exception):
    """Waited longer than allowed for another run to finish the same output."""


class LockLost(TransientStorageError):
    """Our lock was broken by another run (we stalled longer than the TTL): do not publish.

    Transient on purpose: a retry of the task waits for (or reuses) the other run's output.
    """


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a local process from /proc, or None where /proc cannot tell."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and ')'
    return fields[0], fields[19]


def owner_alive(info: dict[str, Any]) -> bool | None:
    """False when the lock's owner ran on this host and its process is gone; None when this host cannot tell."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    pid = info["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a live process of another user
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state == "Z":  # killed, not yet reaped by its parent
            return False
        if info.get("start") is not None and start != info["start"]:
            return False  # the pid was reused by another process
    return True


def _precondition_failed(exc: BaseException) -> bool:
    """True when S3 refused a conditional request (412 PreconditionFailed / 409 ConditionalRequestConflict)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = getattr(cur, "response", {}).get("Error", {}).get("Code") if hasattr(cur, "response") else None
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
        if "pre-condition" in str(cur) or "precondition" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class StoreLock:
    def __init__(self, store: Store, name: str, ttl_s: float | None = None, poll_s: float = 1.0,
                 heartbeat_s: float | None = None):
        self.store = store
        self.uri = store.uri("locks", f"{name}.json")
        self.path = store._path(self.uri)
        self.ttl_s = float(ttl_s if ttl_s is not None else LOCK_TTL_S)
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else self.ttl_s / 6)
        self.poll_s = poll_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        stat = _proc_stat(self.pid)
        self.start = stat[1] if stat else None
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.lost = False
        self.beats = 0
        self._fd: int | None = None  # local: the descriptor of our own lock file
        self._ident: tuple[int, int] | None = None  # local: (st_dev, st_ino) of our lock file
        self._etag: str | None = None  # S3: ETag of our last write
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "host": self.host, "pid": self.pid, "start": self.start,
            "heartbeat": time.time(), "ttl_s": self.ttl_s, "beat": self.beats,
        }).encode()

    # ------------------------------------------------------------------ store primitives (local | S3)

    def _s3(self, what: str, method: str, **kwargs):
        bucket, key = self.store.fs.split_path(self.path)[:2]
        return self.store._call(f"{what} {self.uri}", self.store.fs.call_s3, method, Bucket=bucket, Key=key, **kwargs)

    def _create(self) -> bool:
        if self.store.protocol == "file":
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, self._payload())
                os.fsync(fd)
                try:
                    os.link(tmp, self.path)  # atomic, create-only, and the lock is complete when it appears
                except FileExistsError:
                    os.close(fd)
                    return False
            finally:
                os.unlink(tmp)
            st = os.fstat(fd)
            self._fd, self._ident = fd, (st.st_dev, st.st_ino)
            return True
        try:
            self._etag = self._s3("lock", "put_object", Body=self._payload(), IfNoneMatch="*")["ETag"]
            return True
        except FileExistsError:
            pass
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
        # A retried create whose first attempt landed (the response was lost) finds our own lock: adopt it.
        seen = self._read()
        if seen is not None and seen[0].get("owner") == self.owner:
            self._etag = seen[1]
            return True
        return False

    def _read(self) -> tuple[dict[str, Any], Any] | None:
        """The lock's content and a token that changes with every write (None: no lock)."""
        if self.store.protocol == "file":
            try:
                with open(self.path, "rb") as f:
                    data, st = f.read(), os.fstat(f.fileno())
            except FileNotFoundError:
                return None
            token: Any = (st.st_dev, st.st_ino, data)
            modified = st.st_mtime
        else:
            from fsspec.asyn import sync

            bucket, key = self.store.fs.split_path(self.path)[:2]

            async def get():
                r = await self.store.fs._call_s3("get_object", Bucket=bucket, Key=key)
                body = r["Body"]
                try:
                    return await body.read(), r["ETag"], r["LastModified"].timestamp()
                finally:
                    body.close()

            try:
                data, token, modified = self.store._call(f"read {self.uri}", sync, self.store.fs.loop, get)
            except FileNotFoundError:
                return None
        try:
            info = json.loads(data)
            assert isinstance(info, dict)
        except (ValueError, AssertionError):
            info = {"owner": "?", "heartbeat": modified}  # torn by an in-place rewrite: its age is the file's
        return info, token

    def _break(self, token: Any) -> bool:
        """Remove the lock only if it is still exactly what was judged stale; True if removed."""
        if self.store.protocol == "file":
            tomb = f"{self.path}.broken-{uuid.uuid4().hex}"
            try:
                os.rename(self.path, tomb)  # atomic: of several breakers only one moves a given file
            except FileNotFoundError:
                return False
            try:
                with open(tomb, "rb") as f:
                    data, st = f.read(), os.fstat(f.fileno())
                if (st.st_dev, st.st_ino, data) == token:
                    return True
                # We moved a lock that changed since we judged it (refreshed, or a new owner's): put it back.
                try:
                    os.link(tomb, self.path)
                except FileExistsError:
                    log.warning("lock %s: a newer lock was moved aside and another run took its place", self.uri)
                return False
            finally:
                os.unlink(tomb)
        try:
            self._s3("break lock", "delete_object", IfMatch=token)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise

    # ------------------------------------------------------------------ the protocol

    def _stale(self, info: dict[str, Any], unchanged_s: float) -> str | None:
        ttl = float(info.get("ttl_s", self.ttl_s))
        if owner_alive(info) is False:
            return f"its process {info.get('pid')} on this host is gone"
        age = time.time() - float(info.get("heartbeat", 0))
        if age > ttl + CLOCK_SKEW_S:
            return f"its heartbeat is {age:.0f} s old (TTL {ttl:.0f} s)"
        if unchanged_s > ttl:
            return f"it has not changed for {unchanged_s:.0f} s (TTL {ttl:.0f} s)"
        return None

    def acquire(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Take the lock (True), or return False once ``done()`` says another run committed the output."""
        start = time.monotonic()
        waited_for, last_token, since = None, None, time.monotonic()
        while True:
            if self._create():
                self.held, self.lost = True, False
                self._start_heartbeat()
                return True
            if done():
                return False
            seen = self._read()
            if seen is None:
                continue  # released or broken meanwhile: try to create again at once
            info, token = seen
            if token != last_token:
                last_token, since = token, time.monotonic()
            why = self._stale(info, time.monotonic() - since)
            if why is not None:
                if self._break(token):
                    log.warning("broke the lock %s held by %s: %s", self.uri, info.get("owner"), why)
                else:
                    time.sleep(min(self.poll_s, 0.05))  # another waiter moved it first; look again
                continue
            if info.get("owner") != waited_for:
                waited_for = info.get("owner")
                log.info("waiting for %s (another run is computing the same output)", waited_for)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise LockTimeout(f"waited {timeout_s:.0f} s for {self.uri} held by {waited_for}")
            time.sleep(self.poll_s)

    def refresh(self) -> None:
        """Renew the heartbeat, only if the lock is still ours; marks the lock ``lost`` otherwise."""
        with self._io:
            if not self.held or self.lost:
                return
            self.beats += 1
            payload = self._payload()
            if self.store.protocol == "file":
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    st = None
                if st is None or (st.st_dev, st.st_ino) != self._ident:
                    self._mark_lost()
                    return
                os.pwrite(self._fd, payload, 0)  # our own inode, whatever the name points at by now
                os.ftruncate(self._fd, len(payload))
                return
            try:
                self._etag = self._s3("refresh lock", "put_object", Body=payload, IfMatch=self._etag)["ETag"]
                return
            except FileNotFoundError:
                pass
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise
            # A retried refresh whose first attempt landed (the response was lost) finds our own new beat.
            seen = self._read()
            if seen is not None and seen[0].get("owner") == self.owner and seen[0].get("beat") == self.beats:
                self._etag = seen[1]
                return
            self._mark_lost()

    def _mark_lost(self) -> None:
        self.lost = True
        log.error("lost the lock %s: another run broke it (this run stalled past the %.0f s TTL)", self.uri, self.ttl_s)

    def ensure_held(self) -> None:
        """Raise :class:`LockLost` unless the lock is still ours (checked against the store now)."""
        self.refresh()
        if not self.held or self.lost:
            raise LockLost(f"{self.uri}: this run no longer holds the output lock; another run is writing it")

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the TTL allows five
                    log.warning("lock heartbeat for %s failed: %s", self.uri, exc)
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat-{self.owner}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._io:
            if not self.held:
                return
            try:
                if not self.lost:
                    if self.store.protocol == "file":
                        seen = self._read()
                        if seen is not None and seen[1][:2] == self._ident:
                            self._break(seen[1])
                    else:
                        self._break(self._etag)
            finally:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self.held = False
