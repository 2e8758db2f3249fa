"""EvoMerge (phase 2) library: genomes, recipes, the fitness, and the GA / CMA-ES searches."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

from forge_models.evomerge import (
    SEARCHABLE_METHODS,
    EvoMergeConfig,
    FitnessConfig,
    Genome,
    MergeSpace,
    evolve,
    fitness_of,
    gene_specs,
)
from forge_models.evomerge.genome import diversity
from forge_models.merge import METHODS, MergeRecipe, merge_tensors
from forge_models.runtime import ConfigError

SPACE3 = MergeSpace(models=("math", "dialog", "story"), base="trunk", layer_groups=2)
PATHS = {"trunk": "/m/trunk", "math": "/m/math", "dialog": "/m/dialog", "story": "/m/story"}


# ------------------------------------------------------------------------------------------ config


def test_config_refuses_the_test_split_and_unknown_things():
    with pytest.raises(ValidationError, match="must not optimise on the test split"):
        FitnessConfig(split="test")
    with pytest.raises(ValidationError, match="unknown fitness metric"):
        FitnessConfig(weights={"bleu": 1.0})
    with pytest.raises(ValidationError, match="'loss' weight must be <= 0"):
        FitnessConfig(weights={"arith_em": 1.0, "loss": 0.5})
    with pytest.raises(ValidationError, match="cannot be searched"):
        EvoMergeConfig(methods=["passthrough"])  # hand-written slices: forge merge only
    with pytest.raises(ValidationError, match="elites"):
        EvoMergeConfig(population=2, elites=2)
    assert set(SEARCHABLE_METHODS) <= set(METHODS)


def test_fitness_is_the_weighted_sum_and_refuses_missing_metrics():
    m = {"arith_em": 0.5, "tool_correct": 0.25, "choice_acc": 1.0, "loss": 2.0}
    assert fitness_of(m, {"arith_em": 1, "tool_correct": 1, "choice_acc": 1, "loss": -0.1}) == pytest.approx(1.55)
    with pytest.raises(ConfigError, match="arith_em"):
        fitness_of({"loss": 2.0}, {"arith_em": 1.0})


# ------------------------------------------------------------------------------------------ genome


def test_gene_layout_follows_the_method_schema():
    names = lambda m: [s.name for s in gene_specs(m, SPACE3)]  # noqa: E731
    assert names("linear") == [f"weight.{m}.{g}" for m in SPACE3.models for g in (0, 1)]
    assert names("task_arithmetic") == names("linear")  # normalize false: no redundant lambda gene
    ties = names("ties")
    assert ties[:6] == names("linear") and ties[6:12] == [f"density.{m}.{g}" for m in SPACE3.models for g in (0, 1)]
    assert ties[-1] == "lambda"
    assert "lambda" not in names("dare_ties") and len(names("dare_ties")) == 12
    assert names("model_stock") == []
    two = MergeSpace(models=("a", "b"), base="trunk", layer_groups=3)
    assert [s.name for s in gene_specs("slerp", two)] == ["t.0", "t.1", "t.2"]
    assert SPACE3.usable("slerp") is not None and two.usable("slerp") is None
    assert MergeSpace(models=("a", "b"), base=None).usable("ties") is not None


@pytest.mark.parametrize("method", [m for m in SEARCHABLE_METHODS if m not in ("slerp", "dfs")])
def test_every_searchable_genome_is_a_valid_mergekit_recipe(method):
    g = Genome.random(method, SPACE3, random.Random(3))
    recipe = MergeRecipe.model_validate(g.recipe(SPACE3, PATHS))
    assert recipe.merge_method == method
    again = MergeRecipe.model_validate(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again == recipe
    genes = g.genes(SPACE3)
    if "weight.math.0" in genes:
        math_entry = next(m for m in recipe.models if m.model == "/m/math")
        assert math_entry.parameters["weight"] == [genes["weight.math.0"], genes["weight.math.1"]]


def test_genome_values_are_clipped_rounded_and_keyed_stably():
    g = Genome.make("ties", [1.7, -3, *[0.123456789] * 4, *[0.0] * 6, 9.0], SPACE3)
    genes = g.genes(SPACE3)
    assert genes["weight.math.0"] == 1.0 and genes["weight.math.1"] == 0.0
    assert genes["weight.dialog.0"] == 0.1235 and genes["density.math.0"] == 0.1 and genes["lambda"] == 1.5
    assert g.key() == Genome.from_dict(g.to_dict()).key()
    assert g.key() != Genome.make("ties", [*g.values[:-1], 1.4], SPACE3).key()
    with pytest.raises(ValueError, match="13 genes"):
        Genome.make("ties", [0.5], SPACE3)


def test_diversity_is_zero_for_clones_and_one_across_methods():
    a = Genome.center("linear", SPACE3)
    assert diversity([a, a, a], SPACE3) == 0.0
    assert diversity([a, Genome.center("ties", SPACE3)], SPACE3) == 1.0
    b = Genome.make("linear", [1.0] * 6, SPACE3)
    assert diversity([a, b], SPACE3) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ search


def _planted():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen)
    d1, d2 = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    target = base + 0.7 * d1 + 0.3 * d2
    space = MergeSpace(models=("a", "b"), base="base")
    calls: list[int] = []

    def evaluate(genomes):
        calls.append(len(genomes))
        out = []
        for g in genomes:
            genes = g.genes(space)
            w = [genes["weight.a.0"], genes["weight.b.0"]]
            if g.method == "linear":  # normalised: reaches the target at any common scale of (0.7, 0.3)
                merged = merge_tensors("linear", [base + d1, base + d2], weight=w) if sum(w) > 0 else base
            else:
                merged = merge_tensors(g.method, [base + d1, base + d2], base, weight=w)
            out.append(-float(torch.linalg.norm(merged - target)))
        return out

    return space, evaluate, calls


def test_cmaes_recovers_planted_weights():
    space, evaluate, calls = _planted()
    cfg = EvoMergeConfig(strategy="cmaes", cmaes_method="task_arithmetic", generations=15, population=8,
                         base_model="base", patience=15)
    result = evolve(space, cfg, evaluate, seed=0)
    genes = result.best.genome.genes(space)
    assert abs(genes["weight.a.0"] - 0.7) < 0.05 and abs(genes["weight.b.0"] - 0.3) < 0.05, genes
    assert result.evaluations == sum(calls) <= 15 * 8
    assert result.history[-1].best >= result.history[0].best


def test_ga_improves_and_never_scores_a_recipe_twice():
    space, evaluate, calls = _planted()
    scored: list[str] = []

    def counting(genomes):
        scored.extend(g.key() for g in genomes)
        return evaluate(genomes)

    cfg = EvoMergeConfig(strategy="ga", methods=["task_arithmetic", "linear"], generations=12, population=8,
                         base_model="base", patience=12)
    result = evolve(space, cfg, counting, seed=1)
    assert len(scored) == len(set(scored)) == result.evaluations
    assert result.history[-1].best > result.history[0].best + 1.0  # starts at ||0.2 d1 - 0.2 d2|| ~ 13
    best = [h.best for h in result.history]
    assert best == sorted(best)  # elitism: the best never gets worse
    genes = result.best.genome.genes(space)
    w = [genes["weight.a.0"], genes["weight.b.0"]]
    if result.best.genome.method == "linear":
        w = [x / sum(w) for x in w]
    assert abs(w[0] - 0.7) < 0.1 and abs(w[1] - 0.3) < 0.1, (result.best.genome.method, genes)
    # the winner's lineage reaches back to the initial population
    lineage = result.lineage()
    assert lineage[0].generation == 0 and lineage[-1].key == result.best.key
    assert all(p in result.candidates for c in lineage for p in c.parents)


def test_ga_follows_the_reference_scheme():
    space, evaluate, _ = _planted()
    seen = []

    def record(stats, population, cands):
        seen.append((stats, [c.origin for c in cands], [c.parents for c in cands]))

    cfg = EvoMergeConfig(strategy="ga", methods=["task_arithmetic", "linear", "ties", "dare_linear"],
                         generations=3, population=8, base_model="base", patience=5)
    evolve(space, cfg, evaluate, seed=2, on_generation=record)
    origins0 = seen[0][1]
    assert origins0 == ["init"] * 8
    origins1, parents1 = seen[1][1], seen[1][2]
    assert origins1 == ["mutation"] * 6 + ["crossover"] * 2
    top2 = {p[0] for p in parents1[:6]}
    assert len(top2) == 2  # the top 2 make 3 mutants each
    assert all(len(p) == 2 for p in parents1[6:])


def test_plateau_stops_early_and_cache_is_used():
    space = MergeSpace(models=("a", "b"), base="base")
    cfg = EvoMergeConfig(strategy="ga", methods=["model_stock"], generations=20, population=4, elites=1,
                         base_model="base", patience=2)
    calls = []
    result = evolve(space, cfg, lambda gs: calls.append(len(gs)) or [1.0] * len(gs), seed=0)
    # model_stock has no genes: one recipe, scored once, then every proposal is a cache hit
    assert result.stopped_by == "plateau" and len(result.history) == 3
    assert sum(calls) == 1 and result.history[1].cached == 4


def test_nan_fitness_never_wins():
    space = MergeSpace(models=("a", "b"), base="base")
    cfg = EvoMergeConfig(strategy="ga", methods=["linear"], generations=2, population=4, elites=1,
                         base_model="base", patience=5)
    result = evolve(space, cfg, lambda gs: [math.nan] + [0.5] * (len(gs) - 1), seed=0)
    assert result.best.fitness == 0.5


# ----------------------------------------------------------------- gene ranges and invalid genomes


def _group_params(g: Genome, space: MergeSpace, group: int) -> dict:
    genes = g.genes(space)
    if g.method == "slerp":
        return {"t": genes[f"t.{group}"]}
    params = {k: [genes[f"{k}.{m}.{group}"] for m in space.models] for k in ("weight", "density")
              if f"{k}.{space.models[0]}.{group}" in genes}
    if "lambda" in genes:
        params["lambda_"] = genes["lambda"]
    return params


@pytest.mark.parametrize("method", [m for m in SEARCHABLE_METHODS if m != "dfs"])
def test_many_random_genomes_of_every_searchable_method_merge_without_error(method):
    """Gene ranges come from the registry's limits: no random genome (nor a corner) makes the merge raise."""
    space = SPACE3 if method != "slerp" else MergeSpace(models=("a", "b"), base="trunk", layer_groups=2)
    n = len(space.models) if method != "slerp" else 1
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=gen)
    tensors = [base + 0.1 * torch.randn(16, 8, generator=gen) for _ in range(n)]
    specs = gene_specs(method, space)
    genomes = [Genome.random(method, space, rng) for _ in range(200)]
    genomes += [Genome.make(method, [s.low for s in specs], space), Genome.make(method, [s.high for s in specs], space),
                Genome.center(method, space)]
    for g in genomes:
        reason = g.invalid_reason(space)
        if reason is not None:  # the one whole-genome refusal: linear cannot normalise weights summing to 0
            assert method == "linear" and all(v == 0 for v in g.values), reason
            with pytest.raises(ValueError, match="sum to 0"):
                merge_tensors(method, tensors, None, **_group_params(g, space, 0))
            continue
        for group in range(space.layer_groups):
            out = merge_tensors(method, tensors, base if METHODS[method].base == "required" else None, seed=1,
                                **_group_params(g, space, group))
            assert out.shape == base.shape and torch.isfinite(out).all()


