"""The search over agent designs: seed agents, an evolutionary proposer, the archive, the final comparison.

    result = search(splits, client, SearchConfig(...))                 # validation split only
    rows = final_comparison(splits, client, result)                    # reads the test split, once

1. The hand-designed seed agents (:func:`seed_agents`: plain, chain of thought, self-consistency k = 5,
   tools first; those the client cannot run are left out) are evaluated on the validation questions.
2. Each generation, the proposer (evolution: tournament selection on the bootstrap median, per-field
   crossover, 1..``mutations`` field mutations drawn from the search space cut to the client's
   capabilities, duplicates of archived designs redrawn) proposes ``population`` new designs; each is run
   and scored; every one is appended to the archive, which is never pruned.
3. With a meta-agent (only when one is given: an LLM behind an endpoint, or a scripted one in tests), each
   generation also asks it for agent code, run in the sandbox; a failure goes back to it for at most
   ``max_debug_rounds`` fixes, then the proposal is skipped (recorded in ``rejected``, not in the archive).
4. The winner is the archive's best bootstrap median (ties: fewer model calls, then earlier). The test
   split is read only by :func:`final_comparison`, after the search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from forge_models.adas.client import GenerationClient
from forge_models.adas.config import AgentConfig, Capabilities, SearchConfig, SearchSpace
from forge_models.adas.executor import Answer, Cost, run_agent_config
from forge_models.adas.fitness import Fitness, fitness_of, mean_cost, outcomes
from forge_models.adas.meta import CodeProposal, MetaAgent, MetaAgentError
from forge_models.adas.questions import HeldOutSplits, Question
from forge_models.adas.sandbox import AgentCodeError, run_code_agent
from forge_models.eval.stats import paired_difference
from forge_models.runtime import ConfigError, NullTracker, Tracker


def seed_agents(caps: Capabilities) -> list[AgentConfig]:
    """The hand-designed agents the archive starts from (those ``caps`` allows)."""
    seeds = [
        AgentConfig(name="plain"),
        AgentConfig(name="chain-of-thought", prompt_style="cot", max_new_tokens=64),
        AgentConfig(name="self-consistency-5", temperature=0.7, votes=5),
    ]
    if "calculator" in caps.tools:
        seeds.append(AgentConfig(name="tools-first", tools=("calculator",), max_tool_calls=2))
    if caps.max_thought_budget > 0:  # a Quiet-STaR model: thinking as its designers use it
        seeds.append(AgentConfig(name="quiet-star", thought_budget=min(4, caps.max_thought_budget)))
    if caps.dispatch:  # an expert library: Transformer^2's two-pass dispatch, as its phase measures it
        seeds.append(AgentConfig(name="expert-dispatch", dispatch=True))
    return seeds


PLAIN = "plain"
"""The plain seed is the plain model: the prompt as is, greedy, base weights, no tools, answers read by the
harness' rules (``auto``)."""


# --------------------------------------------------------------------------------------- archive


@dataclass(frozen=True)
class ArchiveEntry:
    """One evaluated design (a typed config or generated code), its validation fitness and cost per question."""

    index: int
    generation: int
    origin: str  # seed | mutation | crossover | meta-agent
    name: str
    fitness: Fitness
    cost: Cost
    config: AgentConfig | None = None
    code: str | None = None
    parents: tuple[int, ...] = ()

    def row(self) -> dict:
        """A flat row for a table (MLflow table, Prefect artifact, JSON)."""
        return {
            "index": self.index, "generation": self.generation, "origin": self.origin, "name": self.name,
            "accuracy": self.fitness.accuracy, "median": self.fitness.median, "low": self.fitness.low,
            "high": self.fitness.high, "n": self.fitness.n, "fitness": self.fitness.describe(),
            "calls_per_query": self.cost.model_calls, "prompt_tokens_per_query": self.cost.prompt_tokens,
            "completion_tokens_per_query": self.cost.completion_tokens, "seconds_per_query": self.cost.seconds,
            "parents": list(self.parents), "config_json": self.config.to_json() if self.config else None,
            "code": self.code,
        }

    def rank_key(self) -> tuple:
        return (self.fitness.median, -self.cost.model_calls, -self.index)


