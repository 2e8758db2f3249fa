"""The compiled-kernel cache is private and verified: nothing is loaded from a folder another user owns, and a
library whose bytes differ from the digest recorded at build time (or without one) is rebuilt, never loaded.

The compiler is replaced by a shell command writing a known file, and torch's loader by a recorder, so the
test checks what would be loaded without compiling anything (the real build is covered by test_bitnet.py).
"""

import os
import stat

import pytest

from forge_models.bitnet import kernel


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    builds, loaded = [], []
    monkeypatch.setenv(kernel.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "sh")  # on PATH everywhere; the command below is what runs

    def command(_compiler, out):
        builds.append(out)
        return ["sh", "-c", f"printf 'library-{len(builds)}' > {out}"]

    def load_library(path):
        loaded.append(open(path, "rb").read())
        raise RuntimeError("fake library (not a real .so)")

    monkeypatch.setattr(kernel, "_compile_command", command)
    monkeypatch.setattr(kernel.torch.ops, "load_library", load_library)
    return builds, loaded


def test_cache_folder_is_private_and_a_tampered_library_is_rebuilt(fake_build, tmp_path):
    builds, loaded = fake_build
    with pytest.raises(kernel.KernelUnavailable, match="loading .* failed"):
        kernel._build_and_load()
    library = kernel.kernel_library_path()
    assert stat.S_IMODE(library.parent.stat().st_mode) == 0o700
    assert loaded == [b"library-1"] and kernel._verified(library)
    # a warm cache is loaded without rebuilding
    with pytest.raises(kernel.KernelUnavailable):
        kernel._build_and_load()
    assert len(builds) == 1 and loaded[-1] == b"library-1"
    # replaced bytes (same length): never loaded, rebuilt
    library.write_bytes(b"library-X")
    assert not kernel._verified(library)
    with pytest.raises(kernel.KernelUnavailable):
        kernel._build_and_load()
    assert len(builds) == 2 and loaded[-1] == b"library-2"
    # no digest (truncated write, older cache): rebuilt
    kernel._digest_path(library).unlink()
    with pytest.raises(kernel.KernelUnavailable):
        kernel._build_and_load()
    assert len(builds) == 3 and b"library-X" not in loaded


def test_cache_folder_open_to_others_is_closed_and_a_group_writable_library_is_not_trusted(fake_build, tmp_path):
    builds, loaded = fake_build
    folder = kernel.kernel_library_path().parent
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    with pytest.raises(kernel.KernelUnavailable):
        kernel._build_and_load()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    library = kernel.kernel_library_path()
    os.chmod(library, 0o775)
    assert not kernel._verified(library)


def test_cache_folder_of_another_user_is_refused(fake_build, monkeypatch):
    builds, loaded = fake_build
    monkeypatch.setattr(kernel.os, "getuid", lambda: os.stat("/").st_uid + 12345)
    with pytest.raises(kernel.KernelUnavailable, match="belongs to uid"):
        kernel._build_and_load()
    assert builds == [] and loaded == []
