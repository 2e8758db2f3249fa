"""The served agent: a verified final artifact, loaded once, answering chat requests under limits.

No MLflow here: `flows/serving.py` wraps this for `mlflow models serve`; `forge agent chat` uses it directly.

    agent = Agent.load("forge-store/training/<key>")          # verifies every file against manifest.json
    out = agent.reply([{"role": "user", "content": "What is 2+3?"}], ChatParams(max_tokens=32))
    out["choices"][0]["message"]["content"], out["usage"], out["custom_outputs"]["tool_calls"]

A request is checked before any compute (roles, sizes, ``max_tokens``, temperature, time budget) and refused
with :class:`BadRequest` naming the field. Generation runs under a deadline: every forward pass of the
model first checks it, so a request over its budget stops within one decoding step and raises
:class:`OverBudget` (the worker is free again at once). One generation runs at a time per process (the
CPU's cores are shared by all of them; a request that cannot get the model within its budget is
refused with OverBudget too).

Hooks for what later phases attach to the artifact (read if present, see `Agent.load`): ``agent.json``
(the chosen agent configuration of ADAS) and ``experts/`` (SVF expert vectors). Neither is applied yet:
their presence is reported in ``custom_outputs.attachments`` and the server log, never silently used.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from forge_models.tools import default_registry

log = logging.getLogger("agent_forge.serving")

ROLES = ("system", "user", "assistant", "tool")



class BadRequest(ValueError):
    """The request is invalid (the message names the field); maps to HTTP 400."""


class OverBudget(TimeoutError):
    """The request ran past its time budget and was cut off; maps to HTTP 504."""


class ServingLimits(BaseModel):
    """What one request may ask for. Defaults suit the tiny and SmolLM2 agents on a CPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_messages: int = Field(32, ge=1, description="Most messages in one request.")
    max_input_chars: int = Field(8000, ge=1, description="Most characters over all message contents.")
    max_tokens: int = Field(256, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    max_temperature: float = Field(2.0, ge=0.0, description="Largest sampling temperature accepted.")
    timeout_s: float = Field(60.0, gt=0, description="Time budget of one request (a request may ask for less).")
    max_tool_calls: int = Field(4, ge=0, le=16, description="Most tool calls in one answer (the runtime's limit).")


class ChatParams(BaseModel):
    """The per-request parameters beside the messages (OpenAI-style names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int | None = Field(None, description="Most tokens generated for the answer; None: the server default.")
    temperature: float = Field(0.0, description="0 = greedy; above 0 samples with the request's seed.")
    tools: bool = Field(True, description="Let the model call its tools (calculator, ...) while answering.")
    timeout_s: float | None = Field(None, description="Time budget in seconds; None or more than the server's: the server's.")
    seed: int = Field(0, description="Seed of the sampler when temperature > 0.")


def validate(messages: Any, params: ChatParams, limits: ServingLimits) -> list[dict[str, str]]:
    """The messages as plain dicts, or BadRequest naming the first problem (nothing is computed before)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"messages: {len(messages)} messages, the limit is {limits.max_messages}")
    out: list[dict[str, str]] = []
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise BadRequest(f"messages[{i}]: must be an object with exactly the keys role and content")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role: {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: must be a string")
        try:  # JSON can carry lone surrogates ("\ud800"), which no tokenizer can encode
            content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"messages[{i}].content: not valid Unicode ({exc.reason} at position {exc.start})") from None
        if role == "system" and i != 0:
            raise BadRequest(f"messages[{i}].role: a system message may only come first")
        chars += len(content)
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise BadRequest(f"messages[{len(out) - 1}].role: the last message must be the user's, not {out[-1]['role']!r}")
    if chars > limits.max_input_chars:
        raise BadRequest(f"messages: {chars} characters of content, the limit is {limits.max_input_chars}")
    if params.max_tokens is not None and not 1 <= params.max_tokens <= limits.max_tokens:
        raise BadRequest(f"max_tokens: {params.max_tokens} is outside [1, {limits.max_tokens}]")
    if not 0.0 <= params.temperature <= limits.max_temperature:
        raise BadRequest(f"temperature: {params.temperature} is outside [0, {limits.max_temperature}]")
    if params.timeout_s is not None and not params.timeout_s > 0:  # `not >` also refuses NaN (no deadline at all)
        raise BadRequest(f"timeout_s: {params.timeout_s} must be positive")
    if not -(2**63) <= params.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise BadRequest(f"seed: {params.seed} is outside [-2**63, 2**64)")
    if params.tools and limits.max_tool_calls == 0:
        raise BadRequest("tools: this server allows no tool calls (max_tool_calls = 0); send tools=false")
    return out


