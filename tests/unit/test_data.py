"""The corpus: seeded generation, correct worked answers, disjoint splits, real sources, token batches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forge_models.config import DataConfig, EvalConfig, SourceConfig, SyntheticConfig
from forge_models.data import (
    SPLITS,
    Corpus,
    Example,
    TokenSampler,
    build_corpus,
    canonical_keys,
    example_split,
    generate_synthetic,
    key_split,
    mask_unscored,
    split_examples,
)
from forge_models.runtime import ConfigError
from forge_models.tokenizer import train_bpe

torch.set_num_threads(1)

SYNTHETIC_KINDS = ("arithmetic", "tool", "persona", "narrative")


def _cfg(n: int = 1000, seed: int = 1234, **kw) -> DataConfig:
    return DataConfig(seed=seed, synthetic=SyntheticConfig(n_examples=n, **kw.pop("synthetic", {})), **kw)


@pytest.fixture(scope="module")
def corpus5k() -> Corpus:
    return build_corpus(_cfg(5000))


@pytest.fixture(scope="module")
def tokenizer(corpus5k: Corpus):
    return train_bpe([ex.text for ex in corpus5k.train[:2000]], vocab_size=512)


def _safe_int_eval(expr: str) -> int:
    """Independent evaluator for the generated questions (digits, spaces and + - * only)."""
    assert re.fullmatch(r"[\d +\-*]+", expr), expr
    return eval(expr)  # noqa: S307  (input checked above; this is the independent reference)


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_corpus_and_different_seed_differs():
    cfg = SyntheticConfig(n_examples=300)
    assert generate_synthetic(cfg, 7) == generate_synthetic(cfg, 7)
    assert generate_synthetic(cfg, 7) != generate_synthetic(cfg, 8)
    assert build_corpus(_cfg(300, seed=3)).digest() == build_corpus(_cfg(300, seed=3)).digest()
    assert build_corpus(_cfg(300, seed=3)).digest() != build_corpus(_cfg(300, seed=4)).digest()


def test_kind_mix_follows_weights_exactly():
    examples = generate_synthetic(SyntheticConfig(n_examples=400, kinds={"arithmetic": 3, "tool": 1}), 0)
    kinds = [ex.kind for ex in examples]
    assert kinds.count("arithmetic") == 300 and kinds.count("tool") == 100


# --------------------------------------------------------------------------------------- splits


def test_splits_disjoint_by_text_and_prompt(corpus5k: Corpus):
    texts = {name: {ex.text for ex in corpus5k.split(name)} for name in SPLITS}
    prompts = {name: {ex.prompt for ex in corpus5k.split(name) if ex.prompt} for name in SPLITS}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not texts[a] & texts[b], f"{a}/{b} share texts"
        assert not prompts[a] & prompts[b], f"{a}/{b} share prompts"


def test_narrative_story_never_in_two_splits(corpus5k: Corpus):
    def stories(name: str) -> set[str]:
        return {ex.prompt.split("\nQuestion:")[0] for ex in corpus5k.split(name) if ex.kind == "narrative"}

    assert not stories("train") & (stories("validation") | stories("test"))


def test_every_split_non_empty_with_all_kinds_and_no_duplicates(corpus5k: Corpus):
    for name in SPLITS:
        split = corpus5k.split(name)
        assert {ex.kind for ex in split} == set(SYNTHETIC_KINDS), name
        assert len({ex.text for ex in split}) == len(split), f"duplicate texts in {name}"
    assert len(corpus5k.train) > 5 * len(corpus5k.validation)


def test_split_depends_only_on_content():
    """The same content lands in the same split whatever else is in the corpus (other seed)."""
    where: dict[str, str] = {}
    shared = 0
    for seed in (1, 2):
        corpus = build_corpus(_cfg(3000, seed=seed))
        for name in SPLITS:
            for ex in corpus.split(name):
                if ex.text in where:
                    shared += 1
                    assert where[ex.text] == name
                where[ex.text] = name
    assert shared > 100  # small operands make many problems recur across seeds


def test_split_of_a_prompt_does_not_depend_on_its_text():
    """A prompt's split is decided by the prompt alone, so two runs can never put it in two splits."""
    first = [Example("arithmetic", f"Q: What is {i}?\nA: {i}.\n", f"Q: What is {i}?\nA:", str(i)) for i in range(300)]
    second = [Example("arithmetic", f"Q: What is {i}?\nA: it is {i}.\n", ex.prompt, str(i)) for i, ex in enumerate(first)]

    def split_of(examples: list[Example]) -> dict[str, str]:
        splits = split_examples(examples, 20, 20)
        return {ex.prompt: name for name in SPLITS for ex in splits[name]}

    assert split_of(first) == split_of(second)


