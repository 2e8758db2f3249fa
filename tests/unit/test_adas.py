"""ADAS over real configurations, with stub models: fitness, ranking, the split guard, the config space."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from math import comb

import pytest

from forge_models.adas import (
    AgentConfig, Capabilities, Completion, HeldOutSplits, Question, SearchConfig, TestSplitAlreadyRead,
    final_comparison, fitness_of, majority, run_agent_config, search, seed_agents,
)
from forge_models.adas.search import ArchiveEntry, evolve_step
from forge_models.adas.executor import Cost
from forge_models.adas.fitness import Fitness
from forge_models.runtime import ConfigError
from tests.unit.adas_stubs import CoinStub, binary_questions

SINGLE = AgentConfig(name="single-call")
MAJORITY5 = AgentConfig(name="majority-of-5", temperature=0.7, votes=5)


def majority_accuracy(p: Fraction, k: int) -> Fraction:
    return sum(comb(k, j) * p**j * (1 - p) ** (k - j) for j in range(k // 2 + 1, k + 1))


def test_majority_of_five_expectation_is_exact():
    assert majority_accuracy(Fraction(3, 5), 5) == Fraction(68256, 100000)


def test_majority_of_five_measured_within_interval_and_ranks_above_a_single_call():
    val, test = binary_questions("validation", 2000), binary_questions("test", 10)
    stub = CoinStub(val + test, p=0.6)
    result = search(HeldOutSplits(val, test), stub, SearchConfig(generations=0, bootstrap_samples=5000),
                    seeds=[SINGLE, MAJORITY5])
    single, maj = result.archive
    assert stub.calls == 2000 * 6  # one call per question, plus five votes per question
    # Each measured accuracy's interval holds its exact expectation (n = 2000: the interval is about +-0.02).
    assert single.fitness.low <= 0.6 <= single.fitness.high
    assert maj.fitness.low <= 0.68256 <= maj.fitness.high
    # The median ranks, and lies inside its own interval.
    for e in result.archive:
        assert e.fitness.low <= e.fitness.median <= e.fitness.high
    assert result.winner.name == "majority-of-5"
    assert single.fitness.high < maj.fitness.low  # ranked above, and not by noise at this n
    assert maj.cost.model_calls == 5 and single.cost.model_calls == 1


def test_fitness_formatter_as_in_adas():
    assert fitness_of([1.0] * 20, 1000, 0).describe() == \
        "95% Bootstrap Confidence Interval: (100.0%, 100.0%), Median: 100.0%"
    half = fitness_of([1.0] * 50 + [0.0] * 50, 5000, 0)
    assert 0.38 <= half.low <= 0.42 and 0.58 <= half.high <= 0.62 and abs(half.median - 0.5) <= 0.01


def test_only_the_validation_split_is_touched_during_search_and_test_is_read_once():
    val, test = binary_questions("validation", 60), binary_questions("test", 40)
    stub = CoinStub(val + test)
    splits = HeldOutSplits(val, test)
    result = search(splits, stub, SearchConfig(generations=2, population=3, max_questions=30, bootstrap_samples=500))
    first30 = {q.uid for q in val[:30]}
    assert splits.touched == {"validation": set(range(30)), "test": set()}
    assert stub.seen == first30  # the model never saw a test question, nor validation beyond the first 30
    assert set(result.validation_uids) == first30
    rows = final_comparison(splits, stub, result)
    assert splits.touched["test"] == set(range(40))
    assert stub.seen - first30 == {q.uid for q in test}
    assert rows[0]["role"].startswith("winner") and len(rows) >= len(seed_agents(Capabilities()))
    with pytest.raises(TestSplitAlreadyRead):
        splits.read_test()
    with pytest.raises(TestSplitAlreadyRead):
        final_comparison(splits, stub, result)


def test_final_comparison_has_intervals_paired_differences_and_costs():
    val, test = binary_questions("validation", 300), binary_questions("test", 300)
    stub = CoinStub(val + test)
    splits = HeldOutSplits(val, test)
    result = search(splits, stub, SearchConfig(generations=0, bootstrap_samples=1000), seeds=[SINGLE, MAJORITY5])
    rows = final_comparison(splits, stub, result)
    by_name = {r["name"]: r for r in rows}
    assert by_name["majority-of-5"]["role"].startswith("winner")
    assert by_name["single-call"]["calls_per_query"] == 1 and by_name["majority-of-5"]["calls_per_query"] == 5
    for r in rows:
        assert r["test_low"] <= r["test_accuracy"] <= r["test_high"]
        assert r["diff_low"] <= r["winner_minus_this"] <= r["diff_high"]
    assert by_name["majority-of-5"]["verdict"] == "same agent"


def test_splits_refuse_overlap_and_wrong_split_names():
    val = binary_questions("validation", 5)
    with pytest.raises(ConfigError, match="both validation and test"):
        HeldOutSplits(val, [Question(uid="test/0", split="test", index=0, prompt=val[0].prompt, answer="yes")])
    with pytest.raises(ConfigError, match="not from the test split"):
        HeldOutSplits(val, val)


def test_agent_config_json_round_trip_and_refusals():
    cfg = AgentConfig(name="mix", experts={"math": 0.5, "dialog": 1.0}, thought_budget=4, tools=("calculator",),
                      max_tool_calls=3, temperature=0.3, votes=7, extraction="last_number", prompt_style="cot",
                      max_new_tokens=48)
    text = cfg.to_json()
    assert AgentConfig.from_json(text) == cfg
    assert json.loads(text)["experts"] == {"dialog": 1.0, "math": 0.5}
    assert AgentConfig.from_json(text).key() == cfg.model_copy(update={"name": "other"}).key()
    with pytest.raises(ConfigError):
        AgentConfig.from_json('{"votes": 5}')  # self-consistency with greedy decoding
    for bad in ({"extraction": "psychic"}, {"tools": ["browser"]}, {"experts": {"math": 1.5}},
                {"experts": {"math": 0.0}}, {"colour": "red"}, {"thought_budget": -1},
                {"dispatch": True, "experts": {"math": 1.0}}):  # dispatch picks per question: no fixed expert
        with pytest.raises(ConfigError):
            AgentConfig.from_json(json.dumps(bad))


def test_proposer_only_produces_valid_new_configs_within_capabilities():
    caps = Capabilities(experts=("math", "dialog", "story"), max_thought_budget=4)
    cfg = SearchConfig(crossover_rate=0.5, mutations=3)
    rng = random.Random(0)
    archive = [ArchiveEntry(i, 0, "seed", s.name, Fitness(0.5, 0.5 + i / 100, 0.4, 0.6, 10), Cost(1), s)
               for i, s in enumerate(seed_agents(caps))]
    seen = {e.config.key() for e in archive}
    kinds = set()
    for n in range(300):
        found = evolve_step(archive, cfg, caps, rng, f"c{n}", seen)
        assert found is not None
        child, origin, parents = found
        assert AgentConfig.model_validate(child.model_dump()) == child
        caps.check(child)
        assert child.thought_budget <= 4 and set(child.experts) <= {"math", "dialog", "story"}
        assert child.votes == 1 or child.temperature > 0
        assert child.key() not in seen
        assert all(0 <= p < len(archive) for p in parents)
        seen.add(child.key())
        archive.append(ArchiveEntry(len(archive), 1, origin, child.name, Fitness(0.5, 0.5, 0.4, 0.6, 10), Cost(1), child))
        kinds.add(("mixture" if len(child.experts) > 1 else "expert" if child.experts else "base", bool(child.tools)))
    assert len(kinds) >= 5  # the proposer explores experts, mixtures and tools, not one corner
    assert not any(e.config.dispatch for e in archive)  # the client cannot dispatch: never proposed
    # A client that can dispatch: the seed exists, children dispatch too, and never with fixed experts.
    caps_d = Capabilities(experts=("math", "dialog"), dispatch=True)
    seeds = seed_agents(caps_d)
    assert [s.name for s in seeds if s.dispatch] == ["expert-dispatch"]
    arch = [ArchiveEntry(i, 0, "seed", s.name, Fitness(0.5, 0.5 + i / 100, 0.4, 0.6, 10), Cost(1), s)
            for i, s in enumerate(seeds)]
    seen_d = {e.config.key() for e in arch}
    rng3 = random.Random(2)
    dispatching = 0
    for n in range(200):
        child = evolve_step(arch, cfg, caps_d, rng3, f"d{n}", seen_d)[0]
        caps_d.check(child)
        assert not (child.dispatch and child.experts)
        dispatching += child.dispatch
        seen_d.add(child.key())
        arch.append(ArchiveEntry(len(arch), 1, "mutation", child.name, Fitness(0.5, 0.5, 0.4, 0.6, 10), Cost(1), child))
    assert 0 < dispatching < 200
    # Without experts or thoughts in the client, none is ever proposed.
    bare = Capabilities()
    rng2 = random.Random(1)
    for n in range(100):
        found = evolve_step(archive[:4], cfg, bare, rng2, f"b{n}", set())
        assert found is not None and not found[0].experts and found[0].thought_budget == 0


def test_search_is_reproducible_and_archive_is_never_pruned():
    val, test = binary_questions("validation", 40), binary_questions("test", 5)

    def run():
        stub = CoinStub(val + test)
        return search(HeldOutSplits(val, test), stub, SearchConfig(generations=3, population=4, bootstrap_samples=300, seed=7))

    a, b = run(), run()
    assert [(r["name"], r["config_json"], r["median"]) for r in a.rows()] == \
        [(r["name"], r["config_json"], r["median"]) for r in b.rows()]
    assert len(a.archive) == len(seed_agents(Capabilities())) + 3 * 4
    assert [e.index for e in a.archive] == list(range(len(a.archive)))
    assert a.winner.fitness.median == max(e.fitness.median for e in a.archive)
    keys = [e.config.key() for e in a.archive]
    assert len(set(keys)) == len(keys)


def test_a_config_the_client_cannot_run_is_refused_before_any_call():
    val = binary_questions("validation", 3)
    stub = CoinStub(val)
    for cfg in (AgentConfig(thought_budget=2), AgentConfig(experts={"math": 1.0})):
        with pytest.raises(ConfigError, match="cannot run"):
            run_agent_config(cfg, stub, val)
    assert stub.calls == 0


def test_majority_vote_ties_and_none():
    assert majority(["3", None, "4", "4", "3"]) == "3"
    assert majority([None, None]) is None
    assert majority(["a", "b", "b"]) == "b"


class ToolStub:
    """Writes a calculator call first, then states the answer after seeing the tool's result."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def generate(self, prompts, *, temperature, max_new_tokens, seed, thought_budget, expert, stop):
        self.prompts.extend(prompts)
        outs = []
        for p in prompts:
            if "Tool:" in p:
                outs.append(Completion(" The answer is " + p.rsplit("Tool: ", 1)[1].split("\n")[0] + ".", 5, 5))
            elif "</tool>" in stop:
                outs.append(Completion(" <tool>calculator(6 * 7)</tool>", 4, 8))
            else:
                outs.append(Completion(" The answer is 41.", 4, 5))  # without tools: wrong
        return outs


