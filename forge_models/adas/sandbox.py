"""Run generated agent code (Meta Agent Search) in a limited subprocess, exposing one ``forward`` callable.

An agent is Python source that defines exactly one top-level function ``forward(task, llm)`` (imports may
precede it; nothing else runs at import). ``task`` is the question without its answer (``uid``, ``prompt``,
``choices``, ``kind``); ``llm(prompt, temperature=0.0, max_new_tokens=None, stop=None) -> str`` calls the model,
which lives in the parent: the child sends the request as a JSON line and reads the reply. ``forward``
returns the answer (a number, or the exact text of a choice). ADAS ``exec``s such code in its own process,
unsandboxed; here it never runs in the parent.

The child (``python -I -S``: isolated, no site-packages, so only the standard library) and its limits:

- **wall clock** — the parent kills the whole process group once the child has used ``wall_seconds`` of its
  own time (time spent generating in the parent is not counted). The child cannot undo this.
- **rlimits** set first thing in the child: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE = 0`` (no
  file bytes written), ``RLIMIT_NPROC = 0`` (no fork, no threads), ``RLIMIT_CORE = 0``; then, when started
  as root (as in this project's containers), it drops to uid/gid ``nobody`` so the code cannot raise them
  back or write where nobody may not. Because the interpreter's standard library may be unreadable to
  nobody, the modules agents commonly use (re, math, random, statistics, collections, itertools, functools,
  json, ...) are imported before the drop; importing another module may then fail, which is reported. Started as another user, rlimits still hold but RLIMIT_NPROC counts
  every process of that user.
- **no network, best effort** — ``unshare``/network namespaces are not available here, so the child
  replaces ``socket.socket`` and the resolver and process-spawning functions with ones that raise, and
  refuses imports of ``ctypes``, ``subprocess``, ``multiprocessing``, ``ssl`` and the HTTP / URL libraries.
  This stops accidental network use by honest code; it is NOT a security boundary against adversarial code
  (Python-level patches can be undone from inside the interpreter). Do not point the meta-agent at code
  you would not run on this machine yourself.
- **protocol** — the parent validates every line; a malformed message, an exception in ``forward``, more
  than ``max_llm_calls_per_question`` model calls, or the child exiting early are errors naming the cause.
"""

from __future__ import annotations

import ast
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from forge_models.adas.client import GenerationClient
from forge_models.adas.config import SandboxConfig
from forge_models.adas.executor import Answer, Cost, vote_seed
from forge_models.adas.questions import Question
from forge_models.runtime import ForgeError


class AgentCodeError(ForgeError):
    """Generated agent code failed: it broke the one-callable rule, raised, misbehaved or ran out of a limit."""


class SandboxTimeout(AgentCodeError):
    """The agent's code used up its wall-clock budget and was killed."""


def check_agent_code(code: str) -> None:
    """Raise AgentCodeError unless ``code`` parses and defines exactly one top-level ``forward(task, llm)``.

    Only imports, the one function and a docstring may sit at the top level (nothing else runs at import).
    """
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise AgentCodeError(f"agent code does not parse: {exc}") from exc
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    if len(defs) != 1 or not isinstance(defs[0], ast.FunctionDef) or defs[0].name != "forward":
        names = [n.name for n in defs]
        raise AgentCodeError(f"agent code must define exactly one top-level function `forward`, found {names}")
    others = [n for n in tree.body if n is not defs[0] and not isinstance(n, (ast.Import, ast.ImportFrom))
              and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))]
    if others:
        raise AgentCodeError(f"agent code may hold only imports and `forward` at the top level; line {others[0].lineno} is a {type(others[0]).__name__}")
    args = defs[0].args
    if len(args.posonlyargs) + len(args.args) != 2:
        raise AgentCodeError("`forward` must take exactly two arguments: forward(task, llm)")


