"""Phase 2, EvoMerge: evolve merge recipes of several models and keep the one that scores best held out.

- ``config``: :class:`EvoMergeConfig` (strategy, generations, population, methods, fitness weights);
- ``genome``: a recipe in gene form (method + weights / densities / lambda / t per model and layer group),
  convertible to a mergekit-format recipe;
- ``search``: the GA and CMA-ES strategies and the generation loop with the recipe-hash fitness cache;
- ``fitness``: the harness-based fitness and the merge of one candidate to a folder;
- ``phase``: the phase contract ``run(inputs, cfg, ctx, fan_out) -> PhaseOutput`` (search, comparison with
  the parents and their average, margins, pruning, the winner's recipe), scoring through a given fan-out.

The merge operators themselves are ``forge_models.merge``. Orchestration (the fan-out as mapped Prefect
tasks, storing candidates and cleaning them up, the output folder) is ``tasks/evomerge.py`` and
``flows/evomerge.py``.
"""

from forge_models.evomerge.config import SEARCHABLE_METHODS, EvoMergeConfig, FitnessConfig
from forge_models.evomerge.fitness import fitness_of, merge_candidate, score
from forge_models.evomerge.genome import Genome, GeneSpec, MergeSpace, diversity, gene_specs
from forge_models.evomerge.search import STRATEGIES, Candidate, GenerationStats, SearchResult, evolve

__all__ = [
    "EvoMergeConfig", "FitnessConfig", "SEARCHABLE_METHODS", "Genome", "GeneSpec", "MergeSpace", "gene_specs",
    "diversity", "Candidate", "GenerationStats", "SearchResult", "evolve", "STRATEGIES", "fitness_of", "score",
    "merge_candidate",
]
