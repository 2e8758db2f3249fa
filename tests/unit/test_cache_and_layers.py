"""Cache-key stability and the layering rule (forge_models imports no orchestration)."""

import re
import subprocess
import sys
from pathlib import Path

from flows.config import load_config
from tasks.cache import phase_key

ROOT = Path(__file__).resolve().parents[2]


def test_cache_key_stable_and_sensitive():
    cfg = load_config("tiny")
    k = phase_key("cognate", "1", cfg.cognate.model_dump_json(), ["b", "a"], "d")
    assert k == phase_key("cognate", "1", cfg.cognate.model_dump_json(), ["a", "b"], "d")  # input order irrelevant
    assert len(k) == 64
    other = load_config("tiny", overrides=["cognate.trunk.steps=401"])
    assert k != phase_key("cognate", "1", other.cognate.model_dump_json(), ["a", "b"], "d")
    assert k != phase_key("cognate", "2", cfg.cognate.model_dump_json(), ["a", "b"], "d")
    assert k != phase_key("cognate", "1", cfg.cognate.model_dump_json(), ["a", "c"], "d")
    assert k != phase_key("cognate", "1", cfg.cognate.model_dump_json(), ["a", "b"], "e")
    assert k != phase_key("evomerge", "1", cfg.cognate.model_dump_json(), ["a", "b"], "d")


def test_cache_key_same_in_another_process():
    code = (
        "from flows.config import load_config; from tasks.cache import phase_key;"
        "c=load_config('tiny'); print(phase_key('cognate','1',c.cognate.model_dump_json(),['x'],'d'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    cfg = load_config("tiny")
    assert out.stdout.strip().splitlines()[-1] == phase_key("cognate", "1", cfg.cognate.model_dump_json(), ["x"], "d")


def test_forge_models_never_imports_orchestration():
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|mlflow|s3fs)\b", re.M)
    offenders = [str(p) for p in (ROOT / "forge_models").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    code = "import sys, forge_models, forge_models.cognate, forge_models.eval, forge_models.data; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect','mlflow','s3fs')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------- content-based keys


def test_code_version_follows_the_source_of_the_modules_a_phase_runs(tmp_path, monkeypatch):
    import shutil

    import tasks.cache as cache

    for pkg in cache.PROJECT_PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "ROOT", tmp_path)

    def versions() -> dict[str, str]:
        cache.code_version.cache_clear()
        return {p: cache.code_version(p) for p in ("data", "cognate", "bitnet", "training", "evaluate")}

    try:
        start = versions()
        assert start == versions()  # deterministic
        with open(tmp_path / "forge_models" / "bitnet" / "phase.py", "a") as f:
            f.write("\n# an edit\n")
        after_bitnet = versions()
        assert after_bitnet["bitnet"] != start["bitnet"]
        assert after_bitnet["training"] != start["training"]  # the Forge loop trains BitNet models through it
        assert after_bitnet["cognate"] == start["cognate"] and after_bitnet["data"] == start["data"]
        with open(tmp_path / "forge_models" / "eval" / "harness.py", "a") as f:
            f.write("\n# an edit\n")
        after_harness = versions()
        assert all(after_harness[p] != after_bitnet[p] for p in ("cognate", "bitnet", "training", "evaluate"))
        assert after_harness["data"] == after_bitnet["data"]
        with open(tmp_path / "forge_models" / "data" / "synthetic.py", "a") as f:
            f.write("\n# an edit\n")
        assert versions()["data"] != after_harness["data"]
        # And the key of a phase moves with its code.
        key = cache.phase_key("bitnet", "1", "{}", ["x"], "d")
        with open(tmp_path / "forge_models" / "bitnet" / "quant.py", "a") as f:
            f.write("\n# an edit\n")
        cache.code_version.cache_clear()
        assert cache.phase_key("bitnet", "1", "{}", ["x"], "d") != key
    finally:
        cache.code_version.cache_clear()


def test_data_key_hashes_source_content_and_s3_etags(tmp_path, monkeypatch):
    import fsspec

    from tasks.data import data_key, source_digest

    src = tmp_path / "corpus.txt"
    src.write_text("first document\n\nsecond document\n")
    cfg = load_config("tiny", overrides=[f"data.sources=[{{path: {src}}}]"])
    key = data_key(cfg)
    assert key == data_key(cfg)
    src.write_text("first document\n\nan edited second document\n")  # same path, new bytes
    assert data_key(cfg) != key

    class FakeS3:
        def __init__(self, tag):
            self.tag = tag

        def info(self, path):
            return {"name": path, "size": 10, "ETag": f'"{self.tag}"'}

    fs = FakeS3("abc123")
    monkeypatch.setattr(fsspec, "get_fs_token_paths", lambda url: (fs, None, [url.removeprefix("s3://")]))
    assert source_digest("s3://bucket/corpus.txt") == "etag:abc123"
    fs.tag = "def456"
    assert source_digest("s3://bucket/corpus.txt") == "etag:def456"