# The child's program. Limits first, then privileges, then the network and process guards, then the code.
_CHILD = r'''
import sys, json, traceback, resource, os, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then raises OSError (EFBIG), reported
_MEM, _CPU = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (_MEM, _MEM))
resource.setrlimit(resource.RLIMIT_CPU, (_CPU, _CPU))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
# The standard library may be unreadable to nobody (here it lives under /root): load what agents use first.
import socket, _socket, re, math, cmath, random, statistics, collections, itertools, functools, operator, string
import textwrap, difflib, heapq, bisect, fractions, decimal, typing, dataclasses, unicodedata, copy, enum
if os.getuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
_out, _in = sys.stdout, sys.stdin
sys.stdout = sys.stderr
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the ADAS sandbox")
class _NoSocket:
    def __init__(self, *a, **k):
        _no_network()
for _m in (socket, _socket):
    for _n in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
               "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_m, _n):
            setattr(_m, _n, _NoSocket if _n in ("socket", "SocketType") else _no_network)
def _no_process(*a, **k):
    raise PermissionError("starting processes is disabled in the ADAS sandbox")
for _n in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execl",
           "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "kill", "killpg"):
    if hasattr(os, _n):
        setattr(os, _n, _no_process)
_BLOCKED = {"ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "ssl",
            "_ssl", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc", "asyncio",
            "socketserver", "resource"}
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ImportError(f"module {name} is not available in the ADAS sandbox")
        return None
sys.meta_path.insert(0, _Refuse())
for _n in list(sys.modules):
    if _n.split(".")[0] in _BLOCKED:
        del sys.modules[_n]
def _send(obj):
    _out.write(json.dumps(obj) + "\n")
    _out.flush()
def _recv():
    line = _in.readline()
    if not line:
        raise SystemExit(3)
    return json.loads(line)
_job = _recv()
_ns = {"__name__": "agent"}
try:
    exec(compile(_job["code"], "<agent>", "exec"), _ns)
    _forward = _ns["forward"]
except BaseException:
    _send({"op": "error", "index": -1, "traceback": traceback.format_exc(limit=4)})
    raise SystemExit(0)
def llm(prompt, temperature=0.0, max_new_tokens=None, stop=None):
    _send({"op": "llm", "prompt": str(prompt), "temperature": float(temperature),
           "max_new_tokens": None if max_new_tokens is None else int(max_new_tokens),
           "stop": None if stop is None else [str(s) for s in stop]})
    reply = _recv()
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["text"]
for _i, _task in enumerate(_job["questions"]):
    try:
        _answer = _forward(_task, llm)
    except BaseException:
        _send({"op": "error", "index": _i, "traceback": traceback.format_exc(limit=4)})
        raise SystemExit(0)
    _send({"op": "answer", "index": _i, "answer": None if _answer is None else str(_answer)})
_send({"op": "done"})
'''


def run_code_agent(
    code: str, client: GenerationClient, questions: Sequence[Question], cfg: SandboxConfig, *, seed: int = 0
) -> list[Answer]:
    """Run agent ``code`` on ``questions`` in the sandbox (module docstring); its answers and measured costs.

    Raises AgentCodeError (with the child's traceback) or SandboxTimeout; the child is always killed.
    """
    check_agent_code(code)
    job = {"code": code, "questions": [q.public() for q in questions]}
    with tempfile.TemporaryDirectory(prefix="adas-sandbox-") as cwd:
        os.chmod(cwd, 0o755)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD, str(cfg.memory_mb * 2**20), str(cfg.cpu_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
        )
        try:
            return _serve(proc, job, client, questions, cfg, seed)
        finally:
            _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class _Lines:
    """Line reader over the child's stdout with a budget of the child's own time (select, no threads)."""

    def __init__(self, proc: subprocess.Popen, budget: float) -> None:
        self.proc, self.budget = proc, budget
        self.buf, self.err = b"", b""
        self.out_fd, self.err_fd = proc.stdout.fileno(), proc.stderr.fileno()  # type: ignore[union-attr]
        self.open = {self.out_fd, self.err_fd}

    def stderr_tail(self) -> str:
        return self.err[-2000:].decode("utf-8", "replace")

    def next(self) -> dict | None:
        while b"\n" not in self.buf:
            if self.out_fd not in self.open:
                return None
            if self.budget <= 0:
                raise SandboxTimeout("agent code exceeded its wall-clock budget and was killed")
            start = time.monotonic()
            ready, _, _ = select.select(list(self.open), [], [], self.budget)
            self.budget -= time.monotonic() - start
            if not ready:
                raise SandboxTimeout("agent code exceeded its wall-clock budget and was killed")
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.open.discard(fd)
                elif fd == self.out_fd:
                    self.buf += chunk
                else:
                    self.err = (self.err + chunk)[-8192:]
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AgentCodeError(f"the sandbox sent a malformed line ({exc}): {line[:200]!r}") from exc
        if not isinstance(msg, dict) or msg.get("op") not in ("llm", "answer", "error", "done"):
            raise AgentCodeError(f"the sandbox sent an unknown message: {str(msg)[:200]}")
        return msg