def test_random_genomes_of_every_searchable_method_merge_real_folders(tmp_path):
    """The same through recipes and folders (per-layer gradients over 2 layer groups included)."""
    from forge_models.evomerge import merge_candidate
    from tests.unit.test_merge import make_llama

    folders = {n: make_llama(tmp_path / n, seed=i, tokenizer=False) for i, n in enumerate(("trunk", "a", "b", "c"))}
    three = MergeSpace(models=("a", "b", "c"), base="trunk", layer_groups=2)
    two = MergeSpace(models=("a", "b"), base="trunk", layer_groups=2)
    rng = random.Random(1)
    for method in [m for m in SEARCHABLE_METHODS if m != "dfs"]:
        space = two if method == "slerp" else three
        for i in range(3):
            g = Genome.random(method, space, rng)
            assert g.invalid_reason(space) is None
            merge_candidate(g, space, folders, tmp_path / f"{method}-{i}", seed=i)
            assert (tmp_path / f"{method}-{i}" / "config.json").is_file()


def test_della_densities_stay_inside_its_magprune_limits_and_the_old_range_is_refused():
    low, high = next((s.low, s.high) for s in gene_specs("della", SPACE3) if s.kind == "density")
    assert (low, high) == (0.1501, 0.8499)
    assert next(s.low for s in gene_specs("ties", SPACE3) if s.kind == "density") == 0.1  # TIES: (0, 1]
    # The genome the old range allowed (density 0.1 < epsilon 0.15) is named as invalid, with the reason.
    specs = gene_specs("della", SPACE3)
    bad = Genome("della", tuple(0.1 if s.kind == "density" else 0.5 for s in specs))
    assert "DELLA needs 0 < density - epsilon" in bad.invalid_reason(SPACE3)


