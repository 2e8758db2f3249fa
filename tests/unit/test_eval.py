"""The evaluation harness, checked against models whose right answers are known by construction."""

from __future__ import annotations

import math
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from forge_models.config import EvalConfig, SyntheticConfig
from forge_models.data import Example, generate_synthetic, split_examples
from forge_models.eval import evaluate, extract_answer, greedy_generate, parse_tool_call, unigram_loss
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tokenizer import train_bpe

torch.set_num_threads(1)

CTX = PhaseContext(precision="fp32")
CFG = EvalConfig(max_examples=8, ppl_max_tokens=2000, max_new_tokens=48, batch_size=4, seq_len=64)


# --------------------------------------------------------------------------------------- fakes


class CharTokenizer:
    """One token per printable ASCII character; id 0 = EOS (also BOS), id 1 = PAD."""

    eos_token_id = 0
    bos_token_id = 0
    pad_token_id = 1

    def __init__(self) -> None:
        self.chars = string.printable
        self.index = {c: i + 2 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 2

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        out = {"input_ids": [[self.index[c] for c in t] for t in texts]}
        if return_offsets_mapping:
            out["offset_mapping"] = [[(i, i + 1) for i in range(len(t))] for t in texts]
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)


class ScriptedLM(nn.Module):
    """A causal "LM" that continues each known prompt with a fixed script, then EOS.

    At every position it decodes the prefix; if the prefix holds a known prompt followed by the start
    of its script, the next character of the script (or EOS) gets logit 10 and every other token 0.
    Anything else gets uniform logits. It also refuses inputs longer than its max positions.
    """

    def __init__(self, tokenizer: CharTokenizer, scripts: dict[str, str], max_positions: int = 512) -> None:
        super().__init__()
        self.tok = tokenizer
        self.scripts = scripts
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.seen_lengths: list[int] = []

    def next_token(self, prefix: str) -> int | None:
        for prompt, script in self.scripts.items():
            at = prefix.find(prompt)  # find, not startswith: the harness may cut a prompt's beginning
            done = len(prefix) - at - len(prompt)
            if at >= 0 and script.startswith(prefix[at + len(prompt) :]):
                return self.tok.index[script[done]] if done < len(script) else self.tok.eos_token_id
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        batch, length = input_ids.shape
        assert length <= self.config.max_position_embeddings, "input longer than max positions"
        self.seen_lengths.append(length)
        logits = torch.zeros(batch, length, len(self.tok))
        for b in range(batch):
            row = input_ids[b].tolist()
            for t in range(length):
                target = self.next_token(self.tok.decode(row[: t + 1]))
                if target is not None:
                    logits[b, t, target] = 10.0
        return SimpleNamespace(logits=logits)


