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