class Deadline:
    """The model seen through a deadline: every forward pass first checks the clock.

    Generation calls the model once per token, so a request over its budget stops within one step,
    whatever loop (plain generation or the tool loop) drives it. Everything else is the model's own.
    """

    def __init__(self, model: Any, deadline: float, budget_s: float):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_deadline", deadline)
        object.__setattr__(self, "_budget_s", budget_s)
        object.__setattr__(self, "forwards", 0)

    def __call__(self, *args, **kwargs):
        if time.monotonic() > self._deadline:
            raise OverBudget(f"request exceeded its time budget of {self._budget_s:g} s after "
                             f"{self.forwards} forward passes; cut off (ask for fewer max_tokens or a larger timeout_s)")
        object.__setattr__(self, "forwards", self.forwards + 1)
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class Agent:
    """A loaded, verified final artifact that answers chat requests."""

    def __init__(self, model: Any, tokenizer: Any, folder: Path, digest: str, device: torch.device,
                 limits: ServingLimits, precision: str = "fp32", attachments: dict[str, Any] | None = None,
                 name: str = "agent-forge"):
        self.model, self.tokenizer, self.folder, self.digest = model, tokenizer, folder, digest
        self.device, self.limits, self.precision, self.name = device, limits, precision, name
        self.attachments = attachments or {}
        # Our own models (Cognate and its descendants) have no chat template: they were trained on the corpus's
        # transcript lines ("User: ...\nAssistant:"), so messages are rendered that way (the tool runtime's plain
        # format) and an answer ends at its line.
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.registry = default_registry()
        self.metrics = None  # a ServingMetrics when the server exposes them (flows.serving)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, artifact_dir: str | Path, limits: ServingLimits | None = None, device: str = "cpu",
             precision: str = "fp32", name: str = "agent-forge") -> "Agent":
        """Verify ``artifact_dir`` against its manifest (every file re-hashed), then load its one model.

        Raises ArtifactIntegrityError naming the first file that is missing, foreign or changed.
        """
        from forge_models.runtime import ArtifactIntegrityError
        from forge_models.tokenizer import load_tokenizer
        from tasks.evaluate import load_model
        from tasks.store import Store

        folder = Path(artifact_dir).resolve()
        store = Store(f"file://{folder}")
        manifest = store.verify(store.url, deep=True)
        models = sorted(p.parent for p in folder.glob("*/config.json"))
        if len(models) != 1:
            raise ArtifactIntegrityError(f"{folder} holds {len(models)} model folders ({[m.name for m in models]}); "
                                         "the served agent takes exactly one")
        dev = torch.device(device)
        model = load_model(models[0], dev)
        model.eval()
        tokenizer = load_tokenizer(models[0])
        return cls(model, tokenizer, folder, manifest["digest"], dev, limits or ServingLimits(), precision,
                   _attachments(folder), name)

    # ------------------------------------------------------------------ answering

    def reply(self, messages: Any, params: ChatParams) -> dict[str, Any]:
        """Validate, generate under the time budget, and return an OpenAI-style chat completion."""
        t0 = time.monotonic()
        route = "chat_tools" if params.tools else "chat"
        try:
            msgs = validate(messages, params, self.limits)
            budget = min(params.timeout_s or self.limits.timeout_s, self.limits.timeout_s)
            deadline = t0 + budget
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise OverBudget(f"request exceeded its time budget of {budget:g} s waiting for the model "
                                 "(other requests are generating)")
            try:
                out = self._generate(msgs, params, Deadline(self.model, deadline, budget))
            finally:
                self._lock.release()
        except BadRequest:
            self._count(route, "bad_request", t0)
            raise
        except OverBudget:
            self._count(route, "timeout", t0)
            raise
        except Exception:
            self._count(route, "error", t0)
            raise
        seconds = time.monotonic() - t0
        out["custom_outputs"]["latency_s"] = round(seconds, 4)
        if self.metrics is not None:
            self.metrics.observe(route, "ok", seconds, out["usage"], out["custom_outputs"]["tool_calls"])
        return out

    def _count(self, route: str, status: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(route, status, time.monotonic() - t0, None, [])

    def _generate(self, msgs: list[dict[str, str]], params: ChatParams, model: Any) -> dict[str, Any]:
        from forge_models.generation import GenerationConfig, generate
        from forge_models.runtime import PhaseContext
        from forge_models.tools import render_plain, run_agent

        max_tokens = params.max_tokens or min(self.limits.default_max_tokens, self.limits.max_tokens)
        gen = GenerationConfig(max_new_tokens=max_tokens, temperature=params.temperature, batch_size=1,
                               chat=self.chat, stop=() if self.chat else ("\n",))
        ctx = PhaseContext(device=self.device, seed=params.seed, precision=self.precision)
        tool_calls: list[dict[str, Any]] = []
        if params.tools:
            # The tool loop: max_tokens bounds each generation step; the time budget bounds the whole turn.
            turn = run_agent(model, self.tokenizer, msgs, registry=self.registry, gen=gen,
                             max_tool_calls=self.limits.max_tool_calls, device=self.device, seed=params.seed, ctx=ctx)
            answer, prompt_tokens, completion_tokens = turn.answer, turn.prompt_tokens, turn.completion_tokens
            tool_calls = [{"name": c.name, "arguments": c.arguments, "result": c.result, "ok": c.ok, "error": c.error}
                          for c in turn.tool_calls]
            finish = None  # the loop does not report why its last step ended
        else:
            generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
            prompt = msgs if self.chat else render_plain(msgs)
            g = generate(model, self.tokenizer, [prompt], gen, ctx, generator=generator)[0]
            answer = g.text if self.chat else g.text.strip()
            prompt_tokens, completion_tokens = g.prompt_tokens, len(g.token_ids)
            finish = "length" if g.finish == "length" else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "custom_outputs": {"tool_calls": tool_calls, "tools": params.tools, "artifact_digest": self.digest,
                               "attachments": sorted(self.attachments)},
        }


def _attachments(folder: Path) -> dict[str, Any]:
    """HOOK: what later phases attach to the final artifact, read if present, reported, not yet applied.

    ``agent.json`` (phase 7, ADAS: the chosen agent configuration) and ``experts/`` (phase 7, SVF expert
    vectors). When those phases land, `Agent._generate` is where the configuration (system prompt,
    decoding, tool policy) and the expert dispatch apply.
    """
    found: dict[str, Any] = {}
    if (folder / "agent.json").is_file():
        found["agent.json"] = json.loads((folder / "agent.json").read_text())
    experts = sorted(p.name for p in (folder / "experts").glob("*")) if (folder / "experts").is_dir() else []
    if experts:
        found["experts"] = experts
    if found:
        log.warning("artifact %s carries %s: not applied by this server version (hook in flows/agent.py)",
                    folder, sorted(found))
    return found
