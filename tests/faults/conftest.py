"""Fault-injection fixtures: child processes that are always killed (whole process group), and the rows of
docs/faults.md, recorded by the tests themselves.

``FORGE_FAULTS_TABLE=docs/faults.md pytest -m fault`` rewrites the table between its markers from the rows the
tests that ran recorded (with what they measured); a unit test checks that every row names a test that exists.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS: list[dict[str, str]] = []
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"


@pytest.fixture
def fault_row(request):
    """``fault_row(fault=, injected=, did=, lost=)``: one row of the table, written by the test that shows it."""

    def record(*, fault: str, injected: str, did: str, lost: str = "nothing") -> None:
        path, _, name = request.node.nodeid.partition("::")
        ROWS.append({"fault": fault, "injected": injected, "did": did, "lost": lost,
                     "test": f"`{Path(path).name}::{name}`"})

    return record


def render_table(rows: list[dict[str, str]]) -> str:
    head = "| fault | how it is injected | what the system did | what was lost | test |\n|---|---|---|---|---|\n"
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return head + "\n".join(
        f"| {cell(r['fault'])} | {cell(r['injected'])} | {cell(r['did'])} | {cell(r['lost'])} | {r['test']} |"
        for r in rows
    ) + "\n"


def _test_cell(item) -> str:
    path, _, name = item.nodeid.partition("::")
    return f"`{Path(path).name}::{name}`"


def pytest_sessionfinish(session, exitstatus):
    """Rewrite the table: rows of the tests collected in this session are replaced by what they recorded now
    (a collected test that recorded nothing loses its row); rows of tests not collected are kept as they were,
    so rerunning one file updates its rows only."""
    target = os.environ.get("FORGE_FAULTS_TABLE")
    if not target or not ROWS:
        return
    path = Path(target)
    text = path.read_text()
    before, _, rest = text.partition(BEGIN)
    old_table, _, after = rest.partition(END)
    collected = {_test_cell(item) for item in getattr(session, "items", [])}
    kept = []
    for line in old_table.splitlines()[2:]:  # after the header and its rule
        m = re.search(r"\| (`[^`]+`) \|$", line)
        if m and m.group(1) not in collected:
            kept.append((m.group(1), line))
    new_table = render_table(ROWS).splitlines()
    fresh = [(r["test"], line) for r, line in zip(ROWS, new_table[2:])]
    lines = [line for _, line in sorted(kept + fresh, key=lambda t: t[0])]
    path.write_text(f"{before}{BEGIN}\n" + "\n".join(new_table[:2] + lines) + f"\n{END}{after}")


class Child:
    """A ``python -m tests.faults.child`` process in its own process group, its output collected by a thread."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
                 module: str = "tests.faults.child", base_env: dict[str, str] | None = None):
        import threading

        self.lines: list[str] = []
        full_env = {**(os.environ if base_env is None else base_env), "PYTHONPATH": str(ROOT),
                    "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, predicate, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"child exited ({self.proc.returncode}) before the fault point:\n{self.output[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"fault point not reached in {timeout:.0f} s:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL the whole process group (a crash: no cleanup, no finally blocks), and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._reader.join(10)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"child did not finish in {timeout:.0f} s:\n{self.output[-3000:]}") from None
        self._reader.join(10)
        return rc


@pytest.fixture
def children():
    """Start children with ``children(args, cwd)`` (``module=`` another ``python -m`` entry point, ``base_env=``
    instead of this process's environment); every one still running at the end is killed (its group)."""
    started: list[Child] = []

    def start(args: list[str], cwd: Path, env: dict[str, str] | None = None, **kw) -> Child:
        c = Child(args, cwd, env, **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.kill9()
