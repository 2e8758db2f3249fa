"""Streaming safetensors I/O: read one tensor at a time, write shards whose layout is fixed up front.

Why not ``safetensors.safe_open``: in safetensors 0.8 ``get_tensor`` hands back tensors backed by a
private mmap of the file, so every tensor touched stays resident (as file-backed RSS) while the handle is
open, and a merge over N models shows N models' worth of resident memory. Reading each tensor with
``pread`` into its own buffer keeps exactly the live tensors in memory and makes the peak measurable.

Why not ``safetensors.torch.save_file`` per shard: it needs the whole shard in memory (5 GB by default
in mergekit and Hugging Face). The merge plan knows every output name, shape and dtype before the first
tensor is computed, so :class:`ShardWriter` writes each shard's header first and then appends each
tensor's bytes as soon as it is computed; nothing is buffered.

File format (https://github.com/huggingface/safetensors#format): 8-byte little-endian header length N,
N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`` with
offsets relative to the end of the header, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from forge_models.runtime import ArtifactIntegrityError

__all__ = [
    "TensorInfo",
    "read_header",
    "read_model_index",
    "TensorReader",
    "ShardWriter",
    "DTYPES",
    "dtype_name",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses larger headers too


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype tag of a torch dtype (ValueError for unsupported ones)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse a .safetensors header without reading any tensor data.

    Raises:
        ArtifactIntegrityError: truncated file, malformed header, unknown dtype, or byte ranges that do
            not match the shapes or the file size.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ArtifactIntegrityError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ArtifactIntegrityError(f"{path}: header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactIntegrityError(f"{path}: header is not valid JSON ({exc})") from None
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactIntegrityError(f"{path}: bad header entry for {name!r}: {entry} ({exc})") from None
        info = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
        if info.nbytes != info.numel * dtype.itemsize or info.end > size:
            raise ArtifactIntegrityError(
                f"{path}: tensor {name!r} {entry['dtype']}{list(shape)} has byte range {begin}..{end}, "
                f"which does not match its shape or lies beyond the file ({size} bytes)"
            )
        out[name] = info
    return out


def read_model_index(folder: str | Path) -> dict[str, TensorInfo]:
    """All tensors of a Hugging Face model folder (``model.safetensors`` or a sharded index).

    Raises:
        FileNotFoundError: the folder holds no safetensors weights.
        ArtifactIntegrityError: a shard named by the index is missing, or a tensor is in the wrong shard.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactIntegrityError(f"{index}: not a valid safetensors index ({exc})") from None
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ArtifactIntegrityError(f"{folder}: index names shard {shard}, which is missing")
            out.update(read_header(folder / shard))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ArtifactIntegrityError(f"{folder}: index lists {missing[:3]} but no shard holds them")
        return out
    single = folder / "model.safetensors"
    if single.is_file():
        return read_header(single)
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


class TensorReader:
    """Reads single tensors with ``pread`` into freshly allocated buffers (no mmap, no caching).

    File descriptors stay open until :meth:`close` so a merge does not reopen a shard per tensor.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The whole tensor."""
        return self._read(info, info.start, info.nbytes).reshape(info.shape)

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (row-major storage makes them one contiguous byte range);
        a 1-D tensor's rows are its elements."""
        if not info.shape:
            raise ValueError("a 0-dim tensor has no rows")
        rows = info.shape[0]
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"rows {start}:{stop} outside 0:{rows}")
        row_bytes = info.nbytes // rows if rows else 0
        return self._read(info, info.start + start * row_bytes, (stop - start) * row_bytes).reshape(
            (stop - start, *info.shape[1:]))

    def _read(self, info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        # A single read(2) returns at most ~2 GiB on Linux, so large tensors take several calls.
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ArtifactIntegrityError(f"{info.file}: unexpected end of file at byte {offset + done}")
            done += got
        self.bytes_read += nbytes
        return buf.view(info.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Slot:
    shard: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ShardWriter:
    """Writes a fixed, ordered list of tensors into shards, one tensor at a time, index last.

    Tensors must arrive in the declared order with the declared shape and dtype. Shards are written as
    ``*.partial`` and renamed by :meth:`finalize`, which then writes ``model.safetensors.index.json``
    (through a temporary file and an atomic rename): a folder with an index is complete.
    """

    INDEX = "model.safetensors.index.json"

    def __init__(
        self,
        out_dir: str | Path,
        layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        # Same packing rule as mergekit's TensorWriter: start a new shard when the next tensor would
        # overflow a non-empty one (a single tensor larger than the limit gets a shard of its own).
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        used = 0
        for name, shape, dtype in layout:
            n = _numel(shape) * dtype.itemsize
            if shards[-1] and used + n > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype))
            used += n
        if not shards[-1]:
            raise ValueError("nothing to write")
        total = len(shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._order = [name for shard in shards for name, _, _ in shard]
        self._slots = {name: _Slot(i, dtype, shape) for i, shard in enumerate(shards) for name, shape, dtype in shard}
        if len(self._slots) != len(self._order):
            raise ValueError("duplicate tensor names in the layout")
        self._shards = shards
        self._next = 0
        self._rows_done = 0  # rows written so far of the current tensor (write_rows)
        self._file = None
        self._open_shard = -1
        self.total_size = sum(_numel(s) * d.itemsize for _, s, d in layout)
        self.bytes_written = 0

    def _start_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        entries: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in self._shards[index]:
            n = _numel(shape) * dtype.itemsize
            entries[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(self.out_dir / (self.shard_names[index] + ".partial"), "wb")
        self._file.write(struct.pack("<Q", len(header)))
        self._file.write(header)
        self._open_shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (CPU, declared shape and dtype)."""
        slot = self._expect(name)
        if tuple(tensor.shape) != slot.shape or self._rows_done:
            raise RuntimeError(f"{name}: planned shape {list(slot.shape)}, got {list(tensor.shape)}")
        self._append(name, slot, tensor)
        self._next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (along dim 0) of the current tensor; it is complete after its last row."""
        slot = self._expect(name)
        if not slot.shape or tuple(rows.shape[1:]) != slot.shape[1:]:
            raise RuntimeError(f"{name}: planned shape {list(slot.shape)}, got rows of {list(rows.shape)}")
        if self._rows_done + rows.shape[0] > slot.shape[0]:
            raise RuntimeError(f"{name}: more than the planned {slot.shape[0]} rows")
        self._append(name, slot, rows)
        self._rows_done += rows.shape[0]
        if self._rows_done == slot.shape[0]:
            self._rows_done = 0
            self._next += 1

    def _expect(self, name: str) -> _Slot:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"writer expected {expected}, got {name}")
        return self._slots[name]

    def _append(self, name: str, slot: _Slot, tensor: torch.Tensor) -> None:
        if tensor.dtype != slot.dtype:
            raise RuntimeError(f"{name}: planned dtype {slot.dtype}, got {tensor.dtype}")
        if slot.shard != self._open_shard:
            self._start_shard(slot.shard)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self.bytes_written += data.numel()

    def finalize(self) -> Path:
        """Close the last shard, rename all shards, write the index last. Returns the index path."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors; not finalising")
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self.shard_names:
            os.replace(self.out_dir / (shard + ".partial"), self.out_dir / shard)
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {name: self.shard_names[self._slots[name].shard] for name in self._order},
        }
        tmp = self.out_dir / (self.INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.out_dir / self.INDEX)
        return self.out_dir / self.INDEX

    def abort(self) -> None:
        """Close and delete partial shards (the folder stays without an index, i.e. incomplete)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self.shard_names:
            (self.out_dir / (shard + ".partial")).unlink(missing_ok=True)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
