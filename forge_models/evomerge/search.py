"""The evolutionary search over merge recipes: strategies (GA, CMA-ES) and the generation loop.

    result = evolve(space, cfg, evaluate, seed=0)
    result.best.genome.recipe(space, paths)      # the winner, as a mergekit recipe

``evaluate(genomes) -> fitnesses`` scores a batch (the orchestration layer fans it out; here it is just a
function). Fitness is cached by :meth:`Genome.key`: a candidate whose recipe was already scored is never
scored again, whichever strategy proposes it. Higher fitness is better.

Strategies (``STRATEGIES``), both with ``ask(generation)`` -> new candidates and ``tell(candidates)`` ->
the population that survives:

- ``ga``, the project's scheme: the first generation has ``population`` recipes cycling through the
  configured methods (each method first at its centre, mid-range weights; later ones random). Then the
  top 2 make mutants (3 each at population 8: Gaussian gene noise, sometimes a method switch) and the rest
  of the generation comes from uniform crossover of two parents drawn from the other ranks. The next
  population is the best ``population`` of the children plus the ``elites`` best of the current one.
- ``cmaes``: pycma's CMA-ES over the genes of one method with bounds (each gene's range), step size
  ``sigma0`` in units of the range and the initial point at the centre (Akiba et al.: 0.5, sigma 1/6).

The loop stops after ``generations`` or when the best has not improved by ``min_delta`` for ``patience``
generations.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from forge_models.evomerge.config import EvoMergeConfig
from forge_models.evomerge.genome import Genome, MergeSpace, diversity, gene_specs
from forge_models.runtime import ConfigError

_LOG = logging.getLogger("forge_models.evomerge")

__all__ = ["Candidate", "GenerationStats", "SearchResult", "evolve", "STRATEGIES", "GAStrategy", "CMAESStrategy"]


@dataclass
class Candidate:
    """One proposed recipe and what became of it."""

    genome: Genome
    generation: int
    origin: str  # init | mutation | crossover | cmaes | elite
    parents: tuple[str, ...] = ()
    fitness: float | None = None

    @property
    def key(self) -> str:
        return self.genome.key()


@dataclass(frozen=True)
class GenerationStats:
    generation: int
    best: float  # best fitness in the population after selection
    mean: float  # mean fitness of the candidates proposed this generation
    diversity: float  # mean pairwise genome distance of the population
    best_key: str
    evaluated: int  # candidates scored this generation (cache misses)
    cached: int  # candidates whose recipe had been scored before
    seconds: float


@dataclass
class SearchResult:
    best: Candidate
    population: list[Candidate]
    history: list[GenerationStats]
    candidates: dict[str, Candidate]  # every scored recipe, by key (first proposal kept)
    stopped_by: str  # "generations" or "plateau"
    evaluations: int
    invalid: dict[str, str] = field(default_factory=dict)  # recipe key -> why the merge would refuse it (-inf)

    def lineage(self, key: str | None = None) -> list[Candidate]:
        """The candidate (default: the best) and all its ancestors, oldest first."""
        out, seen, todo = [], set(), [key or self.best.key]
        while todo:
            k = todo.pop()
            if k in seen or k not in self.candidates:
                continue
            seen.add(k)
            out.append(self.candidates[k])
            todo.extend(self.candidates[k].parents)
        return sorted(out, key=lambda c: (c.generation, c.key))


class Strategy(Protocol):
    def ask(self, generation: int) -> list[Candidate]: ...

    def tell(self, candidates: list[Candidate]) -> list[Candidate]: ...


def _rank(cands: Sequence[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: -c.fitness if c.fitness is not None else math.inf)


class GAStrategy:
    """The project's genetic scheme (see module docstring)."""

    def __init__(self, cfg: EvoMergeConfig, space: MergeSpace, seed: int) -> None:
        self.cfg, self.space = cfg, space
        self.rng = random.Random(seed)
        self.methods = [m for m in cfg.methods if space.usable(m) is None]
        if not self.methods:
            reasons = {m: space.usable(m) for m in cfg.methods}
            raise ConfigError(f"none of the configured methods can merge these models: {reasons}")
        self.population: list[Candidate] = []
        self.seen: set[str] = set()

    def ask(self, generation: int) -> list[Candidate]:
        p = self.cfg.population
        if generation == 0:
            out, used = [], set()
            for i in range(p):
                method = self.methods[i % len(self.methods)]
                g = Genome.random(method, self.space, self.rng) if method in used else Genome.center(method, self.space)
                used.add(method)
                out.append(Candidate(g, 0, "init"))
            return self._remember(out)
        ranked = _rank(self.population)
        top = ranked[: min(2, len(ranked))]
        rest = ranked[len(top):] or ranked
        n_cross = max(1, p // 4) if len(ranked) >= 2 else 0
        n_mut = p - n_cross
        out = []
        for i in range(n_mut):
            parent = top[i * len(top) // n_mut]
            out.append(Candidate(self._fresh(lambda: self._mutate(parent.genome)), generation, "mutation", (parent.key,)))
        for _ in range(n_cross):
            a, b = self.rng.sample(rest, 2) if len(rest) >= 2 else self.rng.sample(ranked, 2)
            out.append(Candidate(self._fresh(lambda: self._crossover(a.genome, b.genome)), generation, "crossover",
                                 (a.key, b.key)))
        return self._remember(out)

    def tell(self, candidates: list[Candidate]) -> list[Candidate]:
        elites = [Candidate(c.genome, c.generation, c.origin, c.parents, c.fitness)
                  for c in _rank(self.population)[: self.cfg.elites]]
        pool, keys = [], set()
        for c in [*elites, *candidates]:  # elites first: on equal fitness the incumbent stays
            if c.key not in keys:
                keys.add(c.key)
                pool.append(c)
        self.population = _rank(pool)[: self.cfg.population]
        return list(self.population)

    def _remember(self, cands: list[Candidate]) -> list[Candidate]:
        self.seen.update(c.key for c in cands)
        return cands

    def _fresh(self, make: Callable[[], Genome], tries: int = 8) -> Genome:
        """A genome not proposed before, if one of a few draws gives it (a repeat is scored from the cache)."""
        g = make()
        for _ in range(tries):
            if g.key() not in self.seen:
                break
            g = make()
        self.seen.add(g.key())
        return g

    def _mutate(self, g: Genome) -> Genome:
        method = g.method
        if len(self.methods) > 1 and self.rng.random() < self.cfg.method_mutation_rate:
            method = self.rng.choice([m for m in self.methods if m != g.method])
        specs = gene_specs(method, self.space)
        old = g.genes(self.space)
        values = []
        for s in specs:
            base = old.get(s.name, (s.low + s.high) / 2)  # genes the old method lacked start mid-range
            values.append(base + self.rng.gauss(0.0, self.cfg.mutation_sigma * (s.high - s.low)))
        return Genome.make(method, values, self.space)

    def _crossover(self, a: Genome, b: Genome) -> Genome:
        method = self.rng.choice([a.method, b.method])
        ga, gb = a.genes(self.space), b.genes(self.space)
        values = []
        for s in gene_specs(method, self.space):
            options = [x[s.name] for x in (ga, gb) if s.name in x]
            values.append(self.rng.choice(options) if options else (s.low + s.high) / 2)
        return Genome.make(method, values, self.space)


class CMAESStrategy:
    """pycma CMA-ES over one method's genes (see module docstring)."""

    def __init__(self, cfg: EvoMergeConfig, space: MergeSpace, seed: int) -> None:
        import cma

        self.cfg, self.space, self.method = cfg, space, cfg.cmaes_method
        why = space.usable(self.method)
        if why:
            raise ConfigError(f"evomerge.cmaes_method: {why}")
        self.specs = gene_specs(self.method, space)
        x0 = list(Genome.center(self.method, space).values)
        opts = {
            "popsize": cfg.population,
            "seed": seed + 1,  # pycma treats seed 0 as "random"
            "bounds": [[s.low for s in self.specs], [s.high for s in self.specs]],
            "CMA_stds": [s.high - s.low for s in self.specs],
            "verbose": -9,
        }
        self.es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)
        self._asked: list = []
        self.population: list[Candidate] = []

    def ask(self, generation: int) -> list[Candidate]:
        self._asked = self.es.ask()
        return [Candidate(Genome.make(self.method, list(x), self.space), generation, "cmaes") for x in self._asked]

    def tell(self, candidates: list[Candidate]) -> list[Candidate]:
        # pycma minimises; it sees the rounded genome that was actually scored.
        xs = [list(c.genome.values) for c in candidates]
        self.es.tell(xs, [-(c.fitness if c.fitness is not None else -math.inf) for c in candidates])
        self.population = _rank(candidates)
        return list(self.population)


STRATEGIES: dict[str, type] = {"ga": GAStrategy, "cmaes": CMAESStrategy}


def evolve(
    space: MergeSpace,
    cfg: EvoMergeConfig,
    evaluate: Callable[[list[Genome]], list[float]],
    *,
    seed: int = 0,
    cache: dict[str, float] | None = None,
    on_generation: Callable[[GenerationStats, list[Candidate], list[Candidate]], None] | None = None,
) -> SearchResult:
    """Run the configured strategy; see the module docstring.

    Args:
        evaluate: scores a batch of genomes (never called with a recipe already in ``cache``, nor with one
            the merge registry refuses: that candidate scores -inf and its reason is logged and kept in
            ``SearchResult.invalid``, so the search goes on). A NaN fitness counts as -inf (it never wins).
        cache: recipe key -> fitness, pre-filled and updated in place (lets a rerun skip scored recipes).
        on_generation: called after each generation with (stats, population, this generation's candidates).
    """
    strategy: Strategy = STRATEGIES[cfg.strategy](cfg, space, seed)
    cache = {} if cache is None else cache
    scored: dict[str, Candidate] = {}
    history: list[GenerationStats] = []
    best: Candidate | None = None
    stale, stopped_by = 0, "generations"
    evaluations = 0
    invalid: dict[str, str] = {}
    for gen in range(cfg.generations):
        t0 = time.monotonic()
        cands = strategy.ask(gen)
        todo: dict[str, Genome] = {}
        for c in cands:
            if c.key not in cache:
                reason = c.genome.invalid_reason(space)
                if reason is not None:
                    cache[c.key] = -math.inf
                    invalid[c.key] = reason
                    _LOG.warning("EvoMerge candidate %s scores -inf without merging: %s", c.key, reason)
                    continue
                todo.setdefault(c.key, c.genome)
        if todo:
            values = evaluate(list(todo.values()))
            if len(values) != len(todo):
                raise RuntimeError(f"evaluate returned {len(values)} fitnesses for {len(todo)} genomes")
            for k, v in zip(todo, values):
                cache[k] = -math.inf if v is None or math.isnan(v) else float(v)
            evaluations += len(todo)
        for c in cands:
            c.fitness = cache[c.key]
            scored.setdefault(c.key, c)
        population = strategy.tell(cands)
        gen_best = population[0]
        improved = best is None or gen_best.fitness > best.fitness + cfg.min_delta
        if best is None or gen_best.fitness > best.fitness:
            best = gen_best
        stale = 0 if improved else stale + 1
        finite = [c.fitness for c in cands if math.isfinite(c.fitness)]
        stats = GenerationStats(
            generation=gen, best=best.fitness, mean=sum(finite) / len(finite) if finite else -math.inf,
            diversity=diversity([c.genome for c in population], space), best_key=best.key,
            evaluated=len(todo), cached=len(cands) - len(todo), seconds=time.monotonic() - t0,
        )
        history.append(stats)
        if on_generation is not None:
            on_generation(stats, population, cands)
        if stale >= cfg.patience and gen + 1 < cfg.generations:
            stopped_by = "plateau"
            break
    assert best is not None
    return SearchResult(best=scored[best.key], population=population, history=history, candidates=scored,
                        stopped_by=stopped_by, evaluations=evaluations, invalid=invalid)
