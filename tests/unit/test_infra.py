"""Checks of the infrastructure files in infra/ that need neither a Docker engine nor a cluster.

What needs an engine or a cluster (building the images, starting the stack, GPU reservation, rendering the
Helm charts, applying manifests) is not run here; infra/README.md says so. The checker helpers are also run
on small bad inputs, so each rule is shown to reject what it should.
"""

from __future__ import annotations

import ast
import asyncio
import fnmatch
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
WORKER_VALUES = INFRA / "k8s" / "prefect-worker-values.yaml"
SERVER_VALUES = INFRA / "k8s" / "prefect-server-values.yaml"
K8S_MANIFESTS = [INFRA / "k8s" / "mlflow.yaml"]

SECRET_KEY = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|AUTH", re.I)
# ${VAR}, ${VAR?msg}, ${VAR:?msg}: a value the environment must provide (no literal fallback).
REQUIRED_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
KNOWN_DEFAULT_CREDENTIALS = ("minioadmin", "password1234", "prefect-rocks", "admin:pass", "changeme")
URL_WITH_CREDENTIALS = re.compile(r"[a-z0-9+]+://[^/\s:@'\"]+:[^/\s@'\"]+@")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker"):
        warnings.warn(
            f"docker CLI at {shutil.which('docker')}: nothing is built or started by these tests "
            "(no engine here); see infra/README.md",
            stacklevel=1,
        )
    return yaml.safe_load(COMPOSE.read_text())


def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def env_example() -> dict[str, tuple[str, list[str]]]:
    """VAR -> (value, comment lines just above it)."""
    out: dict[str, tuple[str, list[str]]] = {}
    comments: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        s = line.strip()
        if not s:
            comments = []
        elif s.startswith("#"):
            comments.append(s)
        else:
            key, _, value = s.partition("=")
            out[key.strip()] = (value.strip(), comments)
            comments = []
    return out


def strings(obj):
    """Every string in a parsed YAML document (keys and values); comments are not part of it."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


def compose_variables(compose: dict) -> set[str]:
    return {m.group(1) for s in strings(compose) for m in VAR_REF.finditer(s)}


def interpolated(obj, values: dict[str, str]):
    """The parsed compose file with every string interpolated."""
    if isinstance(obj, dict):
        return {k: interpolated(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolated(v, values) for v in obj]
    return interpolate(obj, values) if isinstance(obj, str) else obj


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:?msg}, ${VAR:-default} interpolation (enough for these files)."""

    def sub(m: re.Match) -> str:
        name, rest = m.group(1), m.group(2)
        if values.get(name):
            return values[name]
        if rest.startswith((":-", "-")):
            return rest.split("-", 1)[1]
        raise KeyError(f"{name} is required and has no value")

    return VAR_REF.sub(sub, text).replace("$$", "$")


def secret_problems(env: dict[str, str]) -> list[str]:
    """Secret-looking keys whose value is not a required ${VAR} reference."""
    return [f"{k}={v!r}" for k, v in env.items() if SECRET_KEY.search(k) and not REQUIRED_REF.match(v)]


def port_problems(ports: list) -> list[str]:
    bad = []
    for p in ports or []:
        if isinstance(p, dict):
            if p.get("host_ip") != "127.0.0.1":
                bad.append(str(p))
        elif not str(p).startswith("127.0.0.1:"):
            bad.append(str(p))
    return bad


def published_container_ports(ports: list) -> set[int]:
    out = set()
    for p in ports or []:
        target = p["target"] if isinstance(p, dict) else str(p).rsplit(":", 1)[-1].split("/")[0]
        out.add(int(target))
    return out