def test_questions_about_one_story_share_its_split():
    """Otherwise a story could be read in training and then asked about in evaluation."""
    examples = []
    for i in range(100):
        story = f"Story {i}: Mia had a red ball."
        for q in ("What color?", "Who had it?", "What did Mia have?"):
            prompt = f"{story}\nQuestion: {q}\nAnswer:"
            examples.append(Example("narrative", prompt + " x.\n", prompt, choices=(" x", " y"), label=0))
    splits = split_examples(examples, 20, 20)
    for name in SPLITS:
        stories = [ex.prompt.split("\nQuestion:")[0] for ex in splits[name]]
        assert all(stories.count(s) == 3 for s in stories), name
    assert all(splits[name] for name in SPLITS)


def test_unknown_split_name_is_rejected(corpus5k: Corpus):
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        corpus5k.split("dev")


# ------------------------------------------------------------------------------ content checks


def test_arithmetic_worked_answers_are_correct(corpus5k: Corpus):
    checked = 0
    for ex in corpus5k.train:
        if ex.kind != "arithmetic":
            continue
        question = re.fullmatch(r"Q: What is (.+)\?\nA:", ex.prompt).group(1)
        assert 1 <= len(re.findall(r" [+\-*] ", question)) <= 3
        assert all(1 <= int(n) <= 20 for n in re.findall(r"\d+", question))
        assert int(ex.answer) == _safe_int_eval(question)
        assert ex.text.startswith(ex.prompt)
        assert ex.text.endswith(f" The answer is {ex.answer}.\n")
        for a, op, b, c in re.findall(r"(-?\d+) ([+\-*]) (-?\d+) = (-?\d+)\.", ex.text[len(ex.prompt) :]):
            assert _safe_int_eval(f"{a} {op} {b}".replace("- -", "+ ")) == int(c)
        checked += 1
    assert checked > 500


def test_worked_steps_respect_precedence():
    examples = generate_synthetic(SyntheticConfig(n_examples=2000, kinds={"arithmetic": 1}), 5)
    mixed = [ex for ex in examples if re.search(r"\+ \d+ \*", ex.prompt)]
    assert mixed
    for ex in mixed:  # the first worked step of "a + b * c ..." must be a multiplication
        first_step = ex.text[len(ex.prompt) :].split(".")[0]
        assert "*" in first_step, ex.text


def test_tool_episodes_report_the_true_value(corpus5k: Corpus):
    checked = 0
    for ex in corpus5k.train:
        if ex.kind != "tool":
            continue
        expr = re.search(r"<tool>calculator\((.+?)\)</tool>\nTool: (-?\d+)\n", ex.text)
        assert expr, ex.text
        assert _safe_int_eval(expr.group(1)) == int(expr.group(2)) == int(ex.answer)
        assert ex.text.startswith(ex.prompt) and ex.prompt.startswith("User: ")
        assert ex.text.endswith(f"Assistant: The answer is {ex.answer}.\n")
        checked += 1
    assert checked > 500
    phrasings = {ex.prompt.split()[1] for ex in corpus5k.train if ex.kind == "tool"}
    assert len(phrasings) >= 4  # varied wording


