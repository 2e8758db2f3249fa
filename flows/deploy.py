"""`forge deploy` and `forge serve`: the pipeline as Prefect deployments, one pair per preset.

    forge deploy [--pool forge-gpu] [--presets tiny,small] [--cron "0 3 * * *"] [--gpu 0] [--set k=v]...
    forge serve  [--presets tiny] [--cron "0 3 * * *"] [--set k=v]...

Each preset P gets ``agent-forge/P-manual`` (no schedule: start it from the Prefect UI form or with
``run_deployment``) and ``agent-forge/P-scheduled`` (the cron). Parameters are the preset's
`ForgeConfig` without its ``store`` section, so a run uses the worker's ``FORGE_STORE``; the server
validates edited parameters against the schema (``enforce_parameter_schema``).

`forge deploy` targets a work pool (created as a ``process`` pool if absent: one worker per GPU host,
``prefect worker start --pool forge-gpu --limit 1`` with ``CUDA_VISIBLE_DEVICES`` in the worker's
environment or per deployment with ``--gpu``); `forge serve` needs no pool: it serves the deployments
from this process until stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows.config import DEPLOYED_PRESETS, PRESETS, ConfigProblems, load_config

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/agent_forge.py:agent_forge"


def preset_parameters(preset: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(preset=preset, overrides=overrides)
    return {"config": cfg.model_dump(mode="json", exclude={"store"})}


def description(preset: str, suffix: str, params: dict[str, Any]) -> str:
    """What a deployment runs, in the phase table's words."""
    from tasks.phases import phase

    steps = " -> ".join(f"{phase(n).order}. {n}" for n in params["config"]["phases"])
    return f"Agent Forge, {preset} preset ({suffix}): phases {steps}."


def _presets(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRESETS]
    if bad:
        raise ConfigProblems([f"--presets: unknown {bad}; choose from {list(PRESETS)}"])
    return names


def ensure_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(presets: list[str], pool: str, cron: str, overrides: list[str], gpu: str | None = None) -> list[str]:
    """Register the deployments on the Prefect server at PREFECT_API_URL; returns their names."""
    from flows.agent_forge import agent_forge

    ensure_process_pool(pool)
    flow = agent_forge.from_source(source=str(ROOT), entrypoint=ENTRYPOINT)
    job_variables = {"env": {"CUDA_VISIBLE_DEVICES": gpu}} if gpu is not None else {}
    names = []
    for preset in presets:
        params = preset_parameters(preset, overrides)
        for suffix, schedule in (("manual", None), ("scheduled", cron)):
            name = f"{preset}-{suffix}"
            flow.deploy(
                name=name, work_pool_name=pool, parameters=params, cron=schedule, build=False, push=False,
                job_variables=job_variables, description=description(preset, suffix, params),
                tags=["agent-forge", preset], print_next_steps=False,
            )
            names.append(f"agent-forge/{name}")
    return names


def serve(presets: list[str], cron: str, overrides: list[str]) -> None:
    from prefect import serve as prefect_serve

    from flows.agent_forge import agent_forge

    deployments = []
    for preset in presets:
        params = preset_parameters(preset, overrides)
        deployments.append(agent_forge.to_deployment(name=f"{preset}-manual", parameters=params,
                                                     description=description(preset, "manual", params)))
        deployments.append(agent_forge.to_deployment(name=f"{preset}-scheduled", parameters=params, cron=cron,
                                                     description=description(preset, "scheduled", params)))
    prefect_serve(*deployments)


YAML_HEADER = """# Prefect deployments of the Agent Forge flow, the same ones `forge deploy` registers (a test keeps them
# equal; regenerate with: .venv/bin/python -m flows.deploy): per preset a manual deployment and a scheduled
# one (03:00 daily), on the process work pool `forge-gpu` (one worker per GPU:
# `prefect worker start --pool forge-gpu --limit 1`).
#   FORGE_CHECKOUT=$PWD prefect deploy --all --prefect-file deployments/prefect.yaml
# Parameters are the preset's ForgeConfig without `store` (runs use the worker's FORGE_STORE); the
# Prefect UI shows them as a form and validates edits against the schema.
"""


def write_prefect_yaml(path: Path = ROOT / "deployments" / "prefect.yaml", cron: str = "0 3 * * *") -> None:
    import yaml

    doc: dict[str, Any] = {
        "name": "agent-forge", "prefect-version": "3.9.1",
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $FORGE_CHECKOUT }}"}}],
        "deployments": [],
    }
    for preset in DEPLOYED_PRESETS:
        params = preset_parameters(preset, [])
        for suffix, schedule in (("manual", None), ("scheduled", cron)):
            doc["deployments"].append({
                "name": f"{preset}-{suffix}", "entrypoint": ENTRYPOINT,
                "description": description(preset, suffix, params), "tags": ["agent-forge", preset],
                "parameters": params, "enforce_parameter_schema": True,
                "work_pool": {"name": "forge-gpu", "job_variables": {}},
                "schedules": [{"cron": schedule, "timezone": "UTC"}] if schedule else [],
            })
    path.write_text(YAML_HEADER + yaml.safe_dump(doc, sort_keys=False, width=120))


def main(command: str, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"forge {command}")
    ap.add_argument("--presets", default="tiny", help="Comma-separated presets (default: tiny).")
    ap.add_argument("--cron", default="0 3 * * *", help="Schedule of the *-scheduled deployments (default: 03:00 daily).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    if command == "deploy":
        ap.add_argument("--pool", default="forge-gpu", help="Work pool (created as a process pool if absent).")
        ap.add_argument("--gpu", help="CUDA_VISIBLE_DEVICES for these deployments' runs.")
    args = ap.parse_args(argv)
    presets = _presets(args.presets)
    if command == "deploy":
        for name in deploy(presets, args.pool, args.cron, args.overrides, args.gpu):
            print(f"deployed {name} on pool {args.pool}")
        print(f"start a worker: prefect worker start --pool {args.pool} --limit 1")
        return 0
    serve(presets, args.cron, args.overrides)
    return 0


if __name__ == "__main__":
    write_prefect_yaml()
