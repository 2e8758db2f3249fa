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
refused with OverBudget too), and every torch call of the agent, loading included, runs on the process's one
torch thread (:func:`on_torch_thread`), whichever thread the web server answers on.

What phase 7 attaches to the artifact is applied when present (see `Agent.load`): ``agent.json`` (the
agent configuration the ADAS search chose: experts or mixture, tools on/off, decoding and votes, answer
extraction, prompt style) and ``experts/`` (the SVF expert library it names). They sit at the artifact's root
(phase 7's output) or inside its model folder (phase 8's compressed folder, which carries the library
basis-free: it is re-based on the loaded model's decoded weights, ``load_experts(..., model=...)``). Both are
covered by the artifact's manifest, so a changed ``agent.json`` is refused naming the file. A request's own ``tools`` /
``temperature`` / ``max_tokens`` override the configuration's; without ``agent.json`` the agent is the plain
model with tools on, as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from forge_models.tools import default_registry

log = logging.getLogger("agent_forge.serving")

ROLES = ("system", "user", "assistant", "tool")



_TORCH_THREAD: ThreadPoolExecutor | None = None
_TORCH_THREAD_PID = 0
_TORCH_THREAD_GUARD = threading.Lock()
_TORCH_THREAD_NAME = "forge-torch"


def on_torch_thread(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` on this process's one torch thread and return (or raise) what it does.

    Why: with libgomp (torch's CPU wheels use it) every OS thread that runs a parallel op gets its own OpenMP
    team, and once a process holds more OpenMP threads than CPUs, libgomp stops spin-waiting between parallel
    regions (its "throttled" spin count), which slows token-by-token decoding, made of many small parallel
    regions. Measured on the 2-core machine (SmolLM2-135M, 16 tokens, 2 torch threads): 0.59 s per answer while
    one thread had run torch, 0.98 s once a second thread had, on either thread. A web server calls ``predict``
    from a pool of threads, so every torch call of the agent goes through here. The thread takes the calling
    thread's torch thread count when it is created.
    """
    global _TORCH_THREAD
    if threading.current_thread().name.startswith(_TORCH_THREAD_NAME):
        return fn(*args, **kwargs)
    global _TORCH_THREAD_PID
    with _TORCH_THREAD_GUARD:
        # a forked child inherits the executor but not its thread: it gets its own
        if _TORCH_THREAD is None or _TORCH_THREAD_PID != os.getpid():
            _TORCH_THREAD = ThreadPoolExecutor(1, thread_name_prefix=_TORCH_THREAD_NAME,
                                               initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
            _TORCH_THREAD_PID = os.getpid()
    return _TORCH_THREAD.submit(fn, *args, **kwargs).result()


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
    temperature: float | None = Field(
        None, description="0 = greedy; above 0 samples with the request's seed. None: the agent configuration's "
        "(agent.json), else 0.")
    tools: bool | None = Field(
        None, description="Let the model call its tools (calculator, ...) while answering. None: the agent "
        "configuration's choice (agent.json), else on.")
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
    if params.temperature is not None and not 0.0 <= params.temperature <= limits.max_temperature:
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
        self.check()
        return self._model(*args, **kwargs)

    def check(self) -> None:
        """Raise OverBudget once the deadline has passed (called per forward pass, and per token by generators
        that run the model's trunk directly, e.g. Quiet-STaR's thought decoder)."""
        if time.monotonic() > self._deadline:
            raise OverBudget(f"request exceeded its time budget of {self._budget_s:g} s after "
                             f"{self.forwards} forward passes; cut off (ask for fewer max_tokens or a larger timeout_s)")
        object.__setattr__(self, "forwards", self.forwards + 1)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class Agent:
    """A loaded, verified final artifact that answers chat requests."""

    def __init__(self, model: Any, tokenizer: Any, folder: Path, digest: str, device: torch.device,
                 limits: ServingLimits, precision: str = "fp32", attachments: dict[str, Any] | None = None,
                 name: str = "agent-forge", agent_config: Any = None, experts: Any = None, thinker: Any = None):
        self.model, self.tokenizer, self.folder, self.digest = model, tokenizer, folder, digest
        self.device, self.limits, self.precision, self.name = device, limits, precision, name
        self.attachments = attachments or {}
        self.agent_config, self.experts = agent_config, experts  # AgentConfig / ExpertLibrary, or None
        self.thinker = thinker  # QuietStar when agent.json asks for a thought budget, else None
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
        """Verify ``artifact_dir`` against its manifest (every file re-hashed), then load its one model (on the
        torch thread, see :func:`on_torch_thread`).

        Raises ArtifactIntegrityError naming the first file that is missing, foreign or changed.
        """
        return on_torch_thread(cls._load, artifact_dir, limits, device, precision, name)

    @classmethod
    def _load(cls, artifact_dir: str | Path, limits: ServingLimits | None, device: str, precision: str,
              name: str) -> "Agent":
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
        agent_config, experts = _attachments(folder, models[0], model)
        thinker = None
        if agent_config is not None and agent_config.thought_budget:
            from forge_models.quietstar import attach_thoughts, read_thoughts

            if read_thoughts(models[0]) is None:
                raise ArtifactIntegrityError(
                    f"{folder}: agent.json asks for thought_budget {agent_config.thought_budget}, but the model folder "
                    f"{models[0].name}/ has no Quiet-STaR files (quietstar.json, quietstar_head.safetensors)")
            thinker = attach_thoughts(model, models[0], tokenizer)
        found = (["agent.json"] if agent_config is not None else []) + (["experts"] if experts is not None else []) \
            + (["quietstar"] if thinker is not None else [])
        return cls(model, tokenizer, folder, manifest["digest"], dev, limits or ServingLimits(), precision,
                   {k: True for k in found}, name, agent_config, experts, thinker)

    def effective(self, params: ChatParams) -> ChatParams:
        """The request's parameters with what it left open filled from agent.json (else: tools on, greedy)."""
        cfg = self.agent_config
        return params.model_copy(update={
            "tools": params.tools if params.tools is not None else (bool(cfg.tools) if cfg else True),
            "temperature": params.temperature if params.temperature is not None else (cfg.temperature if cfg else 0.0),
        })

    # ------------------------------------------------------------------ answering

    def reply(self, messages: Any, params: ChatParams) -> dict[str, Any]:
        """Validate, generate under the time budget, and return an OpenAI-style chat completion."""
        t0 = time.monotonic()
        params = self.effective(params)
        route = "chat_tools" if params.tools else "chat"
        try:
            msgs = validate(messages, params, self.limits)
            budget = min(params.timeout_s or self.limits.timeout_s, self.limits.timeout_s)
            deadline = t0 + budget
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise OverBudget(f"request exceeded its time budget of {budget:g} s waiting for the model "
                                 "(other requests are generating)")
            try:
                out = on_torch_thread(self._generate, msgs, params, Deadline(self.model, deadline, budget))
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
        import contextlib

        from forge_models.adas import EXTRACTORS, majority
        from forge_models.adas.config import COT_INSTRUCTION
        from forge_models.adas.executor import vote_seed

        cfg = self.agent_config
        max_tokens = params.max_tokens or min(cfg.max_new_tokens if cfg else self.limits.default_max_tokens,
                                              self.limits.max_tokens)
        if cfg is not None and cfg.prompt_style == "cot":  # zero-shot chain of thought, as the search ran it
            msgs = msgs[:-1] + [{"role": "user", "content": msgs[-1]["content"] + COT_INSTRUCTION}]
        registry, max_calls = self.registry, self.limits.max_tool_calls
        if cfg is not None and cfg.tools:
            registry, max_calls = self.registry.subset(cfg.tools), min(cfg.max_tool_calls, max_calls)
        # Self-consistency only when sampling (a request asking for greedy gets one call).
        votes = cfg.votes if cfg is not None and params.temperature > 0 else 1
        scope = contextlib.nullcontext()
        routed = None  # the expert two-pass dispatch chose for this request (None: base weights)
        if cfg is not None and cfg.dispatch:
            from forge_models.runtime import PhaseContext

            # First pass, on the base weights: the model classifies the user's message by the stored exemplars.
            ctx = PhaseContext(device=self.device, seed=params.seed, precision=self.precision)
            label = self.experts.classify(model, self.tokenizer, [msgs[-1]["content"]], ctx)[0]
            routed = label if label in self.experts.skills else None
            if routed is not None:
                scope = self.experts.apply(self.model, routed)
        elif cfg is not None and cfg.experts:
            weights = cfg.experts
            one = len(weights) == 1 and next(iter(weights.values())) == 1.0
            scope = (self.experts.apply(self.model, next(iter(weights))) if one
                     else self.experts.apply(self.model, alpha=dict(weights)))
        runs = []
        with scope:  # the expert's weights for this request; the base comes back bit for bit afterwards
            for v in range(votes):
                seed = vote_seed(params.seed, v) if votes > 1 else params.seed
                runs.append(self._one(msgs, params, model, max_tokens, seed, registry, max_calls))
        extract = EXTRACTORS[cfg.extraction if cfg is not None else "auto"]
        preds = [extract(r["answer"], [c["result"] for c in r["tool_calls"] if c["ok"]], ()) for r in runs]
        top = majority(preds)
        chosen = next((r for r, p in zip(runs, preds) if p == top), runs[0]) if top is not None else runs[0]
        prompt_tokens = sum(r["prompt_tokens"] for r in runs)
        completion_tokens = sum(r["completion_tokens"] for r in runs)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": chosen["answer"]},
                         "finish_reason": chosen["finish"]}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "custom_outputs": {"tool_calls": chosen["tool_calls"], "tools": params.tools, "artifact_digest": self.digest,
                               "attachments": sorted(self.attachments),
                               "agent": cfg.name if cfg is not None else None, "votes": preds if votes > 1 else [],
                               **({"dispatched_expert": routed} if cfg is not None and cfg.dispatch else {})},
        }

    def _one(self, msgs: list[dict[str, str]], params: ChatParams, model: Any, max_tokens: int, seed: int,
             registry: Any, max_tool_calls: int) -> dict[str, Any]:
        """One model answer (with the tool loop when tools are on)."""
        from forge_models.generation import GenerationConfig, generate
        from forge_models.runtime import PhaseContext
        from forge_models.tools import render_plain, run_agent

        gen = GenerationConfig(max_new_tokens=max_tokens, temperature=params.temperature, batch_size=1,
                               chat=self.chat, stop=() if self.chat else ("\n",))
        ctx = PhaseContext(device=self.device, seed=seed, precision=self.precision)
        budget = self.agent_config.thought_budget if self.agent_config is not None else 0
        generate_fn = None
        if budget:  # Quiet-STaR: every token after a thought; the deadline is checked per token
            from forge_models.quietstar.generation import thought_generate

            generate_fn = thought_generate(self.thinker, budget, step_hook=getattr(model, "check", None))
        if params.tools:
            # The tool loop: max_tokens bounds each generation step; the time budget bounds the whole turn.
            turn = run_agent(model, self.tokenizer, msgs, registry=registry, gen=gen,
                             max_tool_calls=max_tool_calls, device=self.device, seed=seed, ctx=ctx,
                             generate_fn=generate_fn)
            calls = [{"name": c.name, "arguments": c.arguments, "result": c.result, "ok": c.ok, "error": c.error}
                     for c in turn.tool_calls]
            return {"answer": turn.answer, "prompt_tokens": turn.prompt_tokens,
                    "completion_tokens": turn.completion_tokens, "tool_calls": calls,
                    "finish": None}  # the loop does not report why its last step ended
        generator = torch.Generator().manual_seed(seed) if params.temperature > 0 else None
        prompt = msgs if self.chat else render_plain(msgs)
        g = (generate_fn or generate)(model, self.tokenizer, [prompt], gen, ctx, generator=generator)[0]
        return {"answer": g.text if self.chat else g.text.strip(), "prompt_tokens": g.prompt_tokens,
                "completion_tokens": len(g.token_ids), "tool_calls": [],
                "finish": "length" if g.finish == "length" else "stop"}


def _attachments(folder: Path, model_dir: Path | None = None, model: Any = None) -> tuple[Any, Any]:
    """(AgentConfig, ExpertLibrary) from what phase 7 stored in the artifact, each None when absent.

    Looked for at the artifact's root (phase 7's layout) or in its model folder ``model_dir`` (phase 8's
    compressed folder); both holding some is refused as ambiguous. A basis-free library (the compressed
    folder's) is re-based on ``model``, the loaded model, and the change of its basis is logged.

    Called after the artifact's manifest was verified (so agent.json is the stored one). A configuration
    this server cannot run is refused naming agent.json, never run without what it asks for.
    """
    from forge_models.adas import AgentConfig
    from forge_models.experts import load_experts
    from forge_models.runtime import ArtifactIntegrityError

    def holds(place: Path) -> bool:
        return (place / "agent.json").is_file() or (place / "experts" / "experts.json").is_file()

    places = [p for p in (folder, model_dir) if p is not None and holds(p)]
    if len(places) > 1:
        raise ArtifactIntegrityError(f"{folder}: agent.json / experts/ both at the artifact's root and in "
                                     f"{model_dir.name}/; the served agent takes one set")
    place = places[0] if places else folder
    experts = (load_experts(place / "experts", model=model) if (place / "experts" / "experts.json").is_file()
               else None)
    if experts is not None and experts.rebased:
        summary = experts.rebase_summary()
        log.info("artifact %s: experts re-based on the loaded weights (%d of %d targets changed; singular values "
                 "moved by up to %.3g relative)", folder, summary["targets_changed"], summary["targets"],
                 summary["s_rel_change_max"])
    path = place / "agent.json"
    if not path.is_file():
        return None, experts
    cfg = AgentConfig.from_artifact(path, experts.skills if experts is not None else [])
    if cfg.dispatch and not experts.can_dispatch:  # from_artifact refused a dispatch config without a library
        raise ArtifactIntegrityError(f"{path}: asks for dispatch but experts/ stores no first-pass exemplar for "
                                     f"every expert ({sorted(experts.exemplars)} of {experts.skills})")
    log.info("artifact %s: serving agent configuration %s", folder, cfg.to_json())
    return cfg, experts
