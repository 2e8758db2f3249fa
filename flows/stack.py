"""`forge ui` (= `make up`): the local stack on 127.0.0.1, started and stopped as one.

    forge ui [--s3] [--prefect-port 4200] [--mlflow-port 5000] [--s3-port 9000] [--store URL]

Starts a Prefect server and an MLflow server backed by the store (and, with ``--s3``, a local
S3-compatible endpoint, moto, with a ``forge`` bucket), waits until each answers its health check, sets
up what the flow needs (the result-storage block on the Prefect server, the MLflow experiment), prints
the URLs and the environment to export, and stops everything it started on Ctrl-C or SIGTERM.
Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


class Stack:
    """The processes of the local stack; `stop()` ends all of them."""

    def __init__(self, home: Path, log_dir: Path):
        self.home, self.log_dir = home, log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env: dict[str, str] = {}

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self, store: str, prefect_port: int, mlflow_port: int, s3_port: int | None, timeout_s: float = 240,
              runs_home: Path | None = None) -> dict[str, str]:
        """Start the servers; ``runs_home`` (``forge ui --runs``): open the databases `forge run` wrote without
        a server instead of the stack's own: that Prefect home, and the store's ``mlflow.db``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ)
        exports: dict[str, str] = {}
        if s3_port is not None:
            exports.update({
                "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "forge-local",
                "AWS_SECRET_ACCESS_KEY": "forge-local-secret", "AWS_DEFAULT_REGION": "us-east-1",
            })
            base.update(exports)
            os.environ.update(exports)  # this process talks to the endpoint too (bucket, store check)
            s3 = self._start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], base)
            _wait_http(f"http://127.0.0.1:{s3_port}/moto-api/", timeout_s, s3, "the S3 endpoint (moto)")
            import boto3

            client = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL_S3"])
            if "forge" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket="forge")
            store = "s3://forge/store"
        from tasks.store import Store

        store_obj = Store(store)
        exports["FORGE_STORE"] = store_obj.url

        prefect_env = {**base, "PREFECT_HOME": str(runs_home or self.home / "prefect-server"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
        prefect = self._start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(prefect_port)], prefect_env)
        if store_obj.protocol == "file":
            Path(store_obj.root).mkdir(parents=True, exist_ok=True)
            artifacts = f"{store_obj.root}/mlflow-artifacts"
            backend = f"sqlite:///{store_obj.root}/{'mlflow.db' if runs_home else 'mlflow-server.db'}"
        else:
            artifacts = store_obj.uri("mlflow-artifacts")
            (self.home / "mlflow").mkdir(parents=True, exist_ok=True)
            backend = f"sqlite:///{(self.home / 'mlflow' / 'mlflow-server.db').absolute()}"
        mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow = self._start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                        "--backend-store-uri", backend, "--artifacts-destination", artifacts,
                                        "--workers", "1"], mlflow_env)
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", timeout_s, prefect, "the Prefect server")
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", timeout_s, mlflow, "the MLflow server")
        exports["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
        exports["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
        self.env = exports
        self._setup(exports)
        return exports

    def _setup(self, exports: dict[str, str]) -> None:
        """Save the result-storage block on the server and create the MLflow experiment."""
        code = (
            "from flows.agent_forge import ensure_result_storage; from tasks.config import TrackingConfig;"
            "from tasks.store import Store; from tasks.tracking import Tracking; import os;"
            "ensure_result_storage(os.environ['FORGE_STORE']);"
            "Tracking.from_config(TrackingConfig(), Store(os.environ['FORGE_STORE']), 'agent-forge')"
        )
        env = {**os.environ, **exports}
        env.pop("PREFECT_HOME", None)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).resolve().parents[1])

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    from tasks.store import Store

    ap = argparse.ArgumentParser(prog="forge ui", description=__doc__.split("\n\n")[0])
    ap.add_argument("--s3", action="store_true", help="Also start a local S3 endpoint (moto) and use s3://forge/store.")
    ap.add_argument("--prefect-port", type=int, default=4200)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--s3-port", type=int, default=9000)
    ap.add_argument("--store", default=os.environ.get("FORGE_STORE", "file://./forge-store"))
    ap.add_argument("--home", default=".forge-stack", help="State of the stack's servers (databases, logs).")
    ap.add_argument("--runs", action="store_true", help="Show the runs `forge run` / `make demo` made without a "
                    "server: Prefect on --prefect-home's database, MLflow on the store's mlflow.db (local store).")
    ap.add_argument("--prefect-home", default=os.environ.get("PREFECT_HOME", ".prefect"),
                    help="With --runs: the Prefect home those runs used (forge's default: ./.prefect).")
    args = ap.parse_args(argv)
    home = Path(args.home).absolute()
    stack = Stack(home, home / "logs")
    stopping = {"now": False}

    def on_signal(signum, frame):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.runs and (args.s3 or not Store(args.store).protocol == "file"):
            raise ValueError("--runs opens a local store's databases; it does not combine with --s3 or an s3:// store")
        exports = stack.start(args.store, args.prefect_port, args.mlflow_port, args.s3_port if args.s3 else None,
                              runs_home=Path(args.prefect_home).absolute() if args.runs else None)
        print(f"Prefect UI: http://127.0.0.1:{args.prefect_port}")
        print(f"MLflow UI:  {exports['MLFLOW_TRACKING_URI']}")
        print(f"store:      {exports['FORGE_STORE']}")
        print("In another shell, so that `forge run` reports into these servers:")
        for k, v in exports.items():
            print(f"export {k}={v}")
        print(f"logs: {home / 'logs'}. Ctrl-C stops everything.")
        print("FORGE STACK READY", flush=True)
        while not stopping["now"]:
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    stopping["now"] = True
            time.sleep(0.5)
        return 0
    except Exception as exc:  # noqa: BLE001
        print(f"forge ui: {exc} (logs in {home / 'logs'})", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