@dataclass
class SearchResult:
    """The archive (every evaluated design, in order), the winner, and what was rejected along the way."""

    archive: list[ArchiveEntry]
    winner: ArchiveEntry
    rejected: list[dict] = field(default_factory=list)
    validation_uids: tuple[str, ...] = ()
    config: SearchConfig | None = None

    def rows(self) -> list[dict]:
        return [e.row() for e in self.archive]

    def best_config(self) -> AgentConfig:
        """The best typed configuration (what the served agent runs; generated code is reported, not served)."""
        typed = [e for e in self.archive if e.config is not None]
        return max(typed, key=ArchiveEntry.rank_key).config  # type: ignore[return-value]

    def seeds(self) -> list[ArchiveEntry]:
        return [e for e in self.archive if e.origin == "seed"]


# -------------------------------------------------------------------------------------- proposer


def _options(space: SearchSpace, caps: Capabilities) -> dict[str, list]:
    """Per mutable field, the values the proposer may set (cut to what the client can run)."""
    return {
        "temperature": list(space.temperatures),
        "votes": list(space.votes),
        "thought_budget": [b for b in space.thought_budgets if b <= caps.max_thought_budget] or [0],
        "extraction": list(space.extractions),
        "prompt_style": list(space.prompt_styles),
        "max_tool_calls": list(space.max_tool_calls),
        "max_new_tokens": list(space.max_new_tokens),
        "tools": [()] + [(t,) for t in caps.tools] + ([tuple(caps.tools)] if len(caps.tools) > 1 else []),
        "experts": ["base"] + (["single", "mixture"] if caps.experts else []) + (["dispatch"] if caps.dispatch else []),
    }


def _draw_experts(kind: str, caps: Capabilities, space: SearchSpace, rng: random.Random) -> dict[str, float]:
    if kind in ("base", "dispatch") or not caps.experts:
        return {}
    if kind == "single" or len(caps.experts) == 1:
        return {rng.choice(caps.experts): 1.0}
    names = rng.sample(list(caps.experts), rng.randint(2, len(caps.experts)))
    return {n: rng.choice(space.mixture_weights) for n in names}


def _mutate(fields: dict, n: int, space: SearchSpace, caps: Capabilities, rng: random.Random) -> dict:
    opts = _options(space, caps)
    mutable = [k for k, v in opts.items() if len(v) > 1]
    out = dict(fields)
    for name in rng.sample(mutable, min(n, len(mutable))):
        value = rng.choice(opts[name])
        if name == "experts":  # which weights answer: base, one expert, a mixture, or per question (dispatch)
            out["dispatch"] = value == "dispatch"
        out[name] = _draw_experts(value, caps, space, rng) if name == "experts" else value
    if out.get("dispatch") and out["experts"]:  # a crossover of a dispatch parent and a fixed-expert parent
        if rng.random() < 0.5:
            out["experts"] = {}
        else:
            out["dispatch"] = False
    # Keep the decoding consistent: self-consistency needs sampling; sampling alone may keep one vote.
    if out["votes"] > 1 and out["temperature"] == 0.0:
        if rng.random() < 0.5:
            out["votes"] = 1
        else:
            out["temperature"] = rng.choice([t for t in opts["temperature"] if t > 0] or [0.7])
    return out


def _tournament(entries: Sequence[ArchiveEntry], k: int, rng: random.Random) -> ArchiveEntry:
    return max(rng.sample(list(entries), min(k, len(entries))), key=ArchiveEntry.rank_key)