def test_an_invalid_candidate_scores_minus_inf_with_its_reason_and_the_search_goes_on(monkeypatch, caplog):
    from forge_models.evomerge import search

    space = MergeSpace(models=("a", "b"), base="base")
    specs = gene_specs("della", space)
    bad = Genome("della", tuple(0.05 if s.kind == "density" else 0.5 for s in specs))  # what a bug could propose
    original = search.GAStrategy.ask

    def ask(self, generation):
        cands = original(self, generation)
        return cands + [search.Candidate(bad, generation, "init")] if generation == 0 else cands

    monkeypatch.setattr(search.GAStrategy, "ask", ask)
    cfg = EvoMergeConfig(strategy="ga", methods=["linear", "della"], generations=3, population=4, elites=1,
                         base_model="base", patience=5)
    seen: list[Genome] = []

    def evaluate(genomes):
        seen.extend(genomes)
        return [0.5] * len(genomes)

    with caplog.at_level("WARNING", logger="forge_models.evomerge"):
        result = evolve(space, cfg, evaluate, seed=0)
    assert bad.key() not in {g.key() for g in seen}  # never merged
    assert "DELLA needs" in result.invalid[bad.key()]
    assert any(bad.key() in r.message and "-inf" in r.message for r in caplog.records)
    assert result.candidates[bad.key()].fitness == -math.inf and result.best.fitness == 0.5
    assert len(result.history) == 3