def _write(proc: subprocess.Popen, lines: _Lines, obj: dict) -> None:
    try:
        proc.stdin.write((json.dumps(obj) + "\n").encode())  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
    except BrokenPipeError as exc:
        raise AgentCodeError(f"the agent process ended early (exit {proc.wait()}); stderr: {lines.stderr_tail()}") from exc


def _serve(proc, job, client, questions, cfg, seed) -> list[Answer]:
    lines = _Lines(proc, cfg.wall_seconds)
    _write(proc, lines, job)
    answers: list[Answer] = []
    calls, cost, texts = 0, Cost(), []
    n_calls_total = 0
    q_start = time.perf_counter()  # a question's seconds: the agent's own time plus its model calls
    while True:
        msg = lines.next()
        if msg is None:
            raise AgentCodeError(f"the agent process ended early (exit {proc.wait()}); stderr: {lines.stderr_tail()}")
        op = msg["op"]
        if op == "error":
            where = "at import" if msg.get("index", -1) < 0 else f"on question {msg.get('index')}"
            raise AgentCodeError(f"agent code raised {where}:\n{str(msg.get('traceback', ''))[-2000:]}")
        if op == "done":
            if len(answers) != len(questions):
                raise AgentCodeError(f"the agent answered {len(answers)} of {len(questions)} questions")
            return answers
        i = len(answers)
        if i >= len(questions):
            raise AgentCodeError("the agent sent more than one answer per question")
        if op == "answer":
            if msg.get("index") != i:
                raise AgentCodeError(f"answer for question {msg.get('index')} arrived when {i} was expected")
            pred = msg.get("answer")
            now = time.perf_counter()
            cost = Cost(cost.model_calls, cost.prompt_tokens, cost.completion_tokens, now - q_start)
            answers.append(Answer(questions[i].uid, None if pred is None else str(pred).strip(), (pred,), tuple(texts), cost))
            calls, cost, texts, q_start = 0, Cost(), [], now
            continue
        calls += 1
        if calls > cfg.max_llm_calls_per_question:
            raise AgentCodeError(f"question {i} made more than {cfg.max_llm_calls_per_question} model calls")
        q = questions[i]
        max_new = min(int(msg.get("max_new_tokens") or cfg.max_new_tokens), cfg.max_new_tokens)
        temperature = float(msg.get("temperature", 0.0))
        if not 0.0 <= temperature <= 2.0:
            raise AgentCodeError(f"temperature {temperature} is outside [0, 2]")
        stop = tuple(msg["stop"]) if msg.get("stop") is not None else q.stops
        out = client.generate([str(msg.get("prompt", ""))], temperature=temperature, max_new_tokens=max_new,
                              seed=vote_seed(seed, n_calls_total), thought_budget=0, expert=None, stop=stop)[0]
        n_calls_total += 1
        cost = cost + Cost(1, out.prompt_tokens, out.completion_tokens, 0.0)
        texts.append(out.text)
        _write(proc, lines, {"text": out.text})
