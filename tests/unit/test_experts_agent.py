"""The experts phase's ADAS hook on a tiny model with a tiny budget: real adapters (expert library, tool
runtime), fitness on validation only, the test split read once, the chosen config a loadable AgentConfig."""

from __future__ import annotations

import pytest
import torch

from forge_models.adas import AgentConfig, TestSplitAlreadyRead
from forge_models.experts import load_experts, save_experts
from forge_models.experts.agent import ExpertsClient, LibraryApplier, search_agent
from forge_models.experts.config import AgentSearchConfig, ExpertsConfig
from forge_models.experts.svf import decompose, find_targets
from forge_models.runtime import ConfigError, PhaseContext
from tests.factories import corpus_and_tokenizer, tiny_llama

CTX = PhaseContext(seed=0, precision="fp32")


def _z(bases, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: 2.0 * torch.randn(b.rank, generator=g) for n, b in bases.items()}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus, tok = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    model = tiny_llama(vocab=len(tok), max_position_embeddings=256)
    bases = decompose(model, find_targets(model, ["mlp"]))
    folder = tmp_path_factory.mktemp("lib") / "experts"
    save_experts(folder, bases, {"arithmetic": _z(bases, 1), "tool": _z(bases, 2)}, 1.0, {})
    return model, tok, corpus, load_experts(folder)


@pytest.fixture(scope="module")
def dispatch_setup(setup, tmp_path_factory):
    """The same experts, stored with the first pass's exemplars (as the phase stores them)."""
    from forge_models.experts.phase import exemplars_for

    model, tok, corpus, lib = setup
    folder = tmp_path_factory.mktemp("dlib") / "experts"
    exemplars = exemplars_for(["arithmetic", "tool"], corpus.split("train"), 2, 0)
    save_experts(folder, lib.bases, lib.z, 1.0, {"dispatch": {"method": "exemplar", "margin": 0.0, "exemplars": exemplars}})
    return model, tok, corpus, load_experts(folder)


def test_a_dispatch_agent_answers_each_question_with_the_expert_its_first_pass_chose(dispatch_setup, one_thread):
    from forge_models.adas import run_agent_config
    from forge_models.adas.questions import questions_from_examples

    model, tok, corpus, lib = dispatch_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = ExpertsClient(model, tok, CTX, experts=LibraryApplier(lib))
    assert client.capabilities().dispatch
    qs = questions_from_examples("validation", corpus.split("validation"), ("arithmetic", "tool", "persona"))[:12]
    routes = client.dispatch([q.prompt for q in qs])
    assert [r.expert for r in routes] == [lab if lab in lib.skills else None for lab in lib.classify(
        model, tok, [q.prompt for q in qs], CTX)]
    assert all(r.model_calls == 3 and r.prompt_tokens > 0 for r in routes)  # the prompt alone, then per exemplar
    assert {r.expert for r in routes} == {None, "arithmetic"}  # this seed's first pass splits the set both ways
    answers = run_agent_config(AgentConfig(name="d", dispatch=True, max_new_tokens=6), client, qs)
    for expert in {r.expert for r in routes}:  # each group equals that expert (or the base) answering it alone
        idx = [i for i, r in enumerate(routes) if r.expert == expert]
        fixed = AgentConfig(name="f", experts={expert: 1.0} if expert else {}, max_new_tokens=6)
        alone = run_agent_config(fixed, client, [qs[i] for i in idx])
        assert [answers[i].texts for i in idx] == [a.texts for a in alone]
        assert all(answers[i].cost.model_calls == 3 + a.cost.model_calls for i, a in zip(idx, alone))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Without exemplars the client cannot dispatch, and a dispatch design is refused before any call.
    bare = ExpertsClient(model, tok, CTX, experts=LibraryApplier(_plain(dispatch_setup)))
    assert not bare.capabilities().dispatch
    with pytest.raises(ConfigError, match="dispatch"):
        run_agent_config(AgentConfig(name="d", dispatch=True), bare, qs)


def _plain(dispatch_setup):
    from forge_models.experts import ExpertLibrary

    lib = dispatch_setup[3]
    return ExpertLibrary(lib.bases, lib.z, lib.max_mult, {})


