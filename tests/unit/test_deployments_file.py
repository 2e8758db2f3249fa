"""deployments/prefect.yaml holds exactly what `forge deploy` registers, and its parameters validate."""

from pathlib import Path

import yaml

from flows.config import ForgeConfig
from flows.deploy import ENTRYPOINT, description, preset_parameters

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_matches_forge_deploy():
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = [d["name"] for d in doc["deployments"]]
    assert names == [f"{p}-{s}" for p in ("tiny", "small", "full") for s in ("manual", "scheduled")]
    for d in doc["deployments"]:
        preset = d["name"].split("-")[0]
        assert d["entrypoint"] == ENTRYPOINT
        assert d["work_pool"]["name"] == "forge-gpu"
        assert d["parameters"] == preset_parameters(preset, []), f"{d['name']} drifted from flows/presets/{preset}.yaml: run .venv/bin/python -m flows.deploy"
        ForgeConfig.model_validate(d["parameters"]["config"])  # the server would accept it
        assert d["description"] == description(preset, d["name"].split("-")[1], d["parameters"])
        assert bool(d["schedules"]) == d["name"].endswith("scheduled")
    path, func = ENTRYPOINT.split(":")
    assert f"def {func}(" in (ROOT / path).read_text()