def dockerfile_copy_sources(dockerfile: Path) -> list[str]:
    """Sources of COPY/ADD instructions that come from the build context (not --from=stage)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources = []
    for line in text.splitlines():
        parts = line.strip().split()
        if not parts or parts[0].upper() not in ("COPY", "ADD"):
            continue
        args = parts[1:]
        if any(a.startswith("--from") for a in args):
            continue
        args = [a for a in args if not a.startswith("--")]
        if args and args[0].startswith("["):
            args = json.loads(" ".join(args))
        sources += args[:-1]
    return sources


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether a context-relative path is excluded (last matching pattern wins, as in Docker)."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if path == pat or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat):
            ignored = not negate
    return ignored


def dockerignore_patterns(dockerfile: Path) -> list[str] | None:
    f = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not f.exists():
        return None
    return [s for s in (ln.strip() for ln in f.read_text().splitlines()) if s and not s.startswith("#")]


def builds(compose: dict) -> list[tuple[str, Path, Path]]:
    out = []
    for name, svc in services(compose).items():
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            out.append((name, context, context / svc["build"].get("dockerfile", "Dockerfile")))
    return out


def is_flow(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(target, ast.Name) and target.id == "flow") or (
                    isinstance(target, ast.Attribute) and target.attr == "flow"
                ):
                    return True
    return False


def placeholders(obj) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(json.dumps(obj))}


def worker_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in services(compose).items() if (s.get("command") or [])[:3] == ["prefect", "worker", "start"]}


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


# ----------------------------------------------------------------------------- parsing


def test_every_yaml_and_json_file_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert COMPOSE in files and TEMPLATE in files and WORKER_VALUES in files and SERVER_VALUES in files
    for f in files:
        docs = [json.loads(f.read_text())] if f.suffix == ".json" else list(yaml.safe_load_all(f.read_text()))
        assert docs and all(d for d in docs), f"{f.relative_to(ROOT)} is empty"


# ----------------------------------------------------------------------------- compose: variables and secrets


def test_every_compose_variable_is_documented_in_env_example(compose):
    used = compose_variables(compose)
    documented = env_example()
    assert used, "compose.yaml reads no variable at all"
    assert sorted(used - set(documented)) == [], "variables used in compose.yaml but missing from .env.example"
    assert sorted(set(documented) - used) == [], "variables in .env.example that compose.yaml never reads"
    assert [k for k, (_, comments) in documented.items() if not comments] == [], "variables without a comment"


def test_env_example_has_no_secret_values():
    filled = {k: v for k, (v, _) in env_example().items() if SECRET_KEY.search(k) and v}
    assert filled == {}, "secret values must stay empty in .env.example"


def test_compose_secrets_come_only_from_the_environment(compose):
    problems = {name: secret_problems(env_of(svc)) for name, svc in services(compose).items()}
    assert {k: v for k, v in problems.items() if v} == {}
    # the rule itself: literals and defaulted references are refused, required references pass
    assert secret_problems({"POSTGRES_PASSWORD": "hunter2", "AWS_SECRET_ACCESS_KEY": "${X:-dflt}"}) != []
    assert len(secret_problems({"POSTGRES_PASSWORD": "hunter2", "AWS_SECRET_ACCESS_KEY": "${X:-dflt}"})) == 2
    assert secret_problems({"PGPASSWORD": "${DB_PASSWORD:?set it}", "FORGE_STORE": "s3://forge"}) == []


def test_no_credential_literal_anywhere_in_infra():
    for f in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = f.read_text(errors="replace")
        for word in KNOWN_DEFAULT_CREDENTIALS:
            assert word not in text.lower(), f"{f.relative_to(ROOT)} contains the default credential {word!r}"
        assert not URL_WITH_CREDENTIALS.search(text), f"{f.relative_to(ROOT)} has a URL with user:password@"
    assert URL_WITH_CREDENTIALS.search("postgresql://prefect:secret@db:5432/prefect")
    assert not URL_WITH_CREDENTIALS.search("postgresql+psycopg2:///mlflow")


def test_env_file_is_git_ignored():
    out = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT, check=False)
    assert out.returncode == 0, "infra/.env (the filled-in credentials) must be git-ignored"


def test_compose_interpolates_with_every_variable_set(compose):
    values = {k: f"test-{k.lower()}" for k in env_example()}
    rendered = interpolated(compose, values)
    assert env_of(rendered["services"]["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"] == "test-prefect_auth_string"
    assert rendered["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [
        "test-worker_gpu0_device"
    ]
    assert interpolate("${WORKER_GPU0_DEVICE:-0}", {}) == "0"
    with pytest.raises(KeyError, match="PREFECT_DB_PASSWORD"):
        interpolated(compose, {**values, "PREFECT_DB_PASSWORD": ""})


# ----------------------------------------------------------------------------- compose: exposure


def test_published_ports_are_bound_to_loopback(compose):
    problems = {n: port_problems(s.get("ports")) for n, s in services(compose).items()}
    assert {n: p for n, p in problems.items() if p} == {}
    assert port_problems(["4200:4200", {"target": 5000, "published": 5000}, "127.0.0.1:9000:9000"]) == [
        "4200:4200",
        str({"target": 5000, "published": 5000}),
    ]


def test_only_the_uis_and_the_s3_api_are_published(compose):
    published = {n: published_container_ports(s.get("ports")) for n, s in services(compose).items()}
    assert {n: p for n, p in published.items() if p} == {
        "prefect-server": {4200},
        "mlflow": {5000},
        "minio": {9000, 9001},
    }


def test_databases_publish_nothing_and_sit_on_internal_networks(compose):
    nets = compose.get("networks") or {}
    dbs = {n: s for n, s in services(compose).items() if str(s.get("image", "")).startswith("postgres")}
    assert set(dbs) == {"prefect-db", "mlflow-db"}
    for name, db in dbs.items():
        assert not db.get("ports") and not db.get("expose"), f"{name} must not publish ports"
        assert db.get("networks"), f"{name} must join only named internal networks"
        for net in db["networks"]:
            assert (nets.get(net) or {}).get("internal") is True, f"{name}: network {net} must be internal"
            members = [n for n, s in services(compose).items() if net in (s.get("networks") or [])]
            assert len(members) == 2, f"only {name} and its server may join {net}, not {members}"


# ----------------------------------------------------------------------------- compose: health and order


def test_long_running_services_have_healthchecks_and_dependencies_have_conditions(compose):
    svcs = services(compose)
    for name, svc in svcs.items():
        if svc.get("restart") != "no":
            assert "test" in (svc.get("healthcheck") or {}), f"{name} has no healthcheck"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            cond = spec.get("condition")
            assert cond in ("service_healthy", "service_completed_successfully"), f"{name} -> {dep}: {cond}"
            if cond == "service_healthy":
                assert svcs[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy, which has no healthcheck"
            else:
                assert svcs[dep].get("restart") == "no", f"{dep} is awaited to finish but restarts"
    assert svcs["mlflow"]["depends_on"]["mlflow-db"]["condition"] == "service_healthy"
    assert svcs["prefect-server"]["depends_on"]["prefect-db"]["condition"] == "service_healthy"


# ----------------------------------------------------------------------------- images and mounted files


def test_dockerfiles_and_copy_sources_exist(compose):
    found = builds(compose)
    assert {n for n, _, _ in found} >= {"mlflow", "worker-gpu0"}
    for name, context, dockerfile in found:
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        sources = dockerfile_copy_sources(dockerfile)
        assert sources, f"{dockerfile.name} copies nothing"
        patterns = dockerignore_patterns(dockerfile)
        for src in sources:
            assert (context / src).exists(), f"{dockerfile.name}: COPY source {src} not in {context}"
            if patterns is not None:
                assert not dockerignored(src.strip("./"), patterns), f"{dockerfile.name}: {src} is dockerignored"
    assert dockerignored(".venv/bin/python", ["*", "!flows/"]) and not dockerignored("flows", ["*", "!flows/"])


def test_worker_image_installs_the_lock_then_the_project(compose):
    dockerfile = INFRA / "worker.Dockerfile"
    text = dockerfile.read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M) and re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+runtime", text)
    lock, editable = text.index("pip install -r requirements.lock"), text.index("pip install --no-deps")
    assert lock < editable and " -e ." in text[editable : editable + 80]
    assert dockerfile_copy_sources(dockerfile)[0] == "requirements.lock"
    assert re.search(r"^USER 10001$", text, re.M), "the worker must not run as root"


def test_mlflow_image_and_server_command(compose):
    text = (INFRA / "mlflow.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and '"mlflow[auth]==3.17.2"' in text
    assert "psycopg2-binary" in text and "boto3==1.43.117" in text
    mlflow = services(compose)["mlflow"]
    cmd = mlflow["command"]
    assert "--app-name=basic-auth" in cmd
    backend = next(a.split("=", 1)[1] for a in cmd if a.startswith("--backend-store-uri="))
    dest = next(a.split("=", 1)[1] for a in cmd if a.startswith("--artifacts-destination="))
    assert backend.startswith("postgresql") and dest.startswith("s3://")
    assert "--no-serve-artifacts" not in cmd
    env = env_of(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["PGHOST"] in services(compose) and env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_bind_mount_sources_exist(compose):
    mounts = []
    for name, svc in services(compose).items():
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                mounts.append((name, src))
    assert mounts, "expected the init scripts to be bind-mounted"
    for name, src in mounts:
        assert (COMPOSE.parent / src).exists(), f"{name}: bind-mount source {src} missing"
    init = (INFRA / "minio" / "init.sh").read_text()
    assert "mc mb" in init and "forge/forge" in init.replace("$bucket", "forge")


# ----------------------------------------------------------------------------- workers and work pools


def test_compose_workers_one_gpu_each_on_the_process_pool(compose):
    workers = worker_services(compose)
    assert "worker-gpu0" in workers
    names = set()
    for name, svc in workers.items():
        cmd = [str(c) for c in svc["command"]]
        assert cmd[:3] == ["prefect", "worker", "start"], name
        assert (flag(cmd, "--pool"), flag(cmd, "--type"), flag(cmd, "--limit")) == ("forge-gpu", "process", "1"), name
        names.add(flag(cmd, "--name"))
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert len(devices[0]["device_ids"]) == 1, f"{name} must reserve exactly one GPU"
        env = env_of(svc)
        assert env["CUDA_VISIBLE_DEVICES"] == "0", "the one reserved GPU is device 0 inside the container"
        assert env["FORGE_STORE"] == "s3://forge/store"
        for key, service, port in (("PREFECT_API_URL", "prefect-server", 4200), ("MLFLOW_TRACKING_URI", "mlflow", 5000),
                                   ("AWS_ENDPOINT_URL_S3", "minio", 9000)):
            assert env[key].startswith(f"http://{service}:{port}"), f"{name}: {key}={env[key]}"
            assert service in services(compose)
        assert REQUIRED_REF.match(env["PREFECT_API_AUTH_STRING"])
        assert svc["build"]["dockerfile"] == "infra/worker.Dockerfile"
    assert len(names) == len(workers), "worker names must be unique"
    # the image's default command polls the same pool
    cmd = re.search(r"^CMD (\[.*\])$", (INFRA / "worker.Dockerfile").read_text(), re.M).group(1)
    assert flag(json.loads(cmd), "--pool") == "forge-gpu"


def test_pool_names_agree_across_compose_helm_and_readme(compose):
    readme = (INFRA / "README.md").read_text()
    created = dict(re.findall(r"prefect work-pool create ([\w-]+) --type ([\w-]+)", readme))
    pools = {flag([str(c) for c in s["command"]], "--pool"): flag([str(c) for c in s["command"]], "--type")
             for s in worker_services(compose).values()}
    helm = yaml.safe_load(WORKER_VALUES.read_text())["worker"]["config"]
    pools[helm["workPool"]] = helm["type"]
    assert pools == {"forge-gpu": "process", "forge-k8s": "kubernetes"}
    assert {p: created.get(p) for p in pools} == pools, "README must show how each pool is created"
    assert "--base-job-template infra/k8s/base-job-template.json" in readme
    assert "worker.config.baseJobTemplate.configuration=infra/k8s/base-job-template.json" in WORKER_VALUES.read_text()


def test_flow_entrypoints_referenced_anywhere_exist():
    files = [p for p in INFRA.rglob("*") if p.is_file()] + list((ROOT / "deployments").glob("*.y*ml"))
    refs = set()
    for f in files:
        refs |= set(re.findall(r"\b((?:[\w-]+/)*[\w-]+\.py):([A-Za-z_]\w*)", f.read_text(errors="replace")))
    assert ("flows/agent_forge.py", "agent_forge") in refs
    for path, func in sorted(refs):
        source = ROOT / path
        assert source.is_file(), f"entrypoint file {path} missing"
        assert is_flow(ast.parse(source.read_text()), func), f"{path} defines no @flow {func}"
    assert not is_flow(ast.parse("def agent_forge(): pass"), "agent_forge")


# ----------------------------------------------------------------------------- Kubernetes


def test_base_job_template_shape():
    tpl = json.loads(TEMPLATE.read_text())
    assert set(tpl) == {"job_configuration", "variables"}
    declared = set(tpl["variables"]["properties"])
    used = placeholders(tpl["job_configuration"])
    assert sorted(used - declared) == [], "placeholders not declared in variables.properties"
    assert sorted(declared - used) == [], "declared variables never used"
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    gpu = tpl["variables"]["properties"]["gpu_count"]
    assert gpu["type"] == "integer" and gpu["default"] == 1
    assert {"secretRef": {"name": "{{ store_secret_name }}"}} in container["envFrom"]
    # nothing mounted but scratch space; no service-account token; no host access
    assert pod["automountServiceAccountToken"] is False
    assert all(set(v) == {"name", "emptyDir"} for v in pod["volumes"]), "only emptyDir volumes"
    assert {m["name"] for m in container["volumeMounts"]} == {v["name"] for v in pod["volumes"]}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env_defaults = tpl["variables"]["properties"]["env"]["default"]
    assert [k for k in env_defaults if SECRET_KEY.search(k)] == [], "secrets come from the Secret, not env"
    assert env_defaults["FORGE_STORE"].startswith("s3://")


def test_base_job_template_is_valid_for_prefect_and_renders_the_gpu_limit():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import ValidationError, validate
    from prefect.workers.base import BaseJobConfiguration

    tpl = json.loads(TEMPLATE.read_text())
    pool = WorkPoolCreate(name="forge-k8s", type="kubernetes", base_job_template=tpl)
    assert pool.base_job_template == tpl
    bad = json.loads(TEMPLATE.read_text())
    del bad["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        WorkPoolCreate(name="forge-k8s", type="kubernetes", base_job_template=bad)

    # job variables are checked against the schema the way Prefect checks deployments' job_variables
    validate({"gpu_count": 2, "image": "registry/agent-forge-worker:1"}, tpl["variables"], raise_on_error=True)
    with pytest.raises(ValidationError):
        validate({"gpu_count": "two"}, tpl["variables"], raise_on_error=True)

    class KubernetesShapedConfiguration(BaseJobConfiguration):
        """The fields prefect-kubernetes' job configuration adds (that package is not installed here)."""

        namespace: str
        job_manifest: dict[str, Any]
        annotations: dict[str, str] = {}
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int
        stream_output: bool

    class NoClient:  # the template has no block or variable references, so no API call is made
        pass

    def render(values: dict) -> KubernetesShapedConfiguration:
        coro = KubernetesShapedConfiguration.from_template_and_values(tpl, values, client=NoClient())
        return asyncio.run(coro)

    default = render({})
    two = render({"gpu_count": 2, "env": {"EXTRA": "1"}})
    limits = lambda cfg: cfg.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]  # noqa: E731
    assert limits(default) == {"nvidia.com/gpu": 1}  # unset cpu/memory limits are dropped, not sent empty
    assert limits(two) == {"nvidia.com/gpu": 2}
    assert two.env["EXTRA"] == "1" and two.env["FORGE_STORE"] == "s3://forge/store"
    assert default.pod_watch_timeout_seconds == 900 and default.namespace == "agent-forge"
    manifest = default.job_manifest
    # what prefect-kubernetes' worker requires of a job manifest (its _get_base_job_manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    spec = manifest["spec"]["template"]["spec"]
    assert (spec["parallelism"], spec["completions"], spec["restartPolicy"]) == (1, 1, "Never")
    assert spec["containers"][0]["name"] == "prefect-job"
    assert manifest["metadata"]["namespace"] == "agent-forge"
    assert spec["containers"][0]["envFrom"][0] == {"secretRef": {"name": "forge-store-credentials"}}