def test_tool_loop_runs_the_calculator_and_counts_every_call():
    q = [Question(uid="validation/0", split="validation", index=0, prompt="User: What is 6 times 7?\nAssistant:",
                  answer="42", kind="tool", stops=("\n",))]
    stub = ToolStub()
    with_tools = run_agent_config(AgentConfig(tools=("calculator",)), stub, q)[0]
    assert with_tools.prediction == "42"
    assert with_tools.cost == Cost(2, 9, 13, with_tools.cost.seconds)
    assert "Tool: 42\nAssistant:" in stub.prompts[-1]
    assert run_agent_config(AgentConfig(), stub, q)[0].prediction == "41"
    assert run_agent_config(AgentConfig(tools=("calculator",), extraction="tool_result"), stub, q)[0].prediction == "42"


def test_model_client_runs_configs_on_a_real_model_with_seeded_sampling():
    from forge_models.adas import ModelClient
    from forge_models.runtime import PhaseContext
    from forge_models.tokenizer import train_bpe
    from tests.factories import tiny_llama

    tok = train_bpe(["Q: What is 2 + 3?\nA: The answer is 5.\n", "User: Add 4 to 5.\nAssistant: 9"] * 20, 300)
    model = tiny_llama(vocab=len(tok), max_position_embeddings=128)
    client = ModelClient(model, tok, PhaseContext(precision="fp32"), batch_size=4)
    qs = [Question(uid=f"validation/{i}", split="validation", index=i, prompt=f"Q: What is {i} + 3?\nA:",
                   answer=str(i + 3), kind="arithmetic", stops=("\n",)) for i in range(3)]
    sampled = AgentConfig(temperature=1.0, votes=3, max_new_tokens=6)
    a, b = run_agent_config(sampled, client, qs, seed=5), run_agent_config(sampled, client, qs, seed=5)
    assert [x.texts for x in a] == [x.texts for x in b]  # explicit seeds: reproducible
    c = run_agent_config(sampled, client, qs, seed=6)
    assert [x.texts for x in a] != [x.texts for x in c]
    assert any(len(set(x.texts)) > 1 for x in a)  # the votes are different samples
    for ans in a:
        assert ans.cost.model_calls == 3 and ans.cost.prompt_tokens > 0 and 0 < ans.cost.completion_tokens <= 18
    with pytest.raises(ConfigError, match="cannot run"):
        run_agent_config(AgentConfig(thought_budget=2), client, qs)


def test_designs_differing_only_in_inert_fields_are_one_design():
    assert AgentConfig(max_tool_calls=3).key() == AgentConfig(max_tool_calls=1).key()
    assert AgentConfig(tools=("calculator",), max_tool_calls=3).key() != AgentConfig(tools=("calculator",), max_tool_calls=1).key()


def test_bootstrap_median_interval_shares_the_harness_interval():
    from forge_models.eval.stats import bootstrap_interval, bootstrap_median_interval

    values = [1.0] * 37 + [0.0] * 63
    median, low, high = bootstrap_median_interval(values, 3000, 4)
    assert (low, high) == bootstrap_interval(values, 3000, 4)
    assert low < median < high and abs(median - 0.37) <= 0.02


def test_a_stored_dispatch_agent_needs_the_expert_library_beside_it(tmp_path):
    from forge_models.runtime import ArtifactIntegrityError

    path = tmp_path / "agent.json"
    path.write_text(AgentConfig(name="d", dispatch=True).to_json())
    assert AgentConfig.from_artifact(path, ["arithmetic"]).dispatch
    with pytest.raises(ArtifactIntegrityError, match="agent.json: asks for dispatch"):
        AgentConfig.from_artifact(path, [])
