"""Deployments against real local servers started by the test (`forge ui`'s Stack: Prefect + MLflow):
`forge deploy` registers the deployments with their schedule, a worker started here picks up a
triggered run of the tiny preset and completes it, and the run's MLflow parent run exists on the server.
Optionally (when Chromium is installed) a headless browser finds the flow run and its phase tasks in
the Prefect UI and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.stack import Stack
from tests.factories import free_port, tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "tests" / "artifacts"


def _retry_503(call):
    # A busy Prefect server (SQLite locked) answers 503 Service Unavailable: the request was not applied.
    for attempt in range(5):
        try:
            return call()
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 4:
                raise
            time.sleep(2 * (attempt + 1))


def _api(url: str, path: str, body: dict | None = None):
    def call():
        req = urllib.request.Request(
            url + path, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    return _retry_503(call)


def _get(url: str, path: str):
    def call():
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return json.loads(r.read())

    return _retry_503(call)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path / "stack", tmp_path / "stack" / "logs")
    env = s.start(f"file://{tmp_path}/store", free_port(), free_port(), None)
    try:
        yield s, env, tmp_path
    finally:
        s.stop()
        for _, proc in s.procs:
            assert proc.poll() is not None, "every server the stack started is stopped"


def test_deploy_worker_run_and_mlflow(stack):
    s, env, tmp = stack
    api = env["PREFECT_API_URL"]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FORGE_"))}
    child_env.update(env)
    child_env["PREFECT_HOME"] = str(tmp / "client-home")
    child_env["PYTHONPATH"] = str(ROOT)
    shrink = tiny_overrides(**{"device.precision": "fp32"})
    sets = sum([["--set", x] for x in shrink], [])
    deploy = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--pool", "test-pool", "--presets", "tiny", "--cron", "0 3 * * *", *sets],
        env=child_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    deployments = {d["name"]: d for d in _api(api, "/deployments/filter", {})}
    assert set(deployments) == {"tiny-manual", "tiny-scheduled"}
    scheduled = deployments["tiny-scheduled"]
    assert [sch["schedule"]["cron"] for sch in scheduled["schedules"]] == ["0 3 * * *"]
    assert deployments["tiny-manual"]["schedules"] == []
    assert scheduled["work_pool_name"] == "test-pool"
    assert scheduled["enforce_parameter_schema"] is True
    assert "config" in scheduled["parameter_openapi_schema"]["properties"]
    assert scheduled["parameters"]["config"]["cognate"]["trunk"]["steps"] == 120

    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--limit", "1"],
        env=child_env, cwd=tmp, stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        run = _api(api, f"/deployments/{deployments['tiny-manual']['id']}/create_flow_run", {})
        deadline = time.monotonic() + 900
        state = None
        while time.monotonic() < deadline:
            state = _get(api, f"/flow_runs/{run['id']}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
        log = (tmp / "worker.log").read_text(errors="replace")
        assert state == "COMPLETED", f"flow run ended {state}\n{log[-4000:]}"
        tasks = _api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        assert {"data", "cognate"} <= {t["task_key"].split("-")[0] for t in tasks} | {t["name"].split("-")[0] for t in tasks}
    finally:
        os.killpg(worker.pid, signal.SIGINT)  # the worker ignores SIGTERM for a while; SIGINT stops it
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("agent-forge")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert parents, "the flow run's MLflow parent run is on the MLflow server"
    parent = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"

    _browser_check(api.removesuffix("/api"), run["id"], tmp)


def _browser_check(ui: str, flow_run_id: str, tmp: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (make test installs it with apt-get where it can)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "prefect-flow-run.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium'}", "--window-size=1400,1000", "--virtual-time-budget=15000"]
    url = f"{ui}/runs/flow-run/{flow_run_id}"
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000, "a screenshot of the flow run page was saved"
    assert "cognate" in dom.stdout and "data" in dom.stdout, dom.stdout[-2000:]


def test_forge_ui_s3_and_serve_then_ctrl_c_stops_everything(tmp_path):
    ports = {"prefect": free_port(), "mlflow": free_port(), "s3": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FORGE_", "AWS_"))}
    env["PYTHONPATH"] = str(ROOT)
    ui = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--s3", "--prefect-port", str(ports["prefect"]),
         "--mlflow-port", str(ports["mlflow"]), "--s3-port", str(ports["s3"]), "--home", str(tmp_path / "stack")],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines = []
    serve = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = ui.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "FORGE STACK READY" in line:
                break
        assert any("FORGE STACK READY" in x for x in lines), "".join(lines)
        exports = dict(x.removeprefix("export ").strip().split("=", 1) for x in lines if x.startswith("export "))
        assert exports["FORGE_STORE"] == "s3://forge/store"
        assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
        # the result-storage block was saved on the server
        blocks = _api(exports["PREFECT_API_URL"], "/block_documents/filter", {})
        assert any(b["name"].startswith("forge-results-") for b in blocks)

        serve_env = {**env, **exports, "PREFECT_HOME": str(tmp_path / "serve-home")}
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--presets", "tiny", "--cron", "30 2 * * *"],
                                 env=serve_env, cwd=ROOT, stdout=open(tmp_path / "serve.log", "wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        names = set()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and names != {"tiny-manual", "tiny-scheduled"}:
            time.sleep(2)
            names = {d["name"] for d in _api(exports["PREFECT_API_URL"], "/deployments/filter", {})}
        assert names == {"tiny-manual", "tiny-scheduled"}, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if serve is not None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(60)
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(90)
    assert ui.returncode == 0
    for port in ports.values():  # nothing the stack started is still listening
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
