"""The optional LLM meta-agent of Meta Agent Search (Hu et al. 2024): it writes agent code.

Only when :class:`~forge_models.adas.config.MetaAgentConfig` has a ``url`` (an OpenAI-compatible API) does
any of this talk to a network; the code it returns runs only in :mod:`forge_models.adas.sandbox`. As in the
paper's ``search.py``, the meta-agent sees the whole archive (each design with its fitness) and answers in
JSON with ``thought``, ``name`` and ``code``; a failing agent is sent back with the error (a debug round).
Deviation: the paper's two self-reflection rounds per proposal are not done (one request per proposal).
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from forge_models.adas.config import MetaAgentConfig
from forge_models.runtime import ConfigError, ForgeError


@dataclass(frozen=True)
class CodeProposal:
    """One proposed agent: its name, the meta-agent's reasoning, and the code defining ``forward(task, llm)``."""

    name: str
    thought: str
    code: str


class MetaAgent(Protocol):
    """Writes agent code. ``propose`` sees the archive rows; ``debug`` gets the failing proposal and its error."""

    def propose(self, archive_rows: Sequence[dict]) -> CodeProposal: ...

    def debug(self, proposal: CodeProposal, error: str) -> CodeProposal: ...


class MetaAgentError(ForgeError):
    """The meta-agent's reply could not be used (HTTP error, no JSON, missing fields)."""


SYSTEM = "You are an expert machine learning researcher testing various agentic systems. Reply in JSON only."

FRAMEWORK = '''Design an agent for questions a small language model must answer (arithmetic, calculator tool use,
persona dialogue replies, short-story comprehension). Write Python code with exactly ONE top-level function

    def forward(task, llm):
        # task: {"uid": str, "prompt": str, "choices": [str, ...] (empty for numeric answers), "kind": str}
        # llm(prompt, temperature=0.0, max_new_tokens=None, stop=None) -> str: one model call (continuation)
        # return: the answer: a number as text, or the exact text of one of task["choices"]

Only the Python standard library is available (no network, no files, no subprocesses); imports may precede
forward. The model continues text: a prompt like task["prompt"] is answered on the next line, with
"The answer is N." for arithmetic, "<tool>calculator(a op b)</tool>" for tool questions. Each question may
make at most 16 model calls. Existing designs and their validation accuracy (median of the bootstrap):
'''

ANSWER_FORMAT = '''Reply with a JSON object with fields "thought" (your reasoning), "name" (a short name) and "code"
(the complete Python source). Propose a new, interesting design that should beat the archive.'''


def archive_prompt(archive_rows: Sequence[dict]) -> str:
    """The proposal request: the framework, then every archive entry (design or code, and its fitness)."""
    lines = [FRAMEWORK]
    for row in archive_rows:
        design = row.get("code") or row.get("config_json") or ""
        lines.append(f"## {row.get('name')} (fitness: {row.get('fitness')})\n{design}\n")
    lines.append(ANSWER_FORMAT)
    return "\n".join(lines)


def debug_prompt(proposal: CodeProposal, error: str) -> str:
    return (f"{FRAMEWORK}\nYour agent {proposal.name!r} failed:\n{error[-3000:]}\n\nIts code:\n{proposal.code}\n\n"
            f"Fix it. {ANSWER_FORMAT}")


def parse_reply(text: str) -> CodeProposal:
    """A CodeProposal from the meta-agent's JSON reply (a ```json fence around it is tolerated)."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise MetaAgentError(f"the meta-agent's reply is not JSON ({exc}): {text[:200]!r}") from exc
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("thought", "name", "code")):
        raise MetaAgentError(f"the meta-agent's reply needs string fields thought, name, code: {text[:200]!r}")
    return CodeProposal(name=obj["name"][:80] or "meta-agent", thought=obj["thought"], code=obj["code"])


# (url, payload, headers, timeout) -> response JSON; injectable so tests never touch a network.
Post = Callable[[str, dict, dict, float], dict]


def _http_post(url: str, payload: dict, headers: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the user's endpoint
        return json.loads(resp.read().decode())


class OpenAIMetaAgent:
    """A meta-agent behind an OpenAI-compatible ``/chat/completions`` endpoint (config ``url``)."""

    def __init__(self, cfg: MetaAgentConfig, post: Post | None = None) -> None:
        if not cfg.url:
            raise ConfigError("OpenAIMetaAgent needs meta_agent.url (an OpenAI-compatible endpoint)")
        self.cfg = cfg
        self.post = post or _http_post

    def _ask(self, prompt: str) -> CodeProposal:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        payload = {"model": self.cfg.model, "temperature": self.cfg.temperature,
                   "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                   "response_format": {"type": "json_object"}}
        try:
            reply = self.post(self.cfg.url.rstrip("/") + "/chat/completions", payload, headers, self.cfg.timeout_s)
            content = reply["choices"][0]["message"]["content"]
        except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise MetaAgentError(f"the meta-agent endpoint {self.cfg.url} failed: {exc}") from exc
        return parse_reply(content)

    def propose(self, archive_rows: Sequence[dict]) -> CodeProposal:
        return self._ask(archive_prompt(archive_rows))

    def debug(self, proposal: CodeProposal, error: str) -> CodeProposal:
        return self._ask(debug_prompt(proposal, error))