# ------------------------------------------------------------------------- merging real folders


def _tensors(folder):
    import safetensors.torch

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    assert out, f"no weights in {folder}"
    return out


def test_parents_and_average_are_scored_through_exact_linear_recipes(tmp_path):
    """The final comparison scores each parent as a one-hot linear recipe: it must be that parent, bit for bit."""
    from forge_models.evomerge.phase import reference_genomes
    from forge_models.evomerge import merge_candidate
    from tests.factories import make_llama

    folders = {n: make_llama(tmp_path / n, seed=i) for i, n in enumerate(("trunk", "a", "b", "c"))}
    space = MergeSpace(models=("a", "b", "c"), base="trunk", layer_groups=2)
    refs = reference_genomes(space)
    assert set(refs) == {"parent:a", "parent:b", "parent:c", "average"}
    merge_candidate(refs["parent:b"], space, folders, tmp_path / "pb")
    merge_candidate(refs["average"], space, folders, tmp_path / "avg")
    b = _tensors(folders["b"])
    got = _tensors(tmp_path / "pb")
    assert b.keys() == got.keys() and all(torch.equal(b[k], got[k]) for k in b)
    parts = [_tensors(folders[n]) for n in ("a", "b", "c")]
    avg = _tensors(tmp_path / "avg")
    for k in avg:
        torch.testing.assert_close(avg[k], sum(p[k] for p in parts) / 3)


def test_forge_merge_reproduces_a_recipe_that_names_store_uris(tmp_path):
    """The winner's recipe.yaml names the parents by store URI; `forge merge` fetches (verified) and merges."""
    import yaml

    from flows.cli import main
    from forge_models.evomerge import merge_candidate
    from tasks.store import Store
    from tests.factories import make_llama

    src = tmp_path / "artifact"
    folders = {n: make_llama(src / n, seed=i) for i, n in enumerate(("trunk", "a", "b"))}
    store = Store(f"file://{tmp_path}/store")
    uri = store.uri("cognate", "k1")
    store.write_prefix(src, uri, "model-set")
    space = MergeSpace(models=("a", "b"), base="trunk")
    g = Genome.make("dare_ties", [0.7, 0.4, 0.5, 0.9], space)
    merge_candidate(g, space, folders, tmp_path / "direct", seed=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(g.recipe(space, {n: store.uri_join(uri, n) for n in folders})))
    assert main(["merge", "--config", str(recipe), "--out", str(tmp_path / "again"), "--seed", "3"]) == 0
    want = _tensors(tmp_path / "direct")
    got = _tensors(tmp_path / "again")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # a tampered parent is refused, not merged
    (tmp_path / "store" / "cognate" / "k1" / "a" / "model.safetensors").write_bytes(b"garbage")
    assert main(["merge", "--config", str(recipe), "--out", str(tmp_path / "bad"), "--seed", "3"]) == 2
    assert not (tmp_path / "bad").exists()  # refused before any tensor was merged or written