def test_multiple_choice_examples_are_consistent(corpus5k: Corpus):
    for ex in corpus5k.train:
        if ex.kind not in ("persona", "narrative"):
            continue
        assert 3 <= len(ex.choices) <= 4 and len(set(ex.choices)) == len(ex.choices)
        assert 0 <= ex.label < len(ex.choices)
        assert ex.text.startswith(ex.prompt + ex.choices[ex.label])
        if ex.kind == "persona":
            assert ex.prompt.endswith("\nAssistant:")
        else:
            assert ex.prompt.endswith("\nAnswer:")
            story = ex.prompt.split("\nQuestion:")[0]
            stated = set(re.findall(r"\w+", story))
            assert ex.choices[ex.label].strip().removeprefix("a ") in stated
            for i, wrong in enumerate(ex.choices):  # no distractor is stated anywhere in the story
                if i != ex.label:
                    assert wrong.strip().removeprefix("a ") not in stated
    labels = {ex.label for ex in corpus5k.train if ex.choices}
    assert labels >= {0, 1, 2}  # the correct choice is not always in the same place


def test_persona_replies_name_forge_when_asked():
    examples = generate_synthetic(SyntheticConfig(n_examples=500, kinds={"persona": 1}), 0)
    named = [ex for ex in examples if ex.prompt.endswith("What is your name?\nAssistant:")]
    assert named and all(ex.choices[ex.label] == " My name is Forge." for ex in named)


# -------------------------------------------------------------------------------------- save/load


def test_save_load_round_trip(tmp_path: Path):
    corpus = build_corpus(_cfg(500))
    corpus.save(tmp_path)
    loaded = Corpus.load(tmp_path)
    assert loaded == corpus
    assert loaded.digest() == corpus.digest()


def test_load_names_the_missing_or_bad_file(tmp_path: Path):
    build_corpus(_cfg(300)).save(tmp_path)
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"test\.jsonl is missing"):
        Corpus.load(tmp_path)
    (tmp_path / "test.jsonl").write_text('{"kind": "text", "text": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"test\.jsonl, line 2"):
        Corpus.load(tmp_path)
    (tmp_path / "test.jsonl").write_text('{"kind": "poetry", "text": "ok"}\n')
    with pytest.raises(ConfigError, match=r"test\.jsonl, line 1: malformed example \(unknown example kind 'poetry'"):
        Corpus.load(tmp_path)


def test_example_rejects_inconsistent_fields():
    with pytest.raises(ConfigError, match="unknown example kind 'poem'"):
        Example(kind="poem", text="x")
    with pytest.raises(ConfigError, match="label 2 is not an index"):
        Example(kind="persona", text="x", prompt="p", choices=(" a", " b"), label=2)
    with pytest.raises(ConfigError, match="without choices"):
        Example(kind="text", text="x", label=0)


# ---------------------------------------------------------------------------------- real sources


def _docs(n: int) -> list[str]:
    return [f"Document number {i} talks about topic {i * 7 % 13}.\nIt has two lines." for i in range(n)]


def _all_text(corpus: Corpus) -> list[str]:
    return [ex.text for name in SPLITS for ex in corpus.split(name) if ex.kind == "text"]


def test_reads_jsonl_txt_and_parquet_sources(tmp_path: Path):
    docs = _docs(60)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:20])))
    (tmp_path / "b.txt").write_text("\n\n".join(docs[20:40]) + "\n")
    pq.write_table(pa.table({"text": docs[40:]}), tmp_path / "c.parquet")
    cfg = _cfg(
        300,
        sources=[
            SourceConfig(path=str(tmp_path / "a.jsonl"), text_field="body"),
            SourceConfig(path=f"file://{tmp_path / 'b.txt'}"),
            SourceConfig(path=str(tmp_path / "c.parquet")),
        ],
    )
    assert sorted(_all_text(build_corpus(cfg))) == sorted(docs)


