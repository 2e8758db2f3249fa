"""The fused ternary CPU kernel (``csrc/ternary_linear.cpp``): built on first use, cached, loaded as a torch op.

The kernel computes a packed BitNet linear layer for a few rows (decode) in one call: per-token absmax int8
activations, int8 x 2-bit ternary dot products with integer accumulation (AVX-512 VNNI / AVX-VNNI / AVX2
multiply-adds where the CPU has them, plain C otherwise), split over torch's intra-op threads, and one
division by ``s_x * s_w``. It reads the 2-bit codes of transformers' BitNet layout directly, so nothing is
expanded per call, and its outputs are bit-identical to the PyTorch path (same integers, same float ops).

It is compiled with the system C++ compiler (``$CXX`` or ``g++``) against this torch's headers, for this CPU
(``-march=native``), into ``$FORGE_KERNEL_CACHE`` (default ``~/.cache/agent-forge/kernels``) under a key of
the source, torch version, compiler and CPU flags, then reused. Building takes about 8 s once per key.
Loading a shared library runs its code, so the cache is private and verified: the folder is created 0700 and
refused when another user owns it (made 0700 when it is ours but open to others), and each library has a
``.sha256`` written after it is built; a library whose bytes do not match it (truncated, replaced) or that
has none is rebuilt, never loaded.
Nothing is downloaded. ``FORGE_BITNET_KERNEL=0`` disables it (the packed layers then use fbgemm's row-wise
2-bit kernel or ``_int_mm``, also exact).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["KernelUnavailable", "kernel_available", "load_kernel", "kernel_library_path", "ternary_linear"]

SOURCE = Path(__file__).with_name("csrc") / "ternary_linear.cpp"
DISABLE_ENV = "FORGE_BITNET_KERNEL"
CACHE_ENV = "FORGE_KERNEL_CACHE"


class KernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or loaded here (the message says why)."""


def _cpu_flags() -> str:
    # -march=native code must never run on another CPU model: a cache shared between machines is keyed by flags.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile_command(compiler: str, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    return [
        compiler, "-O3", "-march=native", "-mprefer-vector-width=256", "-fopenmp", "-fPIC", "-shared",
        "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-w",
        *[f"-I{p}" for p in include_paths()], str(SOURCE), "-o", str(out),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}",
    ]


def kernel_library_path() -> Path:
    """Where the built library for this source, torch, compiler and CPU lives (whether built yet or not)."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), torch.__version__.encode(), compiler.encode(), _cpu_flags().encode(),
        platform.python_version().encode(),
    ])).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "agent-forge" / "kernels")
    return root / f"ternary_linear-{key}.so"


_LOADED: Path | KernelUnavailable | None = None
"""This process's outcome of :func:`load_kernel`: a failed build is not retried (it would cost seconds per call)."""
_LOAD_LOCK = threading.Lock()  # task runners load models from several threads: build and load once


def load_kernel() -> Path:
    """Build (once per key) and load the kernel; returns the library path. Raises KernelUnavailable."""
    global _LOADED
    with _LOAD_LOCK:
        if _LOADED is None:
            try:
                _LOADED = _build_and_load()
            except KernelUnavailable as exc:
                _LOADED = exc
    if isinstance(_LOADED, KernelUnavailable):
        raise _LOADED
    return _LOADED


def _build_and_load() -> Path:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        raise KernelUnavailable(f"disabled by {DISABLE_ENV}=0")
    if platform.system() != "Linux":
        raise KernelUnavailable(f"built only on Linux (this is {platform.system()})")
    try:
        library = kernel_library_path()
    except (OSError, RuntimeError) as exc:  # e.g. no home directory for the default cache
        raise KernelUnavailable(f"no kernel cache location ({exc}); set {CACHE_ENV}") from exc
    _private_folder(library.parent)
    if library.is_file() and not _verified(library):
        library.unlink()  # corrupted, replaced or from before digests were kept: rebuilt below, never loaded
    if not library.is_file():
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH (set CXX)")
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            # Build under a private name, then rename: concurrent builders (test workers, Dask workers) never
            # load a half-written library, and the last rename wins with identical content.
            fd, tmp = tempfile.mkstemp(prefix=library.stem + ".", suffix=".tmp.so", dir=library.parent)
        except OSError as exc:
            raise KernelUnavailable(f"cannot write the kernel cache {library.parent} ({exc}); set {CACHE_ENV}") from exc
        os.close(fd)
        try:
            proc = subprocess.run(_compile_command(compiler, Path(tmp)), capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelUnavailable(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")
            os.chmod(tmp, 0o700)  # whatever the umask: nobody else may replace what we will load
            digest = _sha256(Path(tmp))
            os.replace(tmp, library)
            _write_atomic(_digest_path(library), digest.encode())
        except OSError as exc:
            raise KernelUnavailable(f"running {compiler!r} failed: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if not _verified(library):
        raise KernelUnavailable(f"{library} does not match {_digest_path(library).name}: refusing to load it")
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as exc:
        raise KernelUnavailable(f"loading {library} failed: {exc}") from exc
    if not hasattr(torch.ops.forge_bitnet, "ternary_linear"):
        raise KernelUnavailable(f"{library} does not define forge_bitnet::ternary_linear")
    return library


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _verified(library: Path) -> bool:
    """The library's bytes match the digest recorded when it was built, and only this user can replace it."""
    try:
        st = library.stat()
        want = _digest_path(library).read_text().strip()
    except OSError:
        return False
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        return False
    return _sha256(library) == want


def _private_folder(folder: Path) -> None:
    """Create the cache folder 0700; refuse one another user owns; close one of ours that others could write."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
        if st.st_uid != os.getuid():
            raise KernelUnavailable(
                f"the kernel cache {folder} belongs to uid {st.st_uid}, not to this user: loading a library from it "
                f"would run their code; set {CACHE_ENV} to a folder of your own"
            )
        if st.st_mode & 0o077:
            os.chmod(folder, 0o700)
    except OSError as exc:
        raise KernelUnavailable(f"cannot write the kernel cache {folder} ({exc}); set {CACHE_ENV}") from exc


def kernel_available() -> bool:
    """Whether the fused kernel is (or can be built and) loaded in this process."""
    try:
        load_kernel()
    except KernelUnavailable:
        return False
    return True


def ternary_linear(x: torch.Tensor, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """``(x_q @ W_q.T) / (s_x * s_w) + bias`` for float32 ``x`` ``(rows, in)`` and 2-bit ``codes`` ``(R, in)``."""
    return torch.ops.forge_bitnet.ternary_linear(x, codes, weight_scale, bias, out_features)