def test_forge_phase_evomerge_maps_folders_to_the_pretrained_route_and_refuses_bad_input(tmp_path):
    """`forge phase evomerge --input A --input B [--base C]` is cognate(pretrained) -> evomerge on those folders."""
    from flows.cli import _phase_overrides
    from flows.config import ConfigProblems, load_config
    from tests.factories import make_llama

    a, b, base = (make_llama(tmp_path / n, seed=i) for i, n in enumerate(("a", "b", "base")))
    cfg = load_config(preset="tiny", overrides=_phase_overrides("evomerge", [str(a), str(b)], None, str(base)))
    assert cfg.phases == ["cognate", "evomerge"] and cfg.cognate.source == "pretrained"
    assert cfg.cognate.base_models == [str(a.resolve()), str(b.resolve())]
    assert cfg.cognate.common_base == str(base.resolve()) and cfg.evomerge.base_model == "base"
    assert cfg.data.tokenizer.kind == "pretrained" and cfg.data.tokenizer.path == str(a.resolve())
    no_base = load_config(preset="tiny", overrides=_phase_overrides("evomerge", [str(a), str(b)], None))
    assert no_base.evomerge.base_model is None and no_base.cognate.common_base is None
    with pytest.raises(ConfigProblems, match="at least two --input"):
        _phase_overrides("evomerge", [str(a)], None)
    with pytest.raises(ConfigProblems, match="--base is only used by forge phase evomerge"):
        _phase_overrides("bitnet", [str(a)], None, str(base))
    with pytest.raises(ConfigProblems, match="--base .*not a Hugging Face model folder"):
        _phase_overrides("evomerge", [str(a), str(b)], None, str(tmp_path / "nowhere"))
    wide = make_llama(tmp_path / "wide", seed=5, hidden_size=64)  # same layers, twice the width
    with pytest.raises(ConfigProblems, match="hidden_size") as err:
        _phase_overrides("evomerge", [str(a), str(wide)], None)
    assert "share one architecture" in str(err.value)


# ------------------------------------------------------------------------------ DFS (layer routing)

DFS_SPACE = MergeSpace(models=("a", "b"), base=None, layers=(2, 2), dfs_repeats=2)


def test_dfs_genes_are_the_indicator_slots_and_need_layer_counts():
    assert [s.name for s in gene_specs("dfs", DFS_SPACE)] == [f"slot.{t}" for t in range(8)]  # T = (2 + 2) * 2
    assert DFS_SPACE.usable("dfs") is None
    assert "layer counts" in MergeSpace(models=("a", "b"), base=None).usable("dfs")
    with pytest.raises(ConfigError, match="at least one layer"):
        MergeSpace(models=("a", "b"), base=None, layers=(2,))
    # The centre is model A as it is; a genome selecting nothing is repaired to one layer, not an error.
    centre = Genome.center("dfs", DFS_SPACE)
    assert MergeRecipe.model_validate(centre.recipe(DFS_SPACE, {"a": "/m/a", "b": "/m/b"})).parameters["indicator"] \
        == [0.5, 0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5]
    nothing = Genome.make("dfs", [-0.2, -0.9, -0.1, -0.5, -0.3, -0.4, -0.6, -0.7], DFS_SPACE)
    indicator = nothing.recipe(DFS_SPACE, {"a": "/m/a", "b": "/m/b"})["parameters"]["indicator"]
    assert [t for t, v in enumerate(indicator) if v > 0] == [2]
    with pytest.raises(ValidationError, match="dfs"):
        EvoMergeConfig(dfs_repeats=0)