def test_max_documents_and_source_path_override(tmp_path: Path):
    (tmp_path / "local.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(30)))
    cfg = _cfg(300, sources=[SourceConfig(path="s3://bucket/corpus.jsonl", max_documents=10)])
    with pytest.raises(ConfigError, match="s3://bucket/corpus.jsonl.*source_paths"):
        build_corpus(cfg)
    corpus = build_corpus(cfg, source_paths=[tmp_path / "local.jsonl"])
    assert sorted(_all_text(corpus)) == sorted(_docs(10))


def test_source_weight_repeats_train_documents_only(tmp_path: Path):
    (tmp_path / "light.txt").write_text("\n\n".join(_docs(40)[:20]))
    (tmp_path / "heavy.txt").write_text("\n\n".join(_docs(40)[20:]))
    cfg = _cfg(
        300,
        sources=[SourceConfig(path=str(tmp_path / "light.txt")), SourceConfig(path=str(tmp_path / "heavy.txt"), weight=3)],
    )
    corpus = build_corpus(cfg)
    heavy, light = set(_docs(40)[20:]), set(_docs(40)[:20])
    train_texts = [ex.text for ex in corpus.train if ex.kind == "text"]
    assert all(train_texts.count(t) == 3 for t in set(train_texts) & heavy)
    assert all(train_texts.count(t) == 1 for t in set(train_texts) & light)
    held_out = [ex.text for ex in corpus.validation + corpus.test if ex.kind == "text"]
    assert len(held_out) == len(set(held_out))


@pytest.mark.parametrize(
    "name, content, cfg_kw, message",
    [
        ("missing.jsonl", None, {}, "does not exist"),
        ("rows.jsonl", '{"body": "x"}\n', {}, r"line 1: no field 'text'"),
        ("rows.parquet", "PARQUET_BODY", {}, r"no column 'text'"),
        ("latin1.txt", b"caf\xe9 au lait", {}, "not valid UTF-8"),
        ("blank.txt", "\n\n\n", {}, "no non-empty documents"),
        ("data.csv", "a,b\n", {}, "cannot infer the format"),
    ],
)
def test_bad_sources_raise_config_error_naming_the_file(tmp_path: Path, name, content, cfg_kw, message):
    path = tmp_path / name
    if content == "PARQUET_BODY":
        pq.write_table(pa.table({"body": ["x"]}), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        build_corpus(_cfg(300, sources=[SourceConfig(path=str(path), **cfg_kw)]))
    assert str(path) in str(err.value)


def test_source_paths_must_match_sources():
    with pytest.raises(ConfigError, match="1 source_paths for 0 data.sources"):
        build_corpus(_cfg(300), source_paths=[Path("x.txt")])


# ---------------------------------------------------------------------------------- token sampler


def test_sampler_batches_are_a_pure_function_of_seed_and_step(corpus5k: Corpus, tokenizer):
    mix = {"arithmetic": 1, "tool": 1, "persona": 1, "narrative": 1}
    a = TokenSampler(corpus5k.train, tokenizer, mix, seq_len=32, batch_size=4, seed=11)
    b = TokenSampler(corpus5k.train, tokenizer, mix, seq_len=32, batch_size=4, seed=11)
    batch = a.batch(5)
    assert batch.shape == (4, 32) and batch.dtype == torch.long
    assert a.tokens_per_batch == 128
    assert torch.equal(batch, b.batch(5))  # a resumed run (new sampler) sees the same batch
    a.batch(6)
    assert torch.equal(batch, a.batch(5))  # no hidden state carried between calls
    assert not torch.equal(a.batch(5), a.batch(6))
    c = TokenSampler(corpus5k.train, tokenizer, mix, seq_len=32, batch_size=4, seed=12)
    assert not torch.equal(batch, c.batch(5))
    assert int(batch.max()) < len(tokenizer)


def test_sampler_mix_selects_kinds(corpus5k: Corpus, tokenizer):
    only_arith = TokenSampler(corpus5k.train, tokenizer, {"arithmetic": 1.0, "text": 5.0}, 128, 8, seed=0)
    for step in range(3):
        for row in only_arith.batch(step):
            text = tokenizer.decode(row.tolist())
            assert "Q: What is" in text and "<tool>" not in text and "Answer:" not in text

    weighted = TokenSampler(corpus5k.train, tokenizer, {"arithmetic": 3, "tool": 1}, 128, 8, seed=0)
    rows = [tokenizer.decode(r.tolist()) for s in range(50) for r in weighted.batch(s)]
    arith_share = sum("Q: What is" in r for r in rows) / len(rows)
    assert all(("Q: What is" in r) != ("calculator(" in r) for r in rows)
    assert 0.65 < arith_share < 0.85  # 3:1 mix -> 0.75


def test_sampler_wraps_short_streams(tokenizer):
    examples = [Example(kind="text", text="hello")]
    batch = TokenSampler(examples, tokenizer, {"text": 1}, seq_len=40, batch_size=2, seed=0).batch(0)
    stream = tokenizer("hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert batch.shape == (2, 40)
    assert set(batch.flatten().tolist()) == set(stream)


def test_sampler_rejects_mix_without_present_kinds(corpus5k: Corpus, tokenizer):
    with pytest.raises(ConfigError, match=r"kinds present: \['arithmetic', 'narrative', 'persona', 'tool'\]"):
        TokenSampler(corpus5k.train, tokenizer, {"text": 1.0}, 16, 2, seed=0)
    with pytest.raises(ConfigError, match="unknown data kinds"):
        TokenSampler(corpus5k.train, tokenizer, {"poetry": 1.0}, 16, 2, seed=0)


# ---------------------------------------------------------------------------- canonical split keys

_CALC_RES = (
    re.compile(r"calculator\((\d+) ([+\-*]) (\d+)\)"),
    re.compile(r"(-?\d+) ([+\-*]) (-?\d+) = "),
)
_SUM_RE = re.compile(r"what is (\d+) plus (\d+)\?")


def _calculations(text: str) -> set[tuple[int, str, int]]:
    """Every calculation a text shows, found independently of forge_models.data.keys (commutative: sorted)."""
    found = {(int(a), op, int(b)) for rx in _CALC_RES for a, op, b in rx.findall(text)}
    found |= {(int(a), "+", int(b)) for a, b in _SUM_RE.findall(text)}
    return {(min(a, b), op, max(a, b)) if op in "+*" else (a, op, b) for a, op, b in found}


@pytest.fixture(scope="module")
def corpus40k() -> Corpus:
    return build_corpus(_cfg(40000, validation_percent=5, test_percent=15))


def test_no_canonical_key_crosses_splits_in_a_large_corpus(corpus40k: Corpus):
    where: dict[str, set[str]] = {}
    for name in SPLITS:
        for ex in corpus40k.split(name):
            for key in canonical_keys(ex):
                where.setdefault(key, set()).add(name)
    crossing = {k: v for k, v in where.items() if len(v) > 1}
    assert not crossing, list(crossing.items())[:5]
    assert sum(1 for v in where.values() if "test" in v) > 1000


def test_no_held_out_calculation_or_persona_reply_appears_in_training(corpus40k: Corpus):
    """The leak the exact-prompt split had: the same calculation in another wording, or inside a worked step."""
    train_calcs = set().union(*(_calculations(ex.text) for ex in corpus40k.train))
    for name in ("validation", "test"):
        held = [ex for ex in corpus40k.split(name) if ex.kind in ("tool", "arithmetic", "persona")]
        calcs = set().union(*(_calculations(ex.text) for ex in held))
        assert len(calcs) > 30 and not calcs & train_calcs, sorted(calcs & train_calcs)[:5]
    train_replies = {ex.choices[ex.label] for ex in corpus40k.train if ex.kind == "persona"}
    held_replies = {ex.choices[ex.label] for n in ("validation", "test") for ex in corpus40k.split(n) if ex.kind == "persona"}
    worded = {r for r in held_replies if not re.fullmatch(r" -?\d+\.", r)}  # " 12." may answer another sum
    assert worded and not worded & train_replies


def test_a_calculation_gets_one_split_whatever_its_wording_or_kind():
    wordings = [
        Example("tool", "User: What is 7 times 13?\nAssistant: <tool>calculator(7 * 13)</tool>\nTool: 91\n"
                "Assistant: The answer is 91.\n", "User: What is 7 times 13?\nAssistant:", "91"),
        Example("tool", "User: Compute 13 * 7.\nAssistant: <tool>calculator(13 * 7)</tool>\nTool: 91\n"
                "Assistant: The answer is 91.\n", "User: Compute 13 * 7.\nAssistant:", "91"),
        Example("arithmetic", "Q: What is 7 * 13?\nA: 7 * 13 = 91. The answer is 91.\n", "Q: What is 7 * 13?\nA:", "91"),
    ]
    assert len({frozenset(canonical_keys(ex)) for ex in wordings}) == 1
    assert len({example_split(ex, 30, 30) for ex in wordings}) == 1
    # A worked problem whose steps belong to different splits is kept in none of them.
    mixed = [Example("arithmetic", f"Q: What is {a} + {b} * 2?\nA: {b} * 2 = {b * 2}. {a} + {b * 2} = {a + b * 2}. "
                     f"The answer is {a + b * 2}.\n", f"Q: What is {a} + {b} * 2?\nA:", str(a + b * 2))
             for a in range(1, 30) for b in range(1, 30)]
    splits = [example_split(ex, 30, 30) for ex in mixed]
    assert None in splits and {"train", "validation", "test"} <= set(splits)
    for ex, name in zip(mixed, splits):
        if name is not None:
            assert {key_split(k, 30, 30) for k in canonical_keys(ex)} == {name}


def test_tiny_preset_test_split_holds_200_answer_checked_examples_per_task_all_scored():
    import yaml

    preset = yaml.safe_load((Path(__file__).parents[2] / "flows" / "presets" / "tiny.yaml").read_text())
    corpus = build_corpus(DataConfig(**preset["data"]))
    test = corpus.test
    counts = {
        "arith": sum(ex.kind == "arithmetic" for ex in test),
        "tool": sum(ex.kind == "tool" for ex in test),
        "choice": sum(bool(ex.choices) for ex in test),
    }
    assert min(counts.values()) >= 200, counts
    final = EvalConfig(**preset["eval"]).for_split("test")
    assert final.max_examples >= max(counts.values())  # the final evaluation scores every one


# ------------------------------------------------------------------------------------- loss masks


def test_sampler_labels_mask_tool_output_only(tokenizer):
    tool = [ex for ex in generate_synthetic(SyntheticConfig(n_examples=400, kinds={"tool": 1.0}), 3)]
    sampler = TokenSampler(tool, tokenizer, {"tool": 1.0}, seq_len=64, batch_size=16, seed=0)
    ids, labels = sampler.batch(5), sampler.labels(5)
    assert torch.equal(ids[labels != -100], labels[labels != -100])
    masked = labels == -100
    assert 0.05 < masked.float().mean() < 0.4
    for row, keep in zip(ids.tolist(), (~masked).tolist()):
        kept = tokenizer.decode([t for t, k in zip(row, keep) if k])
        dropped = tokenizer.decode([t for t, k in zip(row, keep) if not k])
        assert "Tool" not in kept and "calculator(" in kept and "The answer is" in kept
        assert re.fullmatch(r"[Tool: \d\n-]*", dropped), dropped
    # A packed row (starting at a document boundary) is masked the same way from its tokens alone.
    eos = tokenizer.eos_token_id
    row = [eos] + [t for ex in tool[:3] for t in (*tokenizer(ex.text, add_special_tokens=False)["input_ids"], eos)]
    packed = mask_unscored(torch.tensor([row]), tokenizer)
    dropped = tokenizer.decode([t for t, lab in zip(row, packed[0].tolist()) if lab == -100])
    assert dropped == "".join(re.findall(r"Tool: -?\d+\n", "".join(ex.text for ex in tool[:3])))
    # Kinds without tool output are left whole.
    narrative = [ex for ex in generate_synthetic(SyntheticConfig(n_examples=200, kinds={"narrative": 1.0}), 3)]
    plain = TokenSampler(narrative, tokenizer, {"narrative": 1.0}, seq_len=64, batch_size=4, seed=0)
    assert torch.equal(plain.labels(1), plain.batch(1))


# ------------------------------------------------------------------ chat-formatted training streams


def test_chat_streams_render_examples_exactly_as_the_harness_prompts_them():
    from forge_models.data.stream import chat_training_ids
    from forge_models.data.system_prompts import prompt_messages
    from forge_models.generation import GenerationConfig, prompt_ids
    from tests.factories import byte_tokenizer

    tok = byte_tokenizer(chat=True)
    arith = Example(kind="arithmetic", text="Q: What is 2 + 3?\nA: 2 + 3 = 5. The answer is 5.\n",
                    prompt="Q: What is 2 + 3?\nA:", answer="5")
    tool = Example(kind="tool", text="User: Add 2 and 3.\nAssistant: <tool>calculator(2 + 3)</tool>\nTool: 5\n"
                                     "Assistant: The answer is 5.\n", prompt="User: Add 2 and 3.\nAssistant:", answer="5")
    system = Example(kind="system", text="System: You are Nova. End every reply with \"- Nova\". No tools are "
                     "available; answer directly.\nUser: Hi?\nAssistant: Hello. - Nova\n",
                     prompt="System: You are Nova. End every reply with \"- Nova\". No tools are available; answer "
                     "directly.\nUser: Hi?\nAssistant:")
    for ex, prompt in ((arith, arith.prompt), (tool, tool.prompt), (system, prompt_messages(system.prompt))):
        assert prompt is not None
        head = prompt_ids(tok, prompt, GenerationConfig())  # what generation conditions on at evaluation
        ids, scored = chat_training_ids(ex, tok)
        assert ids[: len(head)] == head and not any(scored[: len(head)])  # the prompt is context, not a target
        assert ids[-1] == tok.eos_token_id and scored[-1]  # the turn ends with the template's end of turn
        reply = tok.decode(ids[len(head):-1])
        assert reply == ex.text[len(ex.prompt):].strip()
        target = tok.decode([t for t, s in zip(ids, scored) if s][:-1])
        assert "Tool:" not in target  # the calculator's line is never a target
    assert "<|im_start|>system\nYou are Nova" in tok.decode(chat_training_ids(system, tok)[0])
    tool_target = tok.decode([t for t, s in zip(*chat_training_ids(tool, tok)) if s])
    assert tool_target.startswith("<tool>calculator(2 + 3)</tool>\n") and "The answer is 5." in tool_target


def test_chat_sampler_keeps_real_text_plain_and_refuses_a_tokenizer_without_template():
    from tests.factories import byte_tokenizer

    chat_tok, plain_tok = byte_tokenizer(chat=True), byte_tokenizer(chat=False)
    examples = [Example(kind="arithmetic", text="Q: 1 + 1?\nA: The answer is 2.\n", prompt="Q: 1 + 1?\nA:", answer="2"),
                Example(kind="persona", text="User: Name?\nAssistant: Forge.\n", prompt="User: Name?\nAssistant:",
                        choices=(" Alex.", " Forge."), label=1),
                Example(kind="text", text="Once upon a time.")]
    sampler = TokenSampler(examples, chat_tok, {"arithmetic": 1.0, "persona": 1.0, "text": 1.0}, 16, 2, seed=0, chat=True)
    assert chat_tok.decode(sampler.streams["text"].tolist()) == "Once upon a time.<|im_end|>"
    assert "<|im_start|>user" in chat_tok.decode(sampler.streams["arithmetic"].tolist())
    # a choice kind is taught as the harness scores it on a chat template: the prompt as the user turn, the
    # right choice (without its leading space) as the reply
    persona = chat_tok.decode(sampler.streams["persona"].tolist())
    assert persona == "<|im_start|>user\nUser: Name?\nAssistant:<|im_end|>\n<|im_start|>assistant\nForge.<|im_end|>"
    plain = TokenSampler(examples, chat_tok, {"arithmetic": 1.0}, 16, 2, seed=0)  # chat is opt-in
    assert "<|im_start|>" not in chat_tok.decode(plain.streams["arithmetic"].tolist())
    with pytest.raises(ConfigError, match="chat template"):
        TokenSampler(examples, plain_tok, {"arithmetic": 1.0}, 16, 2, seed=0, chat=True)
