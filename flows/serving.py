"""The final agent in the MLflow Model Registry, served by `mlflow models serve`, watched in Prometheus format.

    forge agent register URI [--name agent-forge] [--alias candidate]   # log + register a final artifact
    forge promote RUN_OR_VERSION --alias champion [--force]            # refuses a worse version unless forced
    forge agent serve [-m models:/agent-forge@champion] [--port 5001]  # = mlflow models serve --env-manager local
    forge agent chat [MODEL_URI_OR_ARTIFACT_DIR]                       # interactive terminal chat
    forge agent stats [--url http://127.0.0.1:9109/metrics]            # the server's metrics as a table

The logged model is MLflow's Python-model format in its "models from code" form: its code is
`flows/serving_entry.py` (copied into the model, imports `ForgeAgentModel` from the installed project) and
its one artifact is the final artifact folder, manifest included. Nothing is pickled. Loading verifies
every file against the manifest (`flows.agent.Agent.load`), so a changed file fails naming the file.

Request (POST /invocations, ``application/json``)::

    {"messages": [{"role": "user", "content": "What is 3 plus 4?"}], "max_tokens": 32,
     "temperature": 0.0, "tools": true, "timeout_s": 10, "seed": 0}

Response: an OpenAI-style chat completion (``choices[0].message.content``, ``usage.prompt_tokens`` /
``completion_tokens``) plus ``custom_outputs.tool_calls`` (each executed call: name, arguments, result, ok,
error). Status codes are MLflow's scoring server's: our checks raise `MlflowException` with
INVALID_PARAMETER_VALUE (400) for bad input and DEADLINE_EXCEEDED (504) for a request over its time budget.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

from flows.agent import Agent, BadRequest, ChatParams, OverBudget, ServingLimits

log = logging.getLogger("agent_forge.serving")

ENTRY = Path(__file__).with_name("serving_entry.py")
ARTIFACT_KEY = "agent"
MODEL_NAME = "agent"  # the logged model's name inside the run
DEFAULT_METRICS_PORT = 9109
HIGHER_IS_BETTER = {"arith_em": True, "tool_valid": True, "tool_correct": True, "choice_acc": True,
                    "loss": False, "ppl": False}
"""The test metrics `forge promote` compares (the harness's headline metrics) and their direction."""


# ---------------------------------------------------------------------------------------------- metrics


class ServingMetrics:
    """Request count, latency histogram, tokens, tool calls and errors per route, in Prometheus text format.

    Routes: ``chat`` (tools off) and ``chat_tools`` (tools on), both served by POST /invocations. Only
    requests that reach the model are counted: MLflow's scoring server answers malformed JSON and
    parameters of the wrong type itself, before the model sees them.
    """

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("forge_agent_requests", "Chat requests by route and outcome.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("forge_agent_request_seconds", "Wall-clock seconds per request.", ["route"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)
        self.tokens = Counter("forge_agent_generated_tokens", "Completion tokens generated.", ["route"],
                              registry=self.registry)
        self.prompt_tokens = Counter("forge_agent_prompt_tokens", "Prompt tokens read.", ["route"],
                                     registry=self.registry)
        self.tool_calls = Counter("forge_agent_tool_calls", "Tool calls executed.", ["route", "tool", "ok"],
                                  registry=self.registry)
        self.errors = Counter("forge_agent_errors", "Failed requests by route and kind.", ["route", "kind"],
                              registry=self.registry)
        self.server = None

    def observe(self, route: str, status: str, seconds: float, usage: dict | None, tool_calls: list) -> None:
        self.requests.labels(route, status).inc()
        self.latency.labels(route).observe(seconds)
        if status != "ok":
            self.errors.labels(route, status).inc()
        if usage:
            self.tokens.labels(route).inc(usage["completion_tokens"])
            self.prompt_tokens.labels(route).inc(usage["prompt_tokens"])
        for call in tool_calls:
            self.tool_calls.labels(route, str(call.get("name")), str(bool(call.get("ok"))).lower()).inc()

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on host:port (a thread of this process)."""
        from prometheus_client import start_http_server

        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


# ---------------------------------------------------------------------------------------------- the MLflow model


def _serving_process() -> bool:
    # MLflow's scoring server passes the model path to its uvicorn worker in this variable; a plain
    # `mlflow.pyfunc.load_model` (tests, input-example validation at log time) has no metrics server.
    return bool(os.environ.get("__pyfunc_model_path__"))


class ForgeAgentModel(PythonModel):
    """MLflow's view of the agent: load the verified artifact, answer one conversation per request."""

    def load_context(self, context) -> None:
        limits = ServingLimits(**json.loads(os.environ.get("FORGE_SERVING_LIMITS", "{}")))
        self.agent = Agent.load(context.artifacts[ARTIFACT_KEY], limits=limits,
                                device=os.environ.get("FORGE_SERVING_DEVICE", "cpu"),
                                name=os.environ.get("FORGE_SERVING_NAME", "agent-forge"))
        self.agent.metrics = ServingMetrics()
        port = os.environ.get("FORGE_METRICS_PORT", str(DEFAULT_METRICS_PORT))
        if _serving_process() and port != "off":
            try:
                self.agent.metrics.serve(os.environ.get("FORGE_METRICS_HOST", "127.0.0.1"), int(port))
            except OSError as exc:  # e.g. a second uvicorn worker: the port is the first one's
                log.warning("metrics server not started on port %s: %s (this worker's metrics are not exposed)",
                            port, exc)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
        from pydantic import ValidationError

        try:
            messages = _messages(model_input)
            try:
                # MLflow fills absent params with the signature's defaults; 0 there means "the server's".
                given = {k: v for k, v in (params or {}).items()
                         if v is not None and not (k in UNSET_IS_ZERO and v == 0)}
                chat = ChatParams(**given)
            except ValidationError as exc:
                raise BadRequest("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
            return self.agent.reply(messages, chat)
        except BadRequest as exc:
            raise MlflowException(f"bad request: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
        except OverBudget as exc:
            raise MlflowException(str(exc), error_code=DEADLINE_EXCEEDED) from None


def _messages(model_input: Any) -> Any:
    """The one conversation of a request (MLflow hands the ``messages`` column over as a DataFrame)."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        if list(model_input.columns) != ["messages"]:
            raise BadRequest(f"expected only the field 'messages', got {list(model_input.columns)}")
        if len(model_input) != 1:
            raise BadRequest(f"one conversation per request, got {len(model_input)}")
        model_input = model_input["messages"].iloc[0]
    elif isinstance(model_input, dict):
        model_input = model_input.get("messages")
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return model_input


UNSET_IS_ZERO = ("max_tokens", "timeout_s")
"""Params whose signature default is 0, meaning "not given": the server's default / its whole budget."""


def signature():
    """Input: the messages; params: the request's knobs (MLflow checks their types, we check their ranges)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema
    return ModelSignature(
        inputs=Schema([ColSpec(Array(Object([Property("role", "string"), Property("content", "string")])), "messages")]),
        params=ParamSchema([
            ParamSpec("max_tokens", "long", 0),
            ParamSpec("temperature", "double", None),
            ParamSpec("tools", "boolean", None),
            ParamSpec("timeout_s", "double", 0.0),
            ParamSpec("seed", "long", 0),
        ]),
    )


INPUT_EXAMPLE = ({"messages": [{"role": "user", "content": "What is 3 plus 4?"}]}, {"max_tokens": 8})


def _requirements() -> list[str]:
    # Pinned from what is installed: MLflow would otherwise infer them by loading the model in a subprocess.
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors", "prometheus_client")]


# ---------------------------------------------------------------------------------------------- registry


def _client(tracking_uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def register_agent(artifact_uri: str, *, tracking_uri: str, name: str, run_id: str | None = None,
                   experiment: str | None = None, alias: str = "candidate", test_metrics: dict[str, float] | None = None,
                   tags: dict[str, str] | None = None, run_url: str | None = None) -> dict[str, Any]:
    """Log the verified final artifact as an MLflow model in ``run_id``, register it as ``name``, set ``alias``.

    The version's tags carry the artifact URI and digest, the run ids and every test metric (``test.<k>``),
    which `promote` compares. Returns {"name", "version", "model_uri", "seconds"}.
    """
    import mlflow

    from tasks.store import Store

    t0 = time.monotonic()
    client = _client(tracking_uri)
    store = Store(artifact_uri)
    with tempfile.TemporaryDirectory(prefix="forge-register-") as tmp:
        local = Path(tmp) / ARTIFACT_KEY
        manifest = store.download(store.url, local)  # every file hashed as it arrives
        if run_id is None:
            exp = client.get_experiment_by_name(experiment or name)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment or name)
            run_id = client.create_run(exp_id, run_name=f"register-{name}").info.run_id
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(ENTRY), artifacts={ARTIFACT_KEY: str(local)},
                signature=signature(), input_example=INPUT_EXAMPLE, pip_requirements=_requirements(),
            )
    version_tags = {"forge.artifact_uri": store.url, "forge.artifact_digest": manifest["digest"],
                    "forge.mlflow_run_id": run_id, **(tags or {})}
    version_tags.update({f"test.{k}": repr(float(v)) for k, v in (test_metrics or {}).items()})
    mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    description = f"Final agent of MLflow run {run_id}" + (f": run page and its report {run_url}" if run_url else "")
    description += f". Artifact {store.url} (manifest sha256 {manifest['digest'][:16]}...)."
    client.update_model_version(name, mv.version, description=description)
    client.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": int(mv.version), "model_uri": f"models:/{name}@{alias}",
            "seconds": time.monotonic() - t0}


class PromotionRefused(Exception):
    """`forge promote` will not move the alias (worse test metrics, nothing to compare, bad artifact)."""


def _test_metrics(version) -> dict[str, float]:
    return {k[len("test."):]: float(v) for k, v in version.tags.items() if k.startswith("test.")}


def _resolve_version(client, name: str, ref: str):
    if ref.isdigit():
        return client.get_model_version(name, ref)
    found = client.search_model_versions(f"name='{name}' and run_id='{ref}'")
    if not found:
        raise PromotionRefused(f"{ref!r} is neither a version of {name!r} nor a run with a registered version")
    return max(found, key=lambda v: int(v.version))


def compare(candidate: dict[str, float], champion: dict[str, float]) -> list[str]:
    """The headline test metrics on which ``candidate`` is worse than ``champion`` (point estimates)."""
    worse = []
    for metric, higher in HIGHER_IS_BETTER.items():
        if metric in candidate and metric in champion:
            c, h = candidate[metric], champion[metric]
            if (c < h) if higher else (c > h):
                worse.append(f"{metric}: {c:.4g} vs champion {h:.4g} ({'higher' if higher else 'lower'} is better)")
    return worse


def promote(tracking_uri: str, name: str, ref: str, alias: str = "champion", force: bool = False,
            verify: bool = True) -> str:
    """Point ``alias`` at the version ``ref`` (a version number or a run id); returns what was done.

    Refuses (PromotionRefused) when the version has no test metrics, when any headline test metric is
    worse than the current holder's, or when its artifact does not verify against its manifest; ``force``
    overrides the first two, never the third.
    """
    import mlflow

    from tasks.store import Store

    client = _client(tracking_uri)
    version = _resolve_version(client, name, ref)
    if verify:
        with tempfile.TemporaryDirectory(prefix="forge-promote-") as tmp:
            path = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp)
            folder = Path(path) / "artifacts" / ARTIFACT_KEY
            Store(f"file://{folder}").verify(f"file://{folder}", expected_digest=version.tags.get("forge.artifact_digest"))
    candidate = _test_metrics(version)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MLflow raises when the alias is not set
        current = None
    problems: list[str] = []
    if current is not None and str(current.version) != str(version.version):
        if not candidate:
            problems.append(f"version {version.version} has no test metrics to compare")
        problems += compare(candidate, _test_metrics(current))
    if problems and not force:
        raise PromotionRefused(f"not moving {name}@{alias} from version {current.version} to {version.version}: "
                               + "; ".join(problems) + " (use --force to promote anyway)")
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, f"forge.promoted.{alias}",
                                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + (" forced" if problems else ""))
    was = f" (was version {current.version})" if current is not None else ""
    return f"{name}@{alias} -> version {version.version}{was}" + (f"; forced past: {'; '.join(problems)}" if problems else "")


# ---------------------------------------------------------------------------------------------- stats


def stats_table(text: str) -> str:
    """A plain-text summary of a /metrics page: per route and outcome, requests, latency, tokens, tool calls."""
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            route = s.labels.get("route")
            if route is None:
                continue
            r = rows.setdefault(route, {"requests": {}, "seconds": 0.0, "n": 0, "tokens": 0, "prompt": 0, "tools": {}})
            if s.name == "forge_agent_requests_total":
                r["requests"][s.labels["status"]] = int(s.value)
            elif s.name == "forge_agent_request_seconds_sum":
                r["seconds"] = s.value
            elif s.name == "forge_agent_request_seconds_count":
                r["n"] = int(s.value)
            elif s.name == "forge_agent_request_seconds_bucket":
                buckets.setdefault(route, []).append((float(s.labels["le"]), s.value))
            elif s.name == "forge_agent_generated_tokens_total":
                r["tokens"] = int(s.value)
            elif s.name == "forge_agent_prompt_tokens_total":
                r["prompt"] = int(s.value)
            elif s.name == "forge_agent_tool_calls_total":
                key = f"{s.labels['tool']}({'ok' if s.labels['ok'] == 'true' else 'failed'})"
                r["tools"][key] = int(s.value)
    if not rows:
        return "no requests recorded yet"
    lines = [f"{'route':<11} {'requests':<32} {'mean s':>8} {'p50 <=':>7} {'p95 <=':>7} {'gen tok':>8} {'prompt tok':>10}  tool calls"]
    for route, r in sorted(rows.items()):
        mean = r["seconds"] / r["n"] if r["n"] else float("nan")
        q = {p: _bucket_bound(sorted(buckets.get(route, [])), p) for p in (0.5, 0.95)}
        reqs = ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))
        tools = ", ".join(f"{k} {v}" for k, v in sorted(r["tools"].items())) or "-"
        lines.append(f"{route:<11} {reqs:<32} {mean:>8.3f} {q[0.5]:>7} {q[0.95]:>7} {r['tokens']:>8} {r['prompt']:>10}  {tools}")
    lines.append("p50/p95: the upper bound of the histogram bucket that holds that quantile (not interpolated).")
    return "\n".join(lines)


def _bucket_bound(cumulative: list[tuple[float, float]], q: float) -> str:
    if not cumulative or cumulative[-1][1] == 0:
        return "-"
    total = cumulative[-1][1]
    for bound, count in cumulative:
        if count >= q * total:
            return "inf" if bound == float("inf") else f"{bound:g}"
    return "inf"


# ---------------------------------------------------------------------------------------------- CLI


def _tracking_uri(args) -> str:
    from tasks.store import Store
    from tasks.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, Store(args.store or os.environ.get("FORGE_STORE", "file://./forge-store")))


def _model_dir(ref: str, tracking_uri: str, tmp: str) -> Path:
    """The local artifact folder of a model URI (models:/..., runs:/...) or an artifact folder/URI."""
    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        _client(tracking_uri)
        return Path(mlflow.artifacts.download_artifacts(ref, dst_path=tmp)) / "artifacts" / ARTIFACT_KEY
    if "://" in ref:
        from tasks.store import Store

        store = Store(ref)
        store.download(store.url, Path(tmp) / ARTIFACT_KEY)
        return Path(tmp) / ARTIFACT_KEY
    return Path(ref)


def cmd_chat(args) -> int:
    with tempfile.TemporaryDirectory(prefix="forge-chat-") as tmp:
        agent = Agent.load(_model_dir(args.model, _tracking_uri(args), tmp))
        tools = False if args.no_tools else None  # None: the artifact's agent.json decides (else on)
        history: list[dict[str, str]] = []
        print(f"chatting with {args.model} (artifact {agent.digest[:12]}); /reset, /tools on|off, /quit")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                return 0
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                history = []
                continue
            if line.startswith("/tools"):
                tools = line.endswith("on")
                print(f"tools {'on' if tools else 'off'}")
                continue
            if not line:
                continue
            try:
                out = agent.reply(history + [{"role": "user", "content": line}],
                                  ChatParams(max_tokens=args.max_tokens, temperature=args.temperature, tools=tools))
            except (BadRequest, OverBudget) as exc:
                print(f"error: {exc}")
                continue
            answer = out["choices"][0]["message"]["content"]
            for call in out["custom_outputs"]["tool_calls"]:
                print(f"  [tool] {call['name']}({call['arguments']}) -> {call['result'] if call['ok'] else call['error']}")
            u = out["usage"]
            print(f"agent> {answer}\n  ({u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                  f"{out['custom_outputs']['latency_s']:.2f} s)")
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def cmd_serve(args) -> int:
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    env = dict(os.environ, MLFLOW_TRACKING_URI=_tracking_uri(args), FORGE_METRICS_PORT=str(args.metrics_port),
               PATH=f"{Path(mlflow_bin).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # MLflow execs `uvicorn`
    cmd = [mlflow_bin, "models", "serve", "-m", args.model, "--env-manager", "local", "-h", args.host,
           "-p", str(args.port)]
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations; metrics on "
          f"http://127.0.0.1:{args.metrics_port}/metrics\n$ {' '.join(cmd)}", flush=True)
    os.execve(mlflow_bin, cmd, env)
    return 0  # not reached


def cmd_stats(args) -> int:
    import urllib.request

    with urllib.request.urlopen(args.url, timeout=10) as r:
        print(stats_table(r.read().decode()))
    return 0


def cmd_register(args) -> int:
    out = register_agent(args.uri, tracking_uri=_tracking_uri(args), name=args.name, alias=args.alias)
    print(f"registered {out['name']} version {out['version']} as {out['model_uri']} in {out['seconds']:.1f} s")
    return 0


def cmd_promote(args) -> int:
    try:
        print(promote(_tracking_uri(args), args.name, args.ref, args.alias, args.force))
    except PromotionRefused as exc:
        print(f"forge promote: refused: {exc}", file=sys.stderr)
        return 1
    return 0


def _where(p) -> None:
    p.add_argument("--store", help="Store root whose SQLite MLflow database to use (default: $FORGE_STORE or ./forge-store).")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store's database).")


def main(command: str, argv: list[str]) -> int:
    import argparse

    if command == "promote":
        p = argparse.ArgumentParser(prog="forge promote", description="Move a registry alias to a version, "
                                    "refusing one with worse test metrics than the alias's current version.")
        p.add_argument("ref", help="A version number of the registered model, or the MLflow run id that logged it.")
        p.add_argument("--alias", default="champion")
        p.add_argument("--name", default="agent-forge", help="Registered model name (the pipeline's name).")
        p.add_argument("--force", action="store_true", help="Promote even if its test metrics are worse.")
        _where(p)
        return cmd_promote(p.parse_args(argv))
    p = argparse.ArgumentParser(prog="forge agent", description="The served agent.")
    sub = p.add_subparsers(dest="sub", required=True)
    s = sub.add_parser("serve", help="mlflow models serve the registered agent (--env-manager local).")
    s.add_argument("-m", "--model", default="models:/agent-forge@champion")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5001)
    s.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    _where(s)
    c = sub.add_parser("chat", help="Interactive chat with a registered model or a local artifact.")
    c.add_argument("model", nargs="?", default="models:/agent-forge@champion",
                   help="models:/NAME@ALIAS, runs:/ID/agent, an artifact URI or a local artifact folder.")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--no-tools", action="store_true")
    _where(c)
    st = sub.add_parser("stats", help="Summarise a running server's Prometheus metrics.")
    st.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics")
    r = sub.add_parser("register", help="Log and register a final artifact (the flow does this at the end of a run).")
    r.add_argument("uri", help="The final artifact's URI (or folder).")
    r.add_argument("--name", default="agent-forge")
    r.add_argument("--alias", default="candidate")
    _where(r)
    args = p.parse_args(argv)
    return {"serve": cmd_serve, "chat": cmd_chat, "stats": cmd_stats, "register": cmd_register}[args.sub](args)