@pytest.mark.parametrize("kind", ["llama", "cognate"])
def test_dfs_candidates_merge_route_and_change_depth(tmp_path, kind):
    """The centre genome reproduces model A exactly; another route gives another depth and other logits."""
    from transformers import AutoModelForCausalLM

    from forge_models.evomerge import merge_candidate
    from tests.factories import make_cognate, make_llama

    make = make_llama if kind == "llama" else make_cognate
    folders = {"a": make(tmp_path / "a", seed=1), "b": make(tmp_path / "b", seed=2)}
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    merge_candidate(Genome.center("dfs", DFS_SPACE), DFS_SPACE, folders, tmp_path / "centre")
    # a0, b1, then a0 again from the second repeat: 3 layers
    route = Genome.make("dfs", [0.3, -0.1, -0.2, 0.8, 0.6, -0.5, -0.5, -0.5], DFS_SPACE)
    merge_candidate(route, DFS_SPACE, folders, tmp_path / "route")
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folders["a"]).eval()(ids).logits
        centre = AutoModelForCausalLM.from_pretrained(tmp_path / "centre").eval()
        routed = AutoModelForCausalLM.from_pretrained(tmp_path / "route").eval()
        assert (centre(ids).logits - ref).abs().max().item() <= 1e-6
        assert routed.config.num_hidden_layers == 3
        assert (routed(ids).logits - ref).abs().max().item() > 1e-3


def test_search_space_reads_layer_counts_from_the_artifact(tmp_path):
    from flows.config import load_config
    from tasks.evomerge import search_space
    from tasks.store import Store
    from tests.factories import make_cognate, make_llama

    src = tmp_path / "artifact"
    make_llama(src / "trunk", seed=0)
    make_llama(src / "a", seed=1, num_hidden_layers=3)
    make_cognate(src / "b", seed=2)
    store = Store(f"file://{tmp_path}/store")
    uri = store.uri("cognate", "k1")
    store.write_prefix(src, uri, "model-set")
    config = load_config(preset="tiny", overrides=["evomerge.dfs_repeats=3"])
    space = search_space(config, ["trunk", "a", "b"], uri, store)
    assert space.models == ("a", "b") and space.layers == (3, 2) and space.dfs_slots == 15


def test_the_phase_scores_through_fan_out_compares_with_parents_and_prunes():
    """forge_models.evomerge.phase.run with a fan-out in this process: margins are the measured differences,
    candidates outside the population and lineage are discarded once, the recipe names the given paths."""
    from types import SimpleNamespace

    from forge_models.evomerge.phase import EvoMergeInputs, reference_genomes, run
    from forge_models.runtime import PhaseContext, RecordingTracker

    space, evaluate, _calls = _planted()
    batches: list[tuple[int, str]] = []

    def fan_out(genomes, split):
        batches.append((len(genomes), split))
        shift = 0.0 if split == "validation" else -0.01  # the test split scores a little lower
        return [SimpleNamespace(key=g.key(), fitness=f + shift, metrics={"loss": -f}) for g, f in
                zip(genomes, evaluate(genomes))]

    discarded: list[str] = []
    cfg = EvoMergeConfig(strategy="ga", methods=["linear", "task_arithmetic"], generations=3, population=4,
                         elites=1, base_model="base", patience=5)
    tracker = RecordingTracker()
    out = run(EvoMergeInputs(space=space, model_paths={"a": "s3://x/a", "b": "s3://x/b", "base": "s3://x/base"}, seed=3),
              cfg, PhaseContext(tracker=tracker), fan_out, discard=discarded.append)
    m = out.metrics
    assert batches[-1] == (4, "validation")  # winner + 2 parents + average, on the fitness split
    assert all(split == "validation" for _, split in batches)  # the test split is the final evaluation's alone
    assert not any(k.startswith("test/") for k in m)
    for split in ("validation",):
        parents = max(m[f"{split}/parent:a/fitness"], m[f"{split}/parent:b/fitness"])
        assert m[f"{split}/margin_over_best_parent"] == m[f"{split}/best/fitness"] - parents
        assert m[f"{split}/margin_over_average"] == m[f"{split}/best/fitness"] - m[f"{split}/average/fitness"]
    assert m["validation/best/fitness"] == m["best_fitness"]
    # Each discarded once; a recipe may leave the population and come back later (cached score, so the task
    # re-merges the winner if its copy is gone), so the final population may hold discarded keys.
    assert discarded and len(discarded) == len(set(discarded))
    assert {g.key() for g in reference_genomes(space).values()} - {out.details["winner_key"]} <= set(discarded)
    assert "s3://x/a" in out.details["recipe_text"] and "--seed 3" in out.details["recipe_text"]
    assert len(tracker.series("generation/best")) == m["generations"]