class UniformLM(nn.Module):
    """All-zero logits: every token has probability 1/vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class SuccessorLM(nn.Module):
    """Predicts a fixed successor of the current token with near certainty (a perfect bigram oracle)."""

    def __init__(self, vocab: int, successor: dict[int, int]) -> None:
        super().__init__()
        self.vocab, self.successor = vocab, successor

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for (b, t), token in zip(
            [(b, t) for b in range(input_ids.shape[0]) for t in range(input_ids.shape[1])], input_ids.flatten().tolist()
        ):
            logits[b, t, self.successor.get(token, 1)] = 30.0
        return SimpleNamespace(logits=logits)


@pytest.fixture()
def tok() -> CharTokenizer:
    return CharTokenizer()


def _arith(question: str, answer: str) -> Example:
    prompt = f"Q: What is {question}?\nA:"
    return Example(kind="arithmetic", text=f"{prompt} The answer is {answer}.\n", prompt=prompt, answer=answer)


def _tool(question: str, expr: str, answer: str) -> Example:
    prompt = f"User: {question}\nAssistant:"
    text = f"{prompt} <tool>calculator({expr})</tool>\nTool: {answer}\nAssistant: The answer is {answer}.\n"
    return Example(kind="tool", text=text, prompt=prompt, answer=answer)


def _choice(kind: str, prompt: str, choices: tuple[str, ...], label: int) -> Example:
    return Example(kind=kind, text=prompt + choices[label] + "\n", prompt=prompt, choices=choices, label=label)


# ------------------------------------------------------------------------------- answer parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 4 * 2 = 8. 3 + 8 = 11. The answer is 11.\n", "11"),
        ("The answer is -3.", "-3"),
        ("the answer is 2.5 today", "2.5"),
        ("The answer is 7. The answer is 8.", "7"),
        ("3 + 8 = 11.", None),
        ("The answer is eleven.", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<tool>calculator(37 * 12)</tool>", ("37 * 12", 444.0)),
        (" Sure. <tool>calculator((2 + 3) * -4)</tool>\nTool:", ("(2 + 3) * -4", -20.0)),
        ("<tool>calculator(7 / 2)</tool>", ("7 / 2", 3.5)),
        ("<tool> calculator( 1.5 - 0.5 ) </tool>", ("1.5 - 0.5", 1.0)),
        ("<tool>calculator(1 / 0)</tool>", ("1 / 0", None)),
        ("calculator(37 * 12)", None),
        ("<tool>calculator(37 * 12)", None),
        ("<tool>search(37 * 12)</tool>", None),
        ("<tool>calculator()</tool>", None),
        ("<tool>calculator(__import__('os').getcwd())</tool>", None),
        ("<tool>calculator(2 ** 100000)</tool>", None),
        ("<tool>calculator(x + 1)</tool>", None),
        ("<tool>calculator(True + 1)</tool>", None),
        ("<tool>calculator([1] * 10)</tool>", None),
        ("<tool>calculator((lambda: 1)())</tool>", None),
        ("<tool>calculator(3 % 2)</tool>", None),
        ("<tool>calculator(" + "1 + " * 100 + "1)</tool>", None),
    ],
)
def test_parse_tool_call(text: str, expected):
    assert parse_tool_call(text) == expected


def test_parse_tool_call_never_executes_code(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    call = f"<tool>calculator(__import__('os').remove({str(victim)!r}) or 1)</tool>"
    assert parse_tool_call(call) is None
    assert victim.exists()


# ----------------------------------------------------------------------------------- generation


def test_greedy_generate_follows_script_and_stops(tok):
    model = ScriptedLM(tok, {"A:": " one\ntwo", "B:": " x</tool> more", "C:": " abcdefghij"})
    out = greedy_generate(model, tok, ["A:", "B:", "C:"], max_new_tokens=5, ctx=CTX, stop=("</tool>", "\n"))
    assert out == [" one\n", " abcd", " abcd"][:1] + [" x</t", " abcd"]  # 5-token cap applies to B and C
    out = greedy_generate(model, tok, ["A:", "B:", "C:"], max_new_tokens=30, ctx=CTX, stop=("</tool>", "\n"))
    assert out == [" one\n", " x</tool>", " abcdefghij"]  # stop kept, EOS ends C
    assert greedy_generate(model, tok, ["A:"], max_new_tokens=30, ctx=CTX) == [" one\ntwo"]  # no stops


def test_greedy_generate_batched_equals_one_at_a_time(tok):
    scripts = {f"P{i}:": f" answer {i * 37}" for i in range(7)}
    scripts["long prompt:"] = " ok"
    model = ScriptedLM(tok, scripts)
    prompts = list(scripts)
    batched = greedy_generate(model, tok, prompts, 20, CTX, batch_size=4)
    single = [greedy_generate(model, tok, [p], 20, CTX, batch_size=1)[0] for p in prompts]
    assert batched == single == list(scripts.values())


def test_greedy_generate_truncates_long_prompts_from_the_left(tok):
    model = ScriptedLM(tok, {"end:": " ok"}, max_positions=16)
    out = greedy_generate(model, tok, ["x" * 100 + "end:"], max_new_tokens=4, ctx=CTX)
    assert out == [" ok"]  # the prompt's end survived truncation
    assert max(model.seen_lengths) <= 16


# ------------------------------------------------------------------------------------- perplexity


def test_uniform_model_has_perplexity_equal_to_vocab(tok):
    examples = [Example(kind="text", text="hello world " * 5), Example(kind="text", text="abc")]
    metrics = evaluate(UniformLM(len(tok)), tok, examples, CFG, CTX)
    assert metrics["ppl"] == pytest.approx(len(tok), abs=1e-3)
    assert metrics["loss"] == pytest.approx(math.log(len(tok)), abs=1e-6)
    n = (60 + 1) + (3 + 1)  # characters + one EOS per text
    windows = math.ceil(n / CFG.seq_len)
    assert metrics["ppl_tokens"] == n - windows  # each window's first token has no context


def test_ppl_token_budget_is_respected(tok):
    examples = [Example(kind="text", text="abcdefghij" * 50)]
    cfg = CFG.model_copy(update={"ppl_max_tokens": 100, "seq_len": 32})
    metrics = evaluate(UniformLM(len(tok)), tok, examples, cfg, CTX)
    assert metrics["ppl_tokens"] == 100 - 4  # 4 windows of <= 32 tokens


def test_perfect_next_token_model_has_perplexity_one(tok):
    text = "abcdefg"
    ids = tok([text])["input_ids"][0] + [tok.eos_token_id]
    successor = {a: b for a, b in zip(ids, ids[1:] + ids[:1])}
    examples = [Example(kind="text", text=text)] * 20
    metrics = evaluate(SuccessorLM(len(tok), successor), tok, examples, CFG, CTX)
    assert metrics["ppl"] == pytest.approx(1.0, abs=1e-6)
    # The same model scored against a shuffled successor map is badly wrong: alignment matters.
    wrong = {a: successor[b] for a, b in zip(ids, ids[1:] + ids[:1])}
    assert evaluate(SuccessorLM(len(tok), wrong), tok, examples, CFG, CTX)["loss"] > 20


class CycleOnlyLM(nn.Module):
    """Near-certain that "b" follows "a", "c" follows "b" and EOS follows "c"; uniform after anything else.

    So in an "abc" example every token but the first is (almost exactly) free, and in a "xyz" example every
    token costs log(vocab): the per-kind losses are known in closed form.
    """

    def __init__(self, tok: CharTokenizer) -> None:
        super().__init__()
        self.vocab = len(tok)
        self.next = {tok.index["a"]: tok.index["b"], tok.index["b"]: tok.index["c"], tok.index["c"]: tok.eos_token_id}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for (b, t), token in zip(
            [(b, t) for b in range(input_ids.shape[0]) for t in range(input_ids.shape[1])], input_ids.flatten().tolist()
        ):
            if token in self.next:
                logits[b, t, self.next[token]] = 60.0
        return SimpleNamespace(logits=logits)


def test_perplexity_is_attributed_to_the_kind_of_each_target_token(tok):
    # Stream: a b c E | x y z E | a b c E | x y z E, one window, its first token unscored.
    # arithmetic: b c E (free) + a (after an EOS: log V) + b c E (free) -> 7 tokens, log V in all.
    # text: every one of x y z E, twice -> 8 tokens, 8 log V. Pooled: 9 log V over 15 tokens.
    examples = [Example(kind="arithmetic", text="abc"), Example(kind="text", text="xyz")] * 2
    cfg = CFG.model_copy(update={"seq_len": 64, "tasks": ("perplexity",)})
    m = evaluate(CycleOnlyLM(tok), tok, examples, cfg, CTX)
    log_v = math.log(len(tok))
    assert (m["ppl_tokens_arithmetic"], m["ppl_tokens_text"], m["ppl_tokens"]) == (7, 8, 15)
    assert m["loss_arithmetic"] == pytest.approx(log_v / 7, rel=1e-6)
    assert m["loss_text"] == pytest.approx(log_v, rel=1e-6)
    assert m["ppl_text"] == pytest.approx(len(tok), rel=1e-5)
    assert m["loss"] == pytest.approx(9 * log_v / 15, rel=1e-6)
    # The per-kind numbers partition the pooled ones: same tokens, token-weighted mean = pooled loss.
    weighted = (m["loss_arithmetic"] * m["ppl_tokens_arithmetic"] + m["loss_text"] * m["ppl_tokens_text"]) / m["ppl_tokens"]
    assert weighted == pytest.approx(m["loss"], rel=1e-6)


def test_per_kind_breakdown_leaves_the_pooled_numbers_unchanged(tok):
    # Pooled loss computed the way the harness did before per-kind attribution: the sum over one window.
    examples = [Example(kind="arithmetic", text="abcab"), Example(kind="text", text="xyzab c")]
    cfg = CFG.model_copy(update={"seq_len": 64, "tasks": ("perplexity",)})
    m = evaluate(CycleOnlyLM(tok), tok, examples, cfg, CTX)
    ids = [i for ex in examples for i in tok([ex.text])["input_ids"][0] + [0]]
    logits = CycleOnlyLM(tok)(torch.tensor([ids])).logits[0]
    expected = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")) / (len(ids) - 1)
    assert m["loss"] == expected  # bit-identical: golden values and EvoMerge fitness depend on it


def _unit(source: str, text: str) -> Example:
    return Example(kind="text", text=text, source=source)


def test_eval_source_units_are_scored_per_source_and_never_pooled(tok):
    base = [Example(kind="arithmetic", text="abc"), Example(kind="text", text="xyz")] * 2
    cfg = CFG.model_copy(update={"seq_len": 8, "tasks": ("perplexity",)})
    model = CycleOnlyLM(tok)
    plain = evaluate(model, tok, base, cfg, CTX)
    units = [_unit("cyc", "abc"), _unit("other", "qqqqqqqqqq"), _unit("cyc", "ab"), _unit("cyc", "bc")]
    mixed = evaluate(model, tok, base + units, cfg, CTX)
    for key in ("loss", "ppl", "ppl_tokens", "loss_text", "ppl_tokens_text", "loss_arithmetic"):
        assert mixed[key] == plain[key], key  # adding an eval source never moves pooled or per-kind numbers
    # cyc: each unit alone (no EOS; a window spanning "abc" + "ab" would score an unpredictable "a"): 2 + 1 + 1.
    assert mixed["ppl_tokens_src_cyc"] == 4
    assert mixed["ppl_src_cyc"] == pytest.approx(1.0, abs=1e-6)
    # other: 10 tokens in windows of 8 -> 8 + 2, each window's first token unscored.
    assert mixed["ppl_src_other"] == pytest.approx(len(tok), rel=1e-5) and mixed["ppl_tokens_src_other"] == 7 + 1
    assert mixed["loss_src_other"] == pytest.approx(math.log(len(tok)), rel=1e-6)
    assert not any(k.startswith(("ppl_src_", "loss_src_")) for k in plain)


def test_source_perplexity_matches_the_unbatched_real_text_method(tok):
    from forge_models.eval.real_text import text_perplexity

    docs = ["abcabcabcqq", "xyzab", "abc"]
    cfg = CFG.model_copy(update={"seq_len": 4, "batch_size": 3, "tasks": ("perplexity",)})
    model = CycleOnlyLM(tok)
    def single(text: str, add_special_tokens: bool = False) -> dict:  # real_text tokenizes one string at a time
        return {"input_ids": tok([text])["input_ids"][0]}

    reference = text_perplexity(model, single, docs, cfg, CTX)  # one window per forward pass, no padding
    m = evaluate(model, tok, [Example(kind="arithmetic", text="abc")] + [_unit("s", d) for d in docs], cfg, CTX)
    assert m["ppl_tokens_src_s"] == reference["ppl_tokens"]
    assert m["loss_src_s"] == pytest.approx(reference["loss"], rel=1e-6)


def test_a_split_of_only_eval_source_units_has_no_pooled_perplexity(tok):
    with pytest.raises(ConfigError, match="all eval-source units"):
        evaluate(UniformLM(len(tok)), tok, [_unit("s", "abc")], CFG.model_copy(update={"tasks": ("perplexity",)}), CTX)


# ------------------------------------------------------------------------------ answer-checked tasks


def test_arith_em_counts_exact_final_answers(tok):
    examples = [_arith("3 + 4 * 2", "11"), _arith("5 - 7", "-2")]
    right = {ex.prompt: ex.text[len(ex.prompt) :] for ex in examples}
    assert evaluate(ScriptedLM(tok, right), tok, examples, CFG, CTX)["arith_em"] == 1.0
    wrong = {examples[0].prompt: " 4 * 2 = 8. 3 + 8 = 12. The answer is 12.\n", examples[1].prompt: " The answer is 2."}
    assert evaluate(ScriptedLM(tok, wrong), tok, examples, CFG, CTX)["arith_em"] == 0.0
    half = {examples[0].prompt: right[examples[0].prompt], examples[1].prompt: " The answer is -20."}
    metrics = evaluate(ScriptedLM(tok, half), tok, examples, CFG, CTX)
    assert metrics["arith_em"] == 0.5 and metrics["n_arith"] == 2
    # Only the first line counts: a correct answer on the second line is not credited.
    late = {ex.prompt: " I think\nThe answer is " + ex.answer + "." for ex in examples}
    assert evaluate(ScriptedLM(tok, late), tok, examples, CFG, CTX)["arith_em"] == 0.0


def test_tool_metrics(tok):
    examples = [_tool("What is 37 times 12?", "37 * 12", "444"), _tool("What is 5 minus 9?", "5 - 9", "-4")]
    good = {ex.prompt: ex.text[len(ex.prompt) :] for ex in examples}
    metrics = evaluate(ScriptedLM(tok, good), tok, examples, CFG, CTX)
    assert (metrics["tool_valid"], metrics["tool_correct"], metrics["n_tool"]) == (1.0, 1.0, 2.0)
    wrong_value = {examples[0].prompt: " <tool>calculator(37 * 13)</tool>", examples[1].prompt: " <tool>calculator(9 - 5)</tool>"}
    metrics = evaluate(ScriptedLM(tok, wrong_value), tok, examples, CFG, CTX)
    assert (metrics["tool_valid"], metrics["tool_correct"]) == (1.0, 0.0)
    no_call = {examples[0].prompt: " The answer is 444.", examples[1].prompt: " <tool>calculator(import os)</tool>"}
    metrics = evaluate(ScriptedLM(tok, no_call), tok, examples, CFG, CTX)
    assert (metrics["tool_valid"], metrics["tool_correct"]) == (0.0, 0.0)


def test_choice_accuracy_follows_model_preference(tok):
    prompt = "The ball was blue.\nQuestion: What color was the ball?\nAnswer:"
    choices = (" red", " blue", " green")
    examples = [_choice("narrative", prompt + " " * i, choices, i) for i in range(3)]  # labels 0, 1, 2
    examples.append(_choice("persona", "User: What is your name?\nAssistant:", (" Alex.", " Forge."), 1))
    right = {ex.prompt: ex.choices[ex.label] for ex in examples}
    metrics = evaluate(ScriptedLM(tok, right), tok, examples, CFG, CTX)
    assert (metrics["choice_acc"], metrics["n_choice"]) == (1.0, 4.0)
    assert metrics["narrative_acc"] == 1.0 and metrics["persona_acc"] == 1.0
    wrong = {ex.prompt: ex.choices[(ex.label + 1) % len(ex.choices)] for ex in examples}
    assert evaluate(ScriptedLM(tok, wrong), tok, examples, CFG, CTX)["choice_acc"] == 0.0


def test_choices_are_scored_as_the_reply_of_a_chat_turn_on_a_chat_template():
    from forge_models.eval import choice_scores
    from forge_models.generation import GenerationConfig, prompt_ids
    from tests.factories import byte_tokenizer

    chat_tok = byte_tokenizer(chat=True)

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[list[int]] = []
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, **_):
            from types import SimpleNamespace

            for row, mask in zip(input_ids, attention_mask):
                self.seen.append(row[mask.bool()].tolist())
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(chat_tok)))

    ex = _choice("persona", "User: What is your name?\nAssistant:", (" Alex.", " Forge."), 1)
    model = Recorder()
    scores = choice_scores(model, chat_tok, [ex], CFG, CTX)[0]
    head = prompt_ids(chat_tok, ex.prompt, GenerationConfig())
    assert chat_tok.decode(head).startswith("<|im_start|>user\nUser: What is your name?")
    expected = [head + chat_tok(c, add_special_tokens=False)["input_ids"] for c in ("Alex.", "Forge.")]
    assert sorted(model.seen) == sorted(expected)
    # uniform logits: each choice scores -len(choice) * log(vocab), so the scored tail is exactly the choice
    assert scores == pytest.approx([-len("Alex.") * math.log(len(chat_tok)), -len("Forge.") * math.log(len(chat_tok))])
    plain = byte_tokenizer(chat=False)  # no template: the plain prompt + the choice with its space, as before
    model = Recorder()
    choice_scores(model, plain, [ex], CFG, CTX)
    assert plain.decode(model.seen[0]) == "<|endoftext|>User: What is your name?\nAssistant: Alex."


def test_choice_ties_go_to_the_lowest_index(tok):
    choices = (" cat", " dog", " cow")  # equal token counts: a uniform model scores them equally
    examples = [_choice("narrative", f"Story {i}.\nAnswer:", choices, label) for i, label in enumerate((0, 0, 1))]
    metrics = evaluate(UniformLM(len(tok)), tok, examples, CFG, CTX)
    assert metrics["choice_acc"] == pytest.approx(2 / 3)  # always picks index 0


def test_missing_tasks_are_omitted_not_zero(tok):
    metrics = evaluate(UniformLM(len(tok)), tok, [Example(kind="text", text="just text")], CFG, CTX)
    assert set(metrics) == {"loss", "ppl", "ppl_tokens", "n_arith", "n_tool", "n_choice", "n_tool_loop", "n_system",
                            "loss_text", "ppl_text", "ppl_tokens_text"}  # only the kind present is broken out
    assert metrics["n_arith"] == metrics["n_tool"] == metrics["n_choice"] == metrics["n_tool_loop"] == 0


def test_max_examples_caps_each_task(tok):
    examples = [_arith(f"{i} + 1", str(i + 1)) for i in range(12)]
    cfg = CFG.model_copy(update={"max_examples": 5})
    assert evaluate(UniformLM(len(tok)), tok, examples, cfg, CTX)["n_arith"] == 5


def test_empty_examples_are_refused(tok):
    with pytest.raises(ConfigError, match="no examples"):
        evaluate(UniformLM(len(tok)), tok, [], CFG, CTX)


def test_long_prompts_fit_the_model(tok):
    long_prompt = "word " * 80 + "\nAnswer:"
    examples = [
        _choice("narrative", long_prompt, (" yes", " no"), 0),
        Example(kind="arithmetic", text="x", prompt="y " * 80 + "Q:", answer="1"),
    ]
    model = ScriptedLM(tok, {}, max_positions=32)
    metrics = evaluate(model, tok, examples, CFG, CTX)
    assert max(model.seen_lengths) <= 32 and metrics["n_choice"] == 1 and metrics["n_arith"] == 1


# ---------------------------------------------------------------------------------- unigram baseline


def test_unigram_loss_of_a_uniform_corpus_is_log_of_its_types(tok):
    train = [Example(kind="text", text="abcd")] * 10_000  # a, b, c, d, EOS: 5 equally frequent types
    assert unigram_loss(train, [Example(kind="text", text="dcba")], tok, 1000) == pytest.approx(math.log(5), abs=0.01)
    # An unseen token costs log(N + V) under add-one smoothing: far more than the seen ones.
    n, v = 50_000, len(tok)
    unseen = unigram_loss(train, [Example(kind="text", text="zzzz")], tok, 1000)
    expected = (4 * math.log(n + v) - math.log(10_001 / (n + v))) / 5
    assert unseen == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ConfigError):
        unigram_loss([], train, tok, 10)


# ------------------------------------------------------------------------------ a real Hugging Face LM


def test_evaluate_runs_on_a_real_llama_and_is_deterministic():
    examples = generate_synthetic(SyntheticConfig(n_examples=400), seed=0)
    splits = split_examples(examples, 10, 10)
    hf_tok = train_bpe([ex.text for ex in splits["train"]], vocab_size=400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=len(hf_tok), max_position_embeddings=128,
        )
    )
    model.train()
    cfg = EvalConfig(max_examples=4, ppl_max_tokens=512, max_new_tokens=8, batch_size=4, seq_len=64)
    held_out = splits["validation"]
    first = evaluate(model, hf_tok, held_out, cfg, CTX)
    assert model.training  # the caller's mode is restored
    assert first == evaluate(model, hf_tok, held_out, cfg, CTX)
    kinds = [ex.kind for ex in held_out]
    assert first["n_arith"] == min(4, kinds.count("arithmetic"))
    assert first["n_choice"] == min(4, kinds.count("persona") + kinds.count("narrative"))
    assert len(hf_tok) / 3 < first["ppl"] < len(hf_tok) * 3  # untrained: near uniform over the vocab
    for key in ("arith_em", "tool_valid", "tool_correct", "choice_acc"):
        assert 0.0 <= first[key] <= 1.0
    baseline = unigram_loss(splits["train"], held_out, hf_tok, 512)
    assert 0 < baseline < math.log(len(hf_tok))  # unigram statistics beat a uniform guess


# ------------------------------------------------------------------------------------- intervals


def test_bootstrap_interval_covers_the_true_rate_at_about_the_nominal_rate():
    """A seeded simulation: 400 accuracies of 200 Bernoulli(0.7) outcomes; 95% intervals cover 0.7 ~95% of the time."""
    import numpy as np

    from forge_models.eval import bootstrap_interval

    rng = np.random.default_rng(123)
    covered = 0
    for trial in range(400):
        outcomes = (rng.random(200) < 0.7).astype(float)
        low, high = bootstrap_interval(outcomes, n_resamples=1000, seed=trial)
        assert low <= outcomes.mean() <= high
        covered += low <= 0.7 <= high
    assert 0.91 <= covered / 400 <= 0.98, covered / 400
    # Width shrinks like 1 / sqrt(n): 4x the examples, about half the width.
    small = bootstrap_interval((rng.random(100) < 0.5).astype(float), 2000, 0)
    large = bootstrap_interval((rng.random(1600) < 0.5).astype(float), 2000, 0)
    assert (large[1] - large[0]) < 0.35 * (small[1] - small[0])


def test_paired_difference_of_identical_vectors_is_exactly_zero_with_zero_width():
    from forge_models.eval import describe_difference, paired_difference, paired_metrics, within_noise

    vec = [1.0, 0.0, 1.0, 1.0, 0.0] * 40
    assert paired_difference(vec, vec, 2000, 0) == (0.0, 0.0, 0.0)
    assert within_noise(0.0, 0.0)
    # A real improvement on the same examples is detected; the pairing makes it sharper than unpaired.
    before = [0.0] * 150 + [1.0] * 50
    after = [1.0] * 60 + [0.0] * 90 + [1.0] * 50  # 60 more right, none lost
    diff, low, high = paired_difference(after, before, 2000, 0)
    assert diff == pytest.approx(0.3) and low > 0.2 and not within_noise(low, high)
    assert "better" in describe_difference("tool_correct", diff, low, high)
    # Two equally good models that disagree on different examples: within noise.
    a = [1.0, 0.0] * 100
    b = [0.0, 1.0] * 100
    d = paired_metrics({"acc": a}, {"acc": b})
    assert d["d_acc"] == 0.0 and within_noise(d["d_acc_lo"], d["d_acc_hi"])
    assert "within noise" in describe_difference("acc", d["d_acc"], d["d_acc_lo"], d["d_acc_hi"])
    with pytest.raises(ConfigError, match="same examples"):
        paired_difference([1.0, 0.0], [1.0], 100, 0)


def test_evaluate_reports_intervals_and_outcomes_per_example(tok):
    examples = [_arith("3 + 4 * 2", "11"), _arith("5 - 7", "-2"), _arith("2 * 2", "4"), _arith("9 - 1", "8")]
    right = {ex.prompt: ex.text[len(ex.prompt):] for ex in examples[:3]}
    outcomes: dict = {}
    metrics = evaluate(ScriptedLM(tok, right), tok, examples, CFG, CTX, outcomes=outcomes)
    assert outcomes["arith_em"] == [1.0, 1.0, 1.0, 0.0]
    assert metrics["arith_em"] == 0.75
    assert 0.0 <= metrics["arith_em_lo"] <= 0.75 <= metrics["arith_em_hi"] <= 1.0
    assert metrics["arith_em_lo"] < metrics["arith_em_hi"]
    # Seeded: the same config gives the same interval.
    assert evaluate(ScriptedLM(tok, right), tok, examples, CFG, CTX) == metrics


def test_perplexity_does_not_score_tool_output(tok):
    """Two held-out sets that differ only in the calculator's output have the same loss under a bigram model."""

    class BigramLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.table = nn.Embedding(len(tok), len(tok))

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.table(input_ids))

    def episode(result: str) -> Example:
        prompt = "User: Compute 6 * 7.\nAssistant:"
        text = f"{prompt} <tool>calculator(6 * 7)</tool>\nTool: {result}\nAssistant: The answer is 42.\n"
        return Example("tool", text, prompt, "42")

    cfg = CFG.model_copy(update={"seq_len": 256})
    honest = evaluate(BigramLM(), tok, [episode("42")], cfg, CTX)
    other = evaluate(BigramLM(), tok, [episode("987654")], cfg, CTX)
    assert honest["loss"] == pytest.approx(other["loss"], abs=1e-6)
    assert honest["ppl_tokens"] == other["ppl_tokens"] == len(episode("42").text) + 1 - 1 - len("Tool: 42\n")


def test_report_lines_say_within_noise_when_the_interval_covers_zero():
    from forge_models.eval import difference_lines, paired_metrics

    same = [1.0, 0.0] * 100
    flipped = [0.0, 1.0] * 100
    better = [1.0] * 200
    after = {"tool_correct": better, "choice_acc": flipped}
    lines = difference_lines(paired_metrics(after, {"tool_correct": same, "choice_acc": same}), "after - before")
    assert lines[0].startswith("Paired differences, after - before")
    assert any(l.startswith("- choice_acc: +0.000") and "within noise" in l for l in lines)
    assert any(l.startswith("- tool_correct: +0.500") and "(better)" in l for l in lines)
    assert difference_lines({"loss": 1.0}, "x") == []