def evolve_step(
    archive: Sequence[ArchiveEntry], cfg: SearchConfig, caps: Capabilities, rng: random.Random, name: str,
    seen: set[str], max_tries: int = 200,
) -> tuple[AgentConfig, str, tuple[int, ...]] | None:
    """One new design (config, origin, parent indices) not already in ``seen``; None if none was found."""
    typed = [e for e in archive if e.config is not None]
    if not typed:
        raise ConfigError("the proposer needs at least one typed design in the archive (the seeds)")
    for _ in range(max_tries):
        first = _tournament(typed, cfg.tournament, rng)
        fields = first.config.model_dump()  # type: ignore[union-attr]
        parents: tuple[int, ...] = (first.index,)
        origin = "mutation"
        if len(typed) > 1 and rng.random() < cfg.crossover_rate:
            second = _tournament([e for e in typed if e.index != first.index], cfg.tournament, rng)
            other = second.config.model_dump()  # type: ignore[union-attr]
            fields = {k: (fields[k] if rng.random() < 0.5 else other[k]) for k in fields}
            parents, origin = (first.index, second.index), "crossover"
            fields = _mutate(fields, 1, cfg.space, caps, rng)
        else:
            fields = _mutate(fields, rng.randint(1, cfg.mutations), cfg.space, caps, rng)
        fields["name"] = name
        child = AgentConfig.model_validate(fields)
        caps.check(child)
        if child.key() not in seen:
            return child, origin, parents
    return None


PROPOSERS: dict[str, Callable] = {"evolution": evolve_step}
"""Proposal rules by name (``SearchConfig.proposer``)."""


# ------------------------------------------------------------------------------------------ search


def _evaluate(answers: Sequence[Answer], questions: Sequence[Question], cfg: SearchConfig) -> tuple[Fitness, Cost]:
    return fitness_of(outcomes(questions, answers), cfg.bootstrap_samples, cfg.seed), mean_cost(answers)


def search(
    splits: HeldOutSplits,
    client: GenerationClient,
    cfg: SearchConfig,
    *,
    seeds: Sequence[AgentConfig] | None = None,
    meta_agent: MetaAgent | None = None,
    tracker: Tracker | None = None,
) -> SearchResult:
    """Seeds, then generations of proposals, all scored on the validation split (module docstring)."""
    tracker = tracker or NullTracker()
    caps = client.capabilities()
    seeds = list(seeds) if seeds is not None else seed_agents(caps)
    if not seeds:
        raise ConfigError("the search needs at least one seed agent")
    for s in seeds:
        caps.check(s)  # every seed runnable, before any compute
    questions = splits.validation(cfg.max_questions)
    rng = random.Random(cfg.seed)
    archive: list[ArchiveEntry] = []
    rejected: list[dict] = []
    seen: set[str] = set()

    def add(config: AgentConfig | None, code: str | None, name: str, generation: int, origin: str,
            parents: tuple[int, ...], answers: Sequence[Answer]) -> ArchiveEntry:
        fit, cost = _evaluate(answers, questions, cfg)
        entry = ArchiveEntry(len(archive), generation, origin, name, fit, cost, config, code, parents)
        archive.append(entry)
        if config is not None:
            seen.add(config.key())
        tracker.log_metrics({"adas/median": fit.median, "adas/low": fit.low, "adas/high": fit.high,
                             "adas/calls_per_query": cost.model_calls}, step=entry.index)
        return entry

    total = len(seeds) + cfg.generations * cfg.population
    for s in seeds:
        if s.key() in seen:
            raise ConfigError(f"seed agent {s.name!r} repeats the design of an earlier seed")
        add(s, None, s.name, 0, "seed", (), run_agent_config(s, client, questions, seed=cfg.seed))
        tracker.progress(len(archive), total, f"seed {s.name}")
    propose = PROPOSERS[cfg.proposer]
    for g in range(1, cfg.generations + 1):
        for j in range(cfg.population):
            found = propose(archive, cfg, caps, rng, f"g{g}-{j}", seen)
            if found is None:
                rejected.append({"generation": g, "name": f"g{g}-{j}", "reason": "no new design left in the space"})
                continue
            child, origin, parents = found
            add(child, None, child.name, g, origin, parents, run_agent_config(child, client, questions, seed=cfg.seed))
            tracker.progress(len(archive), total, f"generation {g}: {child.name}")
        if meta_agent is not None:
            _meta_generation(meta_agent, archive, rejected, g, client, questions, cfg, add)
    winner = max(archive, key=ArchiveEntry.rank_key)
    return SearchResult(archive, winner, rejected, tuple(q.uid for q in questions), cfg)


