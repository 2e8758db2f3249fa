"""End to end: the `forge` command on the local store, as a user runs it (`forge run --preset tiny`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _forge(args: list[str], cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "FORGE_"))}
    env["PREFECT_HOME"] = str(cwd / ".prefect")
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# the whole tiny run plus five standalone phase commands: ~12-25 min on a loaded 2-core CPU, over pytest's 30-min
# default on a slower worker; its own commands carry their own timeouts
@pytest.mark.timeout(3600)
def test_forge_run_tiny_then_inspect_and_phase(tmp_path):
    summary = tmp_path / "summary.json"
    proc = _forge(["run", "--preset", "tiny", "--summary-json", str(summary)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(summary.read_text())
    assert doc["store"] == f"file://{tmp_path}/forge-store"
    assert doc["flow_run_id"] and doc["mlflow_run_id"]
    phases = {p["name"]: p for p in doc["phases"]}
    assert set(phases) == {"data", "cognate", "evomerge", "bitnet", "training"}
    bit = phases["bitnet"]["metrics"]
    assert bit["size/ternary_linear"] * 7 < bit["size/bf16_linear"]  # 2 bits vs 16, measured on disk
    assert 1.99 < bit["size/bits_per_ternary_weight"] < 2.01
    assert bit["export/max_rel_logit_diff"] < 1e-4
    assert bit["bitnet/loss"] < bit["ternary_no_ft/loss"]  # QAT recovered part of what ternarising cost
    assert set(doc["test_metrics"]) == {"model"}
    # EvoMerge on the tiny Cognate variants: the evolved merge beats every parent on validation fitness
    # (selection-biased: chosen on that split; "beats the plain average" is not asserted, the GA starts there)
    evo = phases["evomerge"]["metrics"]
    for parent in ("math", "dialog", "story"):
        assert evo["validation/best/fitness"] > evo[f"validation/parent:{parent}/fitness"], (parent, evo)
    assert not any(k.startswith("test/") for k in evo)  # the test split is the final evaluation's alone
    assert evo["evaluations"] >= 8 and evo["generations"] >= 2
    # ... and its recipe.yaml reproduces the stored winner with `forge merge`
    evo_dir = tmp_path / "forge-store" / phases["evomerge"]["artifact"]["uri"].split("/forge-store/")[1]
    again = _forge(["merge", "--config", str(evo_dir / "recipe.yaml"), "--out", str(tmp_path / "again")], tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    from safetensors.torch import load_file

    want = {k: v for f in sorted((evo_dir / "merged").glob("model*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted((tmp_path / "again").glob("model*.safetensors")) for k, v in load_file(f).items()}
    assert want.keys() == got.keys() and all(bool((want[k] == got[k]).all()) for k in want)
    # the Forge loop trained the ternary model: stages ran, dreams triggered, stored packed with latent weights
    tr = phases["training"]["metrics"]
    assert tr["lambda"] == 1.0 and tr["dream/cycles"] >= 1 and tr["steps"] > 0
    assert tr["stages/by_criterion"] + tr["stages/by_budget"] == 10
    tr_dir = tmp_path / "forge-store" / phases["training"]["artifact"]["uri"].split("/forge-store/")[1]
    assert (tr_dir / "model" / "bitnet.json").is_file() and (tr_dir / "model" / "latent" / "model.safetensors").is_file()
    cog = phases["cognate"]
    assert cog["status"] == "completed" and not cog["cached"]
    for name in ("trunk", "math", "dialog", "story"):  # (the unigram gate is the phase's; not re-asserted here)
        assert cog["metrics"][f"{name}/params"] > 0
    final = doc["test_metrics"]["model"]  # every test example scored, each accuracy with its interval
    assert min(final["n_arith"], final["n_tool"], final["n_choice"]) >= 200
    assert final["tool_correct_lo"] <= final["tool_correct"] <= final["tool_correct_hi"]
    out = proc.stdout + proc.stderr
    assert "cognate" in out and "MLflow UI" in out
    assert (tmp_path / "forge-store" / "mlflow.db").is_file()

    uri = cog["artifact"]["uri"]
    insp = _forge(["inspect", uri], tmp_path, timeout=300)
    assert insp.returncode == 0, insp.stderr[-3000:]
    assert "trunk/model.safetensors" in insp.stdout and cog["artifact"]["digest"] in insp.stdout

    # the pretrained route on a plain Hugging Face folder: `forge phase cognate --input DIR --out DIR`
    trunk_dir = tmp_path / "export"
    phase = _forge(["phase", "cognate", "--input", str(tmp_path / "forge-store" / uri.split("/forge-store/")[1] / "trunk"),
                    "--out", str(trunk_dir), "--set", "data.synthetic.n_examples=1000"], tmp_path, timeout=900)
    assert phase.returncode == 0, phase.stdout[-3000:] + phase.stderr[-3000:]
    assert (trunk_dir / "model.safetensors").is_file() and (trunk_dir / "config.json").is_file()

    # phase 2 alone on plain Hugging Face folders: `forge phase evomerge --input A --input B --base C --out DIR`
    from tests.factories import tiny_overrides

    cog_dir = tmp_path / "forge-store" / uri.split("/forge-store/")[1]
    # small search and evaluation: this checks the command's wiring; the search itself is tested above
    evo_sets = [a for o in tiny_overrides() if o.startswith(("evomerge.", "eval.max_examples"))
                for a in ("--set", o)] + ["--set", "evomerge.generations=1", "--set", "final_test_eval=false"]
    em = _forge(["phase", "evomerge", "--input", str(cog_dir / "math"), "--input", str(cog_dir / "dialog"),
                 "--base", str(cog_dir / "trunk"), "--out", str(tmp_path / "evo-out"),
                 "--set", "data.synthetic.n_examples=1000", *evo_sets], tmp_path, timeout=900)
    assert em.returncode == 0, em.stdout[-3000:] + em.stderr[-3000:]
    assert (tmp_path / "evo-out" / "config.json").is_file()
    import yaml

    recipe = yaml.safe_load((tmp_path / "evo-out" / "recipe.yaml").read_text())
    named = {m["model"].rsplit("/", 1)[-1] for m in recipe["models"]}
    assert named <= {"model-0", "model-1"} and recipe["merge_method"]
    assert recipe.get("base_model", "").endswith("/base") or recipe["merge_method"] == "linear"

    # phase 4 alone on a plain Hugging Face folder: the exported folder loads with transformers' BitNet support
    packed = tmp_path / "packed"
    bn = _forge(["phase", "bitnet", "--input", str(trunk_dir), "--out", str(packed),
                 "--set", "bitnet.steps=60", "--set", "bitnet.warmup_steps=10", "--set", "bitnet.max_loss_increase=1.5",
                 "--set", "data.synthetic.n_examples=1000"],
                tmp_path, timeout=900)
    assert bn.returncode == 0, bn.stdout[-3000:] + bn.stderr[-3000:]
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    check = subprocess.run(
        [sys.executable, "-c",
         "import sys, torch, forge_models; from transformers import AutoModelForCausalLM, AutoTokenizer;"
         "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
         "ids = t('Q: What is 2 + 3?', return_tensors='pt').input_ids;"
         "print(type(m.model.layers[0].self_attn.q_proj).__name__, bool(torch.isfinite(m(ids).logits).all()))",
         str(packed)], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split()[-2:] == ["BitLinear", "True"]

    # phase 5 alone on that packed folder: trains the latent weights, writes a packed folder again
    short = [o for o in tiny_overrides() if o.startswith("training.")]
    trained = tmp_path / "trained"
    tr = _forge(["phase", "training", "--input", str(packed), "--out", str(trained),
                 "--set", "data.synthetic.n_examples=1000", *[a for o in short for a in ("--set", o)]], tmp_path, timeout=900)
    assert tr.returncode == 0, tr.stdout[-3000:] + tr.stderr[-3000:]
    assert json.loads((trained / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"
    assert (trained / "latent" / "bitnet_latent.json").is_file()
    from safetensors.torch import load_file as _load

    before, after = _load(str(packed / "latent" / "model.safetensors")), _load(str(trained / "latent" / "model.safetensors"))
    assert any(not bool((before[k] == after[k]).all()) for k in before if "q_proj" in k)  # the latent weights trained

    # a bad config fails before any compute with exit code 2
    bad = _forge(["run", "--preset", "tiny", "--set", "cognate.arch.num_heads=0"], tmp_path, timeout=300)
    assert bad.returncode == 2 and "cognate.arch.num_heads" in bad.stderr