def test_the_served_agent_dispatches_each_request_to_the_expert_its_first_pass_chose(dispatch_setup, tmp_path):
    from flows.agent import Agent, ChatParams, ServingLimits

    model, tok, corpus, lib = dispatch_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def answer(cfg, text):
        agent = Agent(model, tok, tmp_path, "digest", torch.device("cpu"), ServingLimits(), agent_config=cfg,
                      experts=lib)
        out = agent.reply([{"role": "user", "content": text}], ChatParams(max_tokens=8))
        return out["choices"][0]["message"]["content"], out["custom_outputs"].get("dispatched_expert", "absent")

    from forge_models.adas.questions import questions_from_examples

    arith = questions_from_examples("validation", corpus.split("validation"), ("arithmetic",))[0].prompt
    texts = ["What is 2 plus 3?", arith]
    seen = set()
    for text in texts:
        label = lib.classify(model, tok, [text], CTX)[0]
        expected = label if label in lib.skills else None
        reply, routed = answer(AgentConfig(name="d", dispatch=True), text)
        assert routed == expected
        seen.add(routed)
        fixed = AgentConfig(name="f", experts={expected: 1.0}) if expected else AgentConfig(name="b")
        assert reply == answer(fixed, text)[0]
        assert answer(fixed, text)[1] == "absent"  # only a dispatch agent reports a routing
    assert seen == {None, "arithmetic"}  # both paths ran: the base for one request, an expert for the other
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adas_config_is_documented_and_strict():
    assert ExpertsConfig(adas={"enabled": False}).adas.enabled is False
    assert all(f.description for f in AgentSearchConfig.model_fields.values())
    with pytest.raises(ValueError):
        AgentSearchConfig(bogus=1)


def test_library_applier_changes_outputs_and_restores_the_base(setup):
    model, tok, corpus, lib = setup
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applier = LibraryApplier(lib)
    assert applier.names == ("arithmetic", "tool")
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with applier.applied(model, {"tool": 1.0}):
            one = model(input_ids=ids).logits
        with applier.applied(model, {"arithmetic": 0.5, "tool": 0.5}):
            mix = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.equal(base, one) and not torch.equal(one, mix)
    assert torch.equal(base, after)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="persona"):
        applier.applied(model, {"persona": 1.0})


def test_client_tool_loop_runs_the_tool_runtime(setup):
    model, tok, corpus, lib = setup
    client = ExpertsClient(model, tok, CTX, experts=LibraryApplier(lib))
    runs = client.tool_loop(["User: What is 2 plus 3?\nAssistant:"], tools=("calculator",), max_tool_calls=1,
                            temperature=0.0, max_new_tokens=6, seed=0, thought_budget=0, expert={"tool": 1.0},
                            stop=("\n",))
    assert len(runs) == 1 and runs[0].model_calls >= 1 and runs[0].completion_tokens >= 1
    assert client.capabilities().max_thought_budget == 0  # no Quiet-STaR head: the thought budget stays 0
    with pytest.raises(ConfigError, match="thought"):
        client.tool_loop(["x"], tools=("calculator",), max_tool_calls=1, temperature=0.0, max_new_tokens=2, seed=0,
                         thought_budget=2, expert=None, stop=())