def test_k8s_manifests_take_every_credential_from_secrets():
    docs = [d for f in K8S_MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service"}
    assert "Secret" not in {d["kind"] for d in docs}, "Secrets are created from a secret store, not from files here"
    checked = 0
    for d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            for e in c.get("env", []):
                if SECRET_KEY.search(e["name"]) or e["name"] in ("PGUSER", "PGHOST"):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"
                    checked += 1
            args = c.get("args", []) + c.get("command", [])
            assert "--app-name=basic-auth" in args
            assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in c["env"]
    assert checked >= 6


def test_helm_values_enable_auth_and_hold_no_credentials():
    server = yaml.safe_load(SERVER_VALUES.read_text())
    worker = yaml.safe_load(WORKER_VALUES.read_text())
    assert server["server"]["basicAuth"] == {"enabled": True, "existingSecret": "prefect-auth"}
    assert worker["worker"]["selfHostedServerApiConfig"]["basicAuth"] == {"enabled": True, "existingSecret": "prefect-auth"}
    assert server["postgresql"]["enabled"] is False and server["externalDatabase"]["existingSecret"]
    assert server["global"]["prefect"]["image"]["prefectTag"].startswith("3.9.1")
    assert worker["worker"]["image"]["prefectTag"].startswith("3.9.1")

    def literal_secrets(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from literal_secrets(v, f"{path}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from literal_secrets(v, f"{path}[{i}]")
        elif re.fullmatch(r"password|authString|apiKey|token|secret", path.rsplit(".", 1)[-1], re.I) and obj not in (None, ""):
            yield path

    assert list(literal_secrets(server)) == [] and list(literal_secrets(worker)) == []
    assert list(literal_secrets({"a": {"password": "x"}})) == [".a.password"]


# ----------------------------------------------------------------------------- settings read by the real code


def _apply_env(monkeypatch, env: dict[str, str], tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("PREFECT_", "MLFLOW_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_prefect_settings_from_the_compose_environment(compose, monkeypatch, tmp_path):
    from prefect.settings import Settings

    values = {k: f"value-of-{k.lower()}" for k in env_example()} | {"PREFECT_AUTH_STRING": "admin:s3cr3t/:@"}
    rendered = interpolated(compose, values)["services"]
    _apply_env(monkeypatch, env_of(rendered["prefect-server"]), tmp_path)
    server = Settings()
    url = server.server.database.connection_url.get_secret_value()
    assert url.startswith("postgresql+asyncpg://prefect:") and url.endswith("@prefect-db:5432/prefect")
    assert server.server.api.auth_string.get_secret_value() == "admin:s3cr3t/:@"
    assert server.server.api.csrf_protection_enabled is True

    _apply_env(monkeypatch, env_of(rendered["worker-gpu0"]), tmp_path)
    worker = Settings()
    assert worker.api.url == "http://prefect-server:4200/api"
    assert worker.api.auth_string.get_secret_value() == server.server.api.auth_string.get_secret_value()


def test_mlflow_reads_the_auth_config_as_intended(compose, monkeypatch, tmp_path):
    import importlib.util

    import mlflow
    import sqlalchemy

    # mlflow.server.auth itself needs Flask-WTF (installed in the server image only); its config reader doesn't
    spec = importlib.util.spec_from_file_location(
        "forge_mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    )
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)

    values = {k: f"value-of-{k.lower()}" for k in env_example()}
    env = env_of(interpolated(compose, values)["services"]["mlflow"])
    dockerfile = (INFRA / "mlflow.Dockerfile").read_text()
    ini_in_image = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", dockerfile).group(1)
    assert f"COPY mlflow/basic_auth.ini {ini_in_image}" in dockerfile
    _apply_env(monkeypatch, env | {"MLFLOW_AUTH_CONFIG_PATH": str(INFRA / "mlflow" / "basic_auth.ini")}, tmp_path)
    auth = config.read_auth_config()
    assert (auth.admin_username, auth.admin_password) == ("value-of-mlflow_admin_username", "value-of-mlflow_admin_password")
    url = sqlalchemy.make_url(auth.database_uri)
    assert url.get_backend_name() == "postgresql" and url.database == "mlflow_auth"
    assert url.password is None and url.host is None, "credentials and host come from PG* variables"
    assert {"PGHOST", "PGUSER", "PGPASSWORD"} <= set(env)
    initdb = "".join(p.read_text() for p in (INFRA / "mlflow" / "initdb").glob("*.sql"))
    assert "CREATE DATABASE mlflow_auth" in initdb


def test_serving_image_and_deployment():
    """infra/serving.Dockerfile copies what exists and is not dockerignored, runs `mlflow models serve` of the
    champion unprivileged; infra/k8s/agent-serving.yaml takes its MLflow user from a Secret, stays in-cluster."""
    dockerfile = INFRA / "serving.Dockerfile"
    text = dockerfile.read_text()
    patterns = dockerignore_patterns(dockerfile)
    assert patterns is not None
    for src in dockerfile_copy_sources(dockerfile):
        assert (ROOT / src).exists() and not dockerignored(src.strip("./"), patterns), src
    assert re.search(r"^USER 10001$", text, re.M)
    assert "mlflow models serve" in text and "--env-manager local" in text
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "agent-serving.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "NetworkPolicy"}
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert not [n for n, e in env.items() if SECRET_KEY.search(n) and "valueFrom" not in e]
    assert env["FORGE_MODEL_URI"]["value"].startswith("models:/") and "@champion" in env["FORGE_MODEL_URI"]["value"]
    assert next(d for d in docs if d["kind"] == "Service")["spec"]["type"] == "ClusterIP"
