"""Generation with a thought budget behind ``generate``'s signature (forge_models.quietstar.generation), in the
tool loop and in the agent search's client."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from forge_models.generation import Generation, GenerationConfig
from forge_models.quietstar import QuietStar, QuietStarConfig, generate_ids
from forge_models.quietstar.generation import thought_generate
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tools import default_registry, run_agent_batch
from tests.factories import byte_tokenizer, save_tokenizer, tiny_llama

VOCAB = 97
CTX = PhaseContext()


@pytest.fixture
def thinking(tmp_path):
    save_tokenizer(tmp_path / "tok", VOCAB)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    tok.eos_token = "t1"
    torch.manual_seed(0)
    qs = QuietStar.wrap(tiny_llama(), tok, QuietStarConfig(thought_tokens=3, eval_temperature=1e-6)).float().eval()
    with torch.no_grad():
        qs.head.net[-1].bias.fill_(0.4)  # w != 0: the thought changes the prediction
    return qs, tok


@pytest.mark.parametrize("budget", [0, 3])
def test_greedy_tokens_are_the_thought_decoders(thinking, budget):
    qs, tok = thinking
    prompt = "t3 t9 t14 t2 t40"
    out = thought_generate(qs, budget)(qs.model, tok, [prompt], GenerationConfig(max_new_tokens=8), CTX)[0]
    ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    ref = generate_ids(qs, ids, 8, budget=budget, eos={tok.eos_token_id}, seed=0)
    ref = [t for t in ref if t != tok.eos_token_id]
    assert out.token_ids == ref and out.prompt_tokens == len(ids)
    assert not {qs.start_id, qs.end_id} & set(out.token_ids)  # thoughts never reach the output


def test_a_thought_changes_what_is_generated_and_stops_and_hooks_hold(thinking):
    qs, tok = thinking
    cfg = GenerationConfig(max_new_tokens=12)
    plain = thought_generate(qs, 0)(qs.model, tok, ["t3 t9 t14"], cfg, CTX)[0]
    thought = thought_generate(qs, 3)(qs.model, tok, ["t3 t9 t14"], cfg, CTX)[0]
    assert plain.token_ids != thought.token_ids
    first = tok.decode(thought.token_ids[:1])
    hooks = []
    cut = thought_generate(qs, 3, step_hook=lambda: hooks.append(1))(
        qs.model, tok, ["t3 t9 t14"], cfg.model_copy(update={"stop": (first,)}), CTX)[0]
    assert cut.finish == "stop" and cut.token_ids == thought.token_ids[:1] and cut.text.endswith(first)
    assert len(hooks) == 1  # one check per generated token
    with pytest.raises(ConfigError, match="not the thinking model"):
        thought_generate(qs, 2)(tiny_llama(), tok, ["t3"], cfg, CTX)
    with pytest.raises(ConfigError, match="no room"):
        thought_generate(qs, 2)(qs.model, tok, [" ".join(["t5"] * 62)], cfg, CTX)


def test_the_tool_loop_generates_through_the_function_it_is_given():
    """``generate_fn`` replaces the generator at every step: a scripted one calls the calculator, sees its
    result, and answers; the runtime executes the call in between."""
    seen = []

    def scripted(model, tokenizer, prompts, cfg, ctx, *, generator=None, max_positions=None):
        seen.append(len(prompts))
        text = "<tool>calculator(2 + 3)</tool>" if len(seen) == 1 else "The answer is 5."
        return [Generation(text=text, token_ids=[5], prompt_tokens=3, finish="stop") for _ in prompts]

    turn = run_agent_batch(None, byte_tokenizer(), ["User: What is 2 plus 3?\nAssistant:"], registry=default_registry(),
                           gen=GenerationConfig(max_new_tokens=8), ctx=CTX, generate_fn=scripted)[0]
    assert seen == [1, 1]
    assert [c.result for c in turn.tool_calls] == ["5"] and turn.answer == "The answer is 5."


def test_the_search_client_runs_a_thought_budget_only_with_a_thinker(thinking):
    from forge_models.experts.agent import ExpertsClient, QuietStarThinker

    qs, tok = thinking
    with_thoughts = ExpertsClient(qs.model, tok, CTX, thinker=QuietStarThinker(qs), max_thought_budget=4)
    assert with_thoughts.capabilities().max_thought_budget == 4
    kw = dict(temperature=0.0, max_new_tokens=4, seed=0, expert=None, stop=())
    got = with_thoughts.generate(["t3 t9 t14"], thought_budget=3, **kw)[0]
    ref = thought_generate(qs, 3)(qs.model, tok, ["t3 t9 t14"], GenerationConfig(max_new_tokens=4), CTX)[0]
    assert got.text == ref.text and got.completion_tokens == len(ref.token_ids)
    runs = with_thoughts.tool_loop(["t3 t9 t14"], tools=("calculator",), max_tool_calls=1, thought_budget=3, **kw)
    assert runs[0].completion_tokens >= 1
    with pytest.raises(ConfigError, match="beyond this client's 4"):
        with_thoughts.tool_loop(["t3"], tools=("calculator",), max_tool_calls=1, thought_budget=8, **kw)
    plain = ExpertsClient(qs.model, tok, CTX)
    with pytest.raises(ConfigError, match="no Quiet-STaR head"):
        plain.tool_loop(["t3"], tools=("calculator",), max_tool_calls=1, thought_budget=2, **kw)
