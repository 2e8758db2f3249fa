"""The artifact store: one fsspec URL root, self-describing output prefixes, manifest written last.

Layout under the root (``file://./forge-store`` by default, or ``s3://bucket/prefix``):

    <phase>/<cache-key>/...             a phase output: weights (safetensors), config.json, tokenizer,
                                        phase.json, report.md, and manifest.json (written LAST)
    checkpoints/<phase>/<cache-key>/    resumable training checkpoints of an unfinished phase
    prefect-results/                    Prefect task results (JSON), keyed by the same cache keys
    mlflow-artifacts/                   MLflow artifacts (reports, plots)

A reader trusts a prefix only if ``manifest.json`` exists and every file's size and sha256 match and
no file outside the manifest is present; anything else raises :class:`ArtifactIntegrityError` naming
the file. S3 has no rename and no multi-object transaction: writing the manifest last is the commit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from forge_models.runtime import ArtifactIntegrityError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "agent-forge-manifest/1"
CHUNK = 8 * 1024 * 1024


class TransientStorageError(Exception):
    """A storage or network failure that a retry may fix (connection reset, timeout, 5xx, throttling)."""


class ArtifactRef(BaseModel):
    """What a task returns instead of weights: a small, JSON-serialisable pointer to a verified output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="URL of the output prefix.")
    digest: str = Field(description="sha256 of the prefix's manifest.json.")
    kind: str = Field(description="What the prefix holds: dataset, model-set, model.")
    params: int | None = Field(None, description="Parameter count of the (largest) model, if any.")
    bytes: int = Field(0, description="Bytes on disk of every file in the manifest.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Headline metrics (measured).")
    mlflow_run_id: str | None = Field(None, description="MLflow run that produced it.")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_transient(exc: BaseException) -> bool:
    """True for storage/network errors worth retrying; never for our own ForgeErrors or bad input."""
    from forge_models.runtime import ForgeError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ForgeError):
            return False
        if isinstance(cur, (TransientStorageError, ConnectionError, TimeoutError)):
            return True
        name = type(cur).__name__
        if name in {
            "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
            "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
        }:
            return True
        if isinstance(cur, OSError) and cur.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE):
            return True
        text = str(cur)
        if any(s in text for s in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def normalise_url(url: str) -> str:
    """Absolute, slash-free-at-end URL; plain paths and relative file:// URLs become absolute file:// URLs."""
    url = url.strip()
    if "://" not in url:
        url = "file://" + url
    if url.startswith("file://"):
        path = url[len("file://"):]
        url = "file://" + os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/")


class Store:
    """An fsspec-backed artifact store rooted at one URL.

    s3:// goes through s3fs; the endpoint and keys come from the standard AWS environment variables
    (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ...), so any S3-compatible server works.
    """

    def __init__(self, url: str):
        self.url = normalise_url(url)
        self.protocol = self.url.split("://", 1)[0]
        if self.protocol not in ("file", "s3"):
            raise ValueError(f"unsupported store URL {url!r}: use file://PATH or s3://BUCKET/PREFIX")
        options: dict[str, Any] = {}
        if self.protocol == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["client_kwargs"] = {"endpoint_url": endpoint}
            # Fresh instances: a cached s3fs client may point at a server that no longer exists.
            options["skip_instance_cache"] = True
            # No listings cache: other runs write here concurrently (a waiter polls for a manifest, a reader
            # must see the files that exist now); a cached listing hid a manifest written after it was taken.
            options["use_listings_cache"] = False
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)

    # ------------------------------------------------------------------ paths

    def uri(self, *parts: str) -> str:
        return "/".join([self.url, *[p.strip("/") for p in parts if p]])

    def _path(self, uri: str) -> str:
        """fsspec path of a URI inside this store (raises if it is outside)."""
        uri = normalise_url(uri)
        if not (uri == self.url or uri.startswith(self.url + "/")):
            raise ArtifactIntegrityError(f"{uri} is not inside the store {self.url}")
        rel = uri[len(self.url):].lstrip("/")
        return f"{self.root}/{rel}" if rel else self.root

    # ------------------------------------------------------------------ low-level ops with error mapping

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_transient(exc):
                raise TransientStorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
            raise

    def exists(self, uri: str) -> bool:
        return bool(self._call(f"exists {uri}", self.fs.exists, self._path(uri)))

    def read_bytes(self, uri: str) -> bytes:
        return self._call(f"read {uri}", self.fs.cat_file, self._path(uri))

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        if self.protocol == "file":
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._call(f"write {uri}", self.fs.pipe_file, path, data)

    def create_bytes(self, uri: str, data: bytes) -> None:
        """Write an object that must not exist yet (create-only where the store supports it)."""
        path = self._path(uri)
        try:
            if self.protocol == "file":
                # Written whole under a private name, then linked (create-only): a crash mid-write never leaves a
                # torn manifest at the name, which would block the output forever.
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
                with open(tmp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            else:
                self._call(f"create {uri}", self.fs.pipe_file, path, data, mode="create")
        except FileExistsError:
            # On S3 a retried create whose first attempt landed (its response lost) meets its own object.
            if self.protocol != "file" and self._same_bytes(uri, data):
                return
            raise ArtifactIntegrityError(f"{uri} already exists: another writer committed this output first") from None

    def _same_bytes(self, uri: str, data: bytes) -> bool:
        try:
            return self.read_bytes(uri) == data
        except FileNotFoundError:
            return False

    def put_file(self, local: Path, uri: str) -> None:
        path = self._path(uri)
        if self.protocol == "file":
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._call(f"upload {local} -> {uri}", self.fs.put_file, str(local), path)

    def list_files(self, uri: str) -> list[str]:
        """Relative paths of every file under a prefix (empty if absent)."""
        base = self._path(uri)
        if not self._call(f"exists {uri}", self.fs.exists, base):
            return []
        found = self._call(f"list {uri}", self.fs.find, base)
        base = base.rstrip("/")
        return sorted(p[len(base):].lstrip("/") for p in found if p.startswith(base + "/"))

    def delete(self, uri: str) -> None:
        path = self._path(uri)
        if self._call(f"exists {uri}", self.fs.exists, path):
            self._call(f"delete {uri}", self.fs.rm, path, recursive=True)

    # ------------------------------------------------------------------ prefixes with manifests

    def write_prefix(self, local_dir: Path, uri: str, kind: str) -> str:
        """Upload every file of ``local_dir`` to ``uri``, then write manifest.json last.

        Returns the manifest digest. Files already at the prefix from an interrupted earlier write are
        overwritten; stray files not in ``local_dir`` are removed first so the prefix verifies.
        """
        local_dir = Path(local_dir)
        files = sorted(
            p for p in local_dir.rglob("*") if p.is_file() and p.relative_to(local_dir).as_posix() != MANIFEST
        )
        if not files:
            raise ArtifactIntegrityError(f"refusing to store an empty output at {uri}")
        if self.exists(self.uri_join(uri, MANIFEST)):
            raise ArtifactIntegrityError(f"{uri} already holds a committed output; outputs are immutable")
        self.delete(uri)  # leftovers of an interrupted write (never committed: no manifest)
        entries: dict[str, dict[str, Any]] = {}
        for p in files:
            rel = p.relative_to(local_dir).as_posix()
            entries[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
            self.put_file(p, self.uri_join(uri, rel))
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": kind,
            "created_unix": round(time.time(), 3),
            "files": entries,
        }
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.create_bytes(self.uri_join(uri, MANIFEST), data)
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def uri_join(uri: str, rel: str) -> str:
        return uri.rstrip("/") + "/" + rel.lstrip("/")

    def read_manifest(self, uri: str) -> tuple[dict[str, Any], str]:
        """The manifest of a prefix and its digest; raises if missing or malformed."""
        muri = self.uri_join(uri, MANIFEST)
        try:
            data = self.read_bytes(muri)
        except FileNotFoundError:
            raise ArtifactIntegrityError(
                f"{muri} is missing: the output at {uri} is incomplete (an interrupted write?) or does not exist"
            ) from None
        try:
            manifest = json.loads(data)
            assert manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("files"), dict)
        except Exception:
            raise ArtifactIntegrityError(f"{muri} is not a valid Agent Forge manifest") from None
        return manifest, hashlib.sha256(data).hexdigest()

    def _checked_manifest(self, uri: str, expected_digest: str | None) -> tuple[dict[str, Any], str, set[str]]:
        """Manifest, its digest and the files present; raises on a pinned-digest mismatch or a foreign file."""
        manifest, digest = self.read_manifest(uri)
        if expected_digest and digest != expected_digest:
            raise ArtifactIntegrityError(
                f"{uri}/manifest.json has digest {digest[:12]}..., expected {expected_digest[:12]}...: "
                "the artifact was replaced after it was referenced"
            )
        present = set(self.list_files(uri)) - {MANIFEST}
        foreign = sorted(present - set(manifest["files"]))
        if foreign:
            raise ArtifactIntegrityError(f"{uri}: file {foreign[0]!r} is not in the manifest (foreign file)")
        return manifest, digest, present

    def verify(self, uri: str, expected_digest: str | None = None, deep: bool = True) -> dict[str, Any]:
        """Check a prefix against its manifest; return the manifest or raise naming the bad file.

        deep=True re-hashes every file (catches same-size tampering); deep=False checks presence and size.
        """
        manifest, digest, present = self._checked_manifest(uri, expected_digest)
        for rel, meta in sorted(manifest["files"].items()):
            furi = self.uri_join(uri, rel)
            if rel not in present:
                raise ArtifactIntegrityError(f"{furi} is listed in the manifest but missing")
            size = self._call(f"size {furi}", self.fs.size, self._path(furi))
            if size != meta["size"]:
                raise ArtifactIntegrityError(f"{furi} has {size} bytes, manifest says {meta['size']}")
            if deep:
                h = hashlib.sha256()
                for chunk in self._iter_chunks(furi):
                    h.update(chunk)
                if h.hexdigest() != meta["sha256"]:
                    raise ArtifactIntegrityError(f"{furi} does not match its sha256 in the manifest (corrupted)")
        manifest["digest"] = digest
        return manifest

    def _iter_chunks(self, uri: str) -> Iterator[bytes]:
        try:
            with self.fs.open(self._path(uri), "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                raise TransientStorageError(f"read {uri}: {exc}") from exc
            raise

    def download(
        self, uri: str, local_dir: Path, expected_digest: str | None = None, only: str | None = None
    ) -> dict[str, Any]:
        """Copy a verified prefix to ``local_dir``; every file is hashed as it arrives.

        ``only``: copy just the files under this sub-folder (the rest is still checked for presence).
        """
        manifest, digest, present = self._checked_manifest(uri, expected_digest)
        local_dir = Path(local_dir)
        if only is not None and not any(rel.startswith(only.rstrip("/") + "/") for rel in manifest["files"]):
            raise ArtifactIntegrityError(f"{uri} has no folder {only!r}")
        for rel, meta in sorted(manifest["files"].items()):
            if only is not None and not rel.startswith(only.rstrip("/") + "/"):
                if rel not in present:
                    raise ArtifactIntegrityError(f"{self.uri_join(uri, rel)} is listed in the manifest but missing")
                continue
            furi = self.uri_join(uri, rel)
            if rel not in present:
                raise ArtifactIntegrityError(f"{furi} is listed in the manifest but missing")
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            with open(dest, "wb") as out:
                for chunk in self._iter_chunks(furi):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                dest.unlink()  # never leave a copy of a bad file where a caller might pick it up
            if size != meta["size"]:
                raise ArtifactIntegrityError(f"{furi} has {size} bytes, manifest says {meta['size']}")
            if h.hexdigest() != meta["sha256"]:
                raise ArtifactIntegrityError(f"{furi} does not match its sha256 in the manifest (corrupted)")
        (local_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        manifest["digest"] = digest
        return manifest

    def total_bytes(self, manifest: dict[str, Any]) -> int:
        return sum(int(m["size"]) for m in manifest["files"].values())

    # ------------------------------------------------------------------ checkpoints (no manifest; COMPLETE marker)

    def upload_dir(self, local_dir: Path, uri: str, last: str | None = None) -> None:
        """Upload a folder; the file named ``last`` (a completion marker) goes last."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        marker = [p for p in files if last and p.relative_to(local_dir).as_posix() == last]
        for p in [p for p in files if p not in marker] + marker:
            self.put_file(p, self.uri_join(uri, p.relative_to(local_dir).as_posix()))

    def download_dir(self, uri: str, local_dir: Path) -> None:
        for rel in self.list_files(uri):
            dest = Path(local_dir) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.read_bytes(self.uri_join(uri, rel)))
