"""Serving benchmark: the registered agent behind `mlflow models serve` vs in-process answers of the same artifact.

    PYTHONPATH=. python bench/serving.py --artifact forge-store/training/<key> --requests 200 --clients 1,8
    PYTHONPATH=. python bench/serving.py --smollm2 --requests 200     # SmolLM2-135M-Instruct, imported offline

Registers the artifact in a temporary SQLite MLflow registry, starts `mlflow models serve --env-manager local`
on a free loopback port (one worker), warms it up, then sends ``--requests`` chat requests from 1 and from 8
concurrent clients (fixed prompts, greedy, ``--max-tokens``). The baseline is `flows.agent.Agent.reply` on the
same artifact in this process, one request at a time (the same code the server runs, without HTTP and
MLflow), run before and after the served runs (the overhead is taken against the mean of the two p50s). Reports p50/p95 latency, completion tokens per second, failed requests and the server's resident
memory (sum over its process tree), and writes them to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is 17 times 23?", "Hello! Who are you?", "What is 144 divided by 12?", "Tell me a short story about a cat.",
    "Compute 45 + 67.", "What is the capital of France?", "What is 9 minus 4?", "How are you today?",
]


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def summarise(latencies: list[float], tokens: list[int], wall: float, failed: int) -> dict:
    return {"requests": len(latencies) + failed, "failed": failed, "p50_s": quantile(latencies, 0.5),
            "p95_s": quantile(latencies, 0.95), "mean_s": statistics.fmean(latencies),
            "completion_tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall,
            "requests_per_s": len(latencies) / wall}


def post(url: str, body: dict) -> tuple[int, dict, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
            return r.status, out, time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode()[:300]}, time.perf_counter() - t0


def body(i: int, args) -> dict:
    return {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": args.max_tokens,
            "tools": args.tools}


def run_served(url: str, args, clients: int) -> dict:
    def one(i: int):
        return post(url, body(i, args))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0
    ok = [(o, s) for st, o, s in results if st == 200]
    failed = len(results) - len(ok)
    if failed:
        print("failures:", [o for st, o, _ in results if st != 200][:3])
    return summarise([s for _, s in ok], [o["usage"]["completion_tokens"] for o, _ in ok], wall, failed)


def run_in_process(folder: Path, args) -> dict:
    import torch

    from flows.agent import Agent, ChatParams, ServingLimits

    torch.set_num_threads(args.threads)
    agent = Agent.load(folder, limits=ServingLimits(max_tokens=max(256, args.max_tokens)))
    params = ChatParams(max_tokens=args.max_tokens, tools=args.tools)
    for i in range(3):
        agent.reply(body(i, args)["messages"], params)
    lat, toks = [], []
    t0 = time.perf_counter()
    for i in range(args.requests):
        s = time.perf_counter()
        out = agent.reply(body(i, args)["messages"], params)
        lat.append(time.perf_counter() - s)
        toks.append(out["usage"]["completion_tokens"])
    return summarise(lat, toks, time.perf_counter() - t0, 0)


def rss_tree(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


def smollm2_artifact(tmp: Path) -> str:
    """SmolLM2-135M-Instruct imported offline (forge import) and committed as a store artifact (model/)."""
    from forge_models.importer import import_model
    from tasks.store import Store

    from flows.agent import on_torch_thread

    folder = tmp / "art"
    # on the torch thread, like every torch call of the agent: a second OpenMP team in this process would slow
    # the in-process baseline (see flows.agent.on_torch_thread)
    on_torch_thread(import_model, "smollm2-135m", str(folder / "model"))
    (folder / "model" / "manifest.json").unlink(missing_ok=True)  # the artifact's manifest covers it
    store = Store(f"file://{tmp}/store")
    uri = store.uri("smollm2")
    store.write_prefix(folder, uri, kind="model")
    return uri


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="Final artifact folder or URI.")
    ap.add_argument("--smollm2", action="store_true", help="Use SmolLM2-135M-Instruct (needs `make smollm2`).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tools", action="store_true", help="Tools on (the tool loop); default off.")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in the server and in process alike.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving.json"))
    args = ap.parse_args()
    from flows.serving import register_agent
    from tasks.store import Store
    from tests.factories import free_port

    with tempfile.TemporaryDirectory(prefix="forge-bench-serving-") as tmp_s:
        tmp = Path(tmp_s)
        uri = smollm2_artifact(tmp) if args.smollm2 else args.artifact
        store = Store(uri if "://" in uri else f"file://{Path(uri).resolve()}")
        local = tmp / "local"
        store.download(store.url, local)
        db = f"sqlite:///{tmp}/mlflow.db"
        t0 = time.perf_counter()
        reg = register_agent(store.url, tracking_uri=db, name="bench-agent")
        register_s = time.perf_counter() - t0
        port, mport = free_port(), free_port()
        env = dict(os.environ, MLFLOW_TRACKING_URI=db, PYTHONPATH=str(ROOT), FORGE_METRICS_PORT=str(mport),
                   OMP_NUM_THREADS=str(args.threads), MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT="600",
                   FORGE_SERVING_LIMITS=json.dumps({"max_tokens": max(256, args.max_tokens), "timeout_s": 300}),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        # The baseline runs before and after the served runs: on a shared machine the load changes in minutes.
        in_process = {"before": run_in_process(local, args)}
        print(f"in process (before): {json.dumps(in_process['before'])}", flush=True)
        log = open(tmp / "server.log", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                                 reg["model_uri"], "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
        url = f"http://127.0.0.1:{port}/invocations"
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit((tmp / "server.log").read_text()[-3000:])
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            start_s = time.perf_counter() - t0
            for i in range(3):
                assert post(url, body(i, args))[0] == 200
            served = {}
            for c in [int(x) for x in args.clients.split(",")]:
                served[str(c)] = run_served(url, args, c)
                print(f"served, {c} client(s): {json.dumps(served[str(c)])}", flush=True)
            rss = rss_tree(proc.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                metrics_text = r.read().decode()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        in_process["after"] = run_in_process(local, args)
        print(f"in process (after): {json.dumps(in_process['after'])}", flush=True)
    from flows.serving import stats_table

    doc = {"artifact": "smollm2-135m-instruct (imported)" if args.smollm2 else uri, "requests": args.requests,
           "max_tokens": args.max_tokens, "tools": args.tools, "threads": args.threads, "register_s": register_s,
           "server_start_s": start_s, "server_rss_bytes": rss, "served": served, "in_process": in_process,
           "overhead_p50_1_client": (served["1"]["p50_s"] / statistics.fmean(
               [in_process["before"]["p50_s"], in_process["after"]["p50_s"]]) - 1) if "1" in served else None,
           "machine": "shared 2-core CPU, no GPU", "load_average_at_end": os.getloadavg(), "stats": stats_table(metrics_text)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "stats"}, indent=2))
    print(doc["stats"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