def test_search_touches_only_validation_then_reads_test_once(setup, one_thread):
    model, tok, corpus, lib = setup
    cfg = AgentSearchConfig(enabled=True, generations=1, population=2, validation_questions=8, test_questions=8,
                            bootstrap_samples=200, max_new_tokens=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = search_agent(model, tok, lib, corpus, cfg, CTX)
    assert out.touched_by_search == {"validation": list(range(8)), "test": []}
    assert out.splits.touched["validation"] == set(range(8))
    assert out.splits.touched["test"] == set(range(8))  # exactly once, by the final comparison
    with pytest.raises(TestSplitAlreadyRead):
        out.splits.read_test()
    assert len(out.result.archive) == 4 + 2  # plain, cot, self-consistency-5, tools-first + 1 x 2 proposals
    assert {q.prompt for q in out.validation}.isdisjoint({q.prompt for q in out.test})
    assert {q.kind for q in out.validation} == {"arithmetic", "tool", "persona", "narrative"}
    assert AgentConfig.from_json(out.chosen.to_json()) == out.chosen
    roles = {r["role"] for r in out.comparison}
    assert any("plain" in r for r in roles) or out.result.winner.name == "plain"
    m = out.metrics()
    for row in out.comparison:
        p = f"adas/test/{row['name']}"
        assert m[f"{p}/accuracy_lo"] <= m[f"{p}/accuracy"] <= m[f"{p}/accuracy_hi"]
        assert m[f"{p}/calls_per_query"] >= 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_served_agent_applies_the_configured_expert_and_restores_the_base(setup, tmp_path):
    from flows.agent import Agent, ChatParams, ServingLimits

    model, tok, corpus, lib = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    question = [{"role": "user", "content": "What is 2 plus 3?"}]

    def answer(cfg):
        agent = Agent(model, tok, tmp_path, "digest", torch.device("cpu"), ServingLimits(), agent_config=cfg,
                      experts=lib)
        out = agent.reply(question, ChatParams(max_tokens=12))
        return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]

    base = answer(AgentConfig(name="base"))
    assert answer(AgentConfig(name="tool", experts={"tool": 1.0})) != base  # the expert changes the reply
    assert answer(AgentConfig(name="base")) == base  # and the base weights came back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_quietstar_model_gets_its_thought_budget_searched(one_thread, tmp_path):
    """With a thinker the space holds thought budgets: the thinking seed is evaluated through the thought
    decoder, and the test comparison covers it; without one every design has budget 0."""
    from forge_models.experts.agent import QuietStarThinker
    from forge_models.quietstar import QuietStar, QuietStarConfig

    corpus, tok = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    torch.manual_seed(0)
    qs = QuietStar.wrap(tiny_llama(vocab=len(tok), max_position_embeddings=256), tok,
                        QuietStarConfig(thought_tokens=2)).float().eval()
    bases = decompose(qs.model, find_targets(qs.model, ["mlp"]))
    save_experts(tmp_path / "experts", bases, {"tool": _z(bases, 2)}, 1.0, {})
    cfg = AgentSearchConfig(enabled=True, generations=0, validation_questions=8, test_questions=8,
                            bootstrap_samples=200, max_new_tokens=4, max_thought_budget=4)
    class Counting(QuietStarThinker):
        budgets: list[int] = []

        def generate_fn(self, budget):
            self.budgets.append(budget)
            return super().generate_fn(budget)

    thinker = Counting(qs)
    out = search_agent(qs.model, tok, load_experts(tmp_path / "experts"), corpus, cfg, CTX,
                       thinker=thinker, max_thought_budget=cfg.max_thought_budget)
    by_name = {e.name: e for e in out.result.archive}
    assert by_name["quiet-star"].config.thought_budget == 4
    assert thinker.budgets and set(thinker.budgets) == {4}  # it really went through the thought decoder
    assert "quiet-star" in {r["name"] for r in out.comparison}
    plain = search_agent(qs.model, tok, load_experts(tmp_path / "experts"), corpus, cfg, CTX)  # no thinker
    assert all(e.config.thought_budget == 0 for e in plain.result.archive)


def test_a_served_dispatch_agent_whose_library_has_no_exemplars_is_refused_at_load(setup, tmp_path):
    from flows.agent import _attachments
    from forge_models.runtime import ArtifactIntegrityError

    _model, _tok, _corpus, lib = setup  # stored without the first pass's exemplars
    save_experts(tmp_path / "experts", lib.bases, lib.z, 1.0, {})
    (tmp_path / "agent.json").write_text(AgentConfig(name="d", dispatch=True).to_json())
    with pytest.raises(ArtifactIntegrityError, match="agent.json: asks for dispatch but experts/ stores no"):
        _attachments(tmp_path)
    (tmp_path / "agent.json").write_text(AgentConfig(name="e", experts={"tool": 1.0}).to_json())
    assert _attachments(tmp_path)[0].experts == {"tool": 1.0}  # the same library serves a fixed expert
