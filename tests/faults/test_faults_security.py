"""Security checks: every server this project starts binds loopback; no literal secret in code or configs;
credentials of the infra files come from the environment or secrets (tests/unit/test_infra.py checks those
files rule by rule; here the whole tree is scanned). Each scanner is first shown to catch a bad sample.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.fault

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SCANNED = ("forge_models", "tasks", "flows", "deployments", "tests", "bench", "Makefile", "pyproject.toml")
# Where the project starts a listener, and how its address is given.
BIND_PATTERNS = [
    re.compile(r"""["']--host["']\s*,\s*["']([^"']+)["']"""),          # [..., "--host", "ADDR", ...]
    re.compile(r"""--host[ =]([^\s"'{}`]+)"""),                         # "... --host ADDR ..."
    re.compile(r"""["']-H["']\s*,\s*["']([^"']+)["']"""),              # moto_server -H ADDR
    re.compile(r"""ip_address\s*=\s*["']([^"']+)["']"""),              # ThreadedMotoServer(ip_address=...)
    re.compile(r"""HTTPServer\(\s*\(\s*["']([^"']*)["']"""),           # http.server on (ADDR, port)
    re.compile(r"""\.bind\(\s*\(\s*["']([^"']*)["']"""),               # raw sockets
    re.compile(r"""\bhost\s*=\s*["']([^"']+)["']"""),                  # uvicorn / serve(host=...)
]
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{40}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
    "password literal": re.compile(r"(?i)\b(password|passwd|secret|api_key|token)\s*[=:]\s*[\"'](?!\$)([^\"'\s]{8,})[\"']"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+]*://[^/\s:@'\"{}]+:[^/\s@'\"{}$]{6,}@"),
}
ALLOWED_LITERALS = {"testing", "forge-local", "forge-local-secret"}  # dummy keys for loopback moto only


def _files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", *SCANNED, "infra", "README.md", "docs"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in tracked if (ROOT / f).is_file() and not f.endswith((".png", ".gguf", ".safetensors"))]


def bind_addresses(text: str) -> list[str]:
    return [m.group(1) for p in BIND_PATTERNS for m in p.finditer(text)]


def secrets_in(text: str) -> list[str]:
    found = []
    for name, pattern in SECRET_PATTERNS.items():
        for m in pattern.finditer(text):
            literal = m.group(m.lastindex) if m.lastindex else m.group(0)
            if literal not in ALLOWED_LITERALS:
                found.append(f"{name}: {m.group(0)[:40]}")
    return found


def test_scanners_catch_bad_samples():
    assert bind_addresses('cmd = ["prefect", "server", "start", "--host", "0.0.0.0"]') == ["0.0.0.0"]
    assert bind_addresses("mlflow ui --host 0.0.0.0 --port 5000") == ["0.0.0.0"]
    assert bind_addresses('ThreadedMotoServer(ip_address="0.0.0.0")') == ["0.0.0.0"]
    assert bind_addresses('ThreadingHTTPServer(("", 0), H)') == [""]
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert secrets_in(f"aws_access_key_id = {fake_key}")
    assert secrets_in("password = 'hunter2hunter2'") and not secrets_in('password = "${PG_PASSWORD}"')
    assert secrets_in("postgresql://forge:" + "s3cretpass@db/forge")
    assert secrets_in("-----BEGIN RSA " + "PRIVATE KEY-----")
    assert not secrets_in('AWS_SECRET_ACCESS_KEY="testing"')


def test_every_server_we_start_binds_loopback(fault_row):
    found = {}
    for path in _files():
        if path.parts[-3:-1] == ("infra",) or "infra" in path.relative_to(ROOT).parts:
            continue  # containers listen on 0.0.0.0 inside their network; their published ports: test_infra.py
        if path.name == "test_faults_security.py":
            continue
        for addr in bind_addresses(path.read_text(errors="replace")):
            found.setdefault(addr, []).append(path.relative_to(ROOT).as_posix())
    bad = {a: f for a, f in found.items() if a not in LOOPBACK}
    assert not bad, f"servers bound beyond loopback: {bad}"
    assert len([f for files in found.values() for f in files]) >= 5, found  # the scan did find our servers
    # and at run time: the test proxy and the moto fixture answer on loopback only
    from tests.faults.flaky_s3 import FlakyS3Proxy

    with FlakyS3Proxy("http://127.0.0.1:9") as proxy:
        assert proxy.server.server_address[0] == "127.0.0.1"
    fault_row(fault="a server reachable from the network",
              injected=f"scan of every tracked source/config file for listen addresses ({sum(map(len, found.values()))} "
                       "found: Prefect, MLflow, moto, stack, fixtures, proxy)",
              did="every one binds 127.0.0.1; compose publishes ports on 127.0.0.1 only (test_infra.py)",
              lost="nothing")


def test_no_literal_secret_in_code_or_configs(fault_row):
    hits = {}
    files = _files()
    for path in files:
        if path.name in ("test_faults_security.py", "test_infra.py"):
            continue  # these hold bad samples on purpose, to show their checkers reject them
        found = secrets_in(path.read_text(errors="replace"))
        if found:
            hits[path.relative_to(ROOT).as_posix()] = found
    assert not hits, hits
    fault_row(fault="a literal secret committed",
              injected=f"scan of {len(files)} tracked files for AWS keys, private keys, tokens, passwords, URLs "
                       "with credentials",
              did="none found; infra files take every credential from the environment or Kubernetes secrets "
                  "(test_infra.py)", lost="nothing")


def test_loopback_only_means_unreachable_elsewhere():
    """A loopback listener refuses a connection to this host's other addresses (where it has any)."""
    from tests.faults.flaky_s3 import FlakyS3Proxy

    others = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    others = {a for a in others if not a.startswith("127.")}
    if not others:
        pytest.skip("this host has no non-loopback IPv4 address")
    with FlakyS3Proxy("http://127.0.0.1:9") as proxy:
        port = proxy.server.server_address[1]
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