def _meta_generation(meta, archive, rejected, g, client, questions, cfg, add) -> None:
    """One meta-agent proposal with at most ``max_debug_rounds`` fixes (ADAS ``debug_max``)."""
    try:
        proposal: CodeProposal = meta.propose([e.row() for e in archive])
    except MetaAgentError as exc:
        rejected.append({"generation": g, "name": "meta-agent", "reason": str(exc), "debug_rounds": 0})
        return
    rounds = 0
    while True:
        try:
            answers = run_code_agent(proposal.code, client, questions, cfg.sandbox, seed=cfg.seed)
            acc = sum(outcomes(questions, answers)) / len(questions)
            if acc < 0.01:  # ADAS treats an all-wrong agent as broken and debugs it
                raise AgentCodeError(f"accuracy {acc:.3f} < 1%: every answer is wrong")
            add(None, proposal.code, proposal.name, g, "meta-agent", (), answers)
            return
        except AgentCodeError as exc:
            if rounds >= cfg.meta_agent.max_debug_rounds:
                rejected.append({"generation": g, "name": proposal.name, "reason": str(exc)[-500:],
                                 "debug_rounds": rounds})
                return
            rounds += 1
            try:
                proposal = meta.debug(proposal, str(exc))
            except MetaAgentError as exc2:
                rejected.append({"generation": g, "name": proposal.name, "reason": str(exc2), "debug_rounds": rounds})
                return


# ------------------------------------------------------------------------------- final comparison


def final_comparison(
    splits: HeldOutSplits, client: GenerationClient, result: SearchResult, *, n_resamples: int | None = None,
    seed: int | None = None,
) -> list[dict]:
    """The winner, every seed agent (the plain one is the plain model) and the best typed config on the test split.

    Reads the test split (once: a second call raises). Per agent: accuracy with its bootstrap interval and
    median, the paired difference winner - agent over the same questions with its interval (``within
    noise`` when it covers 0), accuracy per question kind, and cost per query (model calls, tokens, seconds).
    """
    cfg = result.config or SearchConfig()
    n_resamples = n_resamples or cfg.bootstrap_samples
    seed = cfg.seed if seed is None else seed
    contenders: list[tuple[str, ArchiveEntry]] = [("winner", result.winner)]
    best_typed = result.best_config()
    if result.winner.config is None or result.winner.config.key() != best_typed.key():
        contenders.append(("best config", next(e for e in result.archive if e.config is best_typed)))
    for e in result.seeds():
        if e.index != result.winner.index:
            contenders.append(("seed (plain model)" if e.name == PLAIN else "seed", e))
        else:
            contenders[0] = ("winner = seed", e)
    test = splits.read_test()
    vectors: dict[int, list[float]] = {}
    rows = []
    for role, entry in contenders:
        if entry.config is not None:
            answers = run_agent_config(entry.config, client, test, seed=seed)
        else:
            answers = run_code_agent(entry.code or "", client, test, cfg.sandbox, seed=seed)
        values = outcomes(test, answers)
        vectors[entry.index] = values
        fit, cost = fitness_of(values, n_resamples, seed), mean_cost(answers)
        kinds = sorted({q.kind for q in test})
        by_kind = {k: sum(v for q, v in zip(test, values) if q.kind == k) / sum(q.kind == k for q in test) for k in kinds}
        rows.append({"role": role, "name": entry.name, "archive_index": entry.index,
                     "validation_median": entry.fitness.median, "test_accuracy": fit.accuracy,
                     "test_low": fit.low, "test_high": fit.high, "test_median": fit.median, "n": fit.n,
                     "calls_per_query": cost.model_calls, "prompt_tokens_per_query": cost.prompt_tokens,
                     "completion_tokens_per_query": cost.completion_tokens, "seconds_per_query": cost.seconds,
                     "accuracy_by_kind": by_kind, "config_json": entry.config.to_json() if entry.config else None})
    win = vectors[result.winner.index]
    for row in rows:
        d, lo, hi = paired_difference(win, vectors[row["archive_index"]], n_resamples, seed)
        verdict = "same agent" if row["archive_index"] == result.winner.index else (
            "within noise" if lo <= 0 <= hi else ("winner better" if d > 0 else "winner worse"))
        row.update({"winner_minus_this": d, "diff_low": lo, "diff_high": hi, "verdict": verdict})
    return rows
