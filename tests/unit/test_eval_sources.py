"""Held-out-only eval sources: units in validation/test only, stable, disjoint; corpora without them unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from forge_models.config import DataConfig, EvalSourceConfig, SourceConfig, SyntheticConfig
from forge_models.data import Corpus, Example, build_corpus, chunk_text, eval_source_units, eval_unit_split
from forge_models.data.synthetic import _example_from_json, _to_json_line
from forge_models.runtime import ConfigError

REAL = (
    "The first real document talks about rivers and hills.\n\nA second document, about the sea and its tides.\n\n"
    "Third one: mountains.\n"
)
# Corpus.digest() of _cfg(300, sources=[real.txt holding REAL]) computed with the code before eval sources
# existed (commit 211e004): the JSON lines, and every cache keyed on them, must not change.
DIGEST_BEFORE_EVAL_SOURCES = "5feef5a7f5895a3aa03e72fc202005d39bd0abf286ae735acd8dc21d7a68447f"


def _cfg(n: int = 300, **kw) -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(n_examples=n), **kw)


def _words(n: int, tag: str = "w") -> str:
    # Distinct words, so every chunk's text is distinct and any shared text between splits would show.
    return " ".join(f"{tag}{i}" for i in range(n))


def test_corpus_without_eval_sources_keeps_its_digest_and_json_lines(tmp_path: Path):
    (tmp_path / "real.txt").write_text(REAL)
    corpus = build_corpus(_cfg(sources=[SourceConfig(path=str(tmp_path / "real.txt"))]))
    assert corpus.digest() == DIGEST_BEFORE_EVAL_SOURCES
    lines = [_to_json_line(ex) for split in ("train", "validation", "test") for ex in corpus.split(split)]
    assert not any('"source"' in line for line in lines)  # the empty field is not written at all


def test_source_field_round_trips_and_is_optional_when_reading(tmp_path: Path):
    unit = Example(kind="text", text="held out passage", source="wiki")
    line = _to_json_line(unit)
    assert json.loads(line)["source"] == "wiki"
    assert _example_from_json(line, tmp_path, 1) == unit
    old = json.dumps({"kind": "text", "text": "x", "prompt": "", "answer": "", "choices": [], "label": -1})
    assert _example_from_json(old, tmp_path, 1).source == ""
    with pytest.raises(ConfigError, match="must be plain 'text'"):
        Example(kind="arithmetic", text="1 + 1", source="wiki")


def test_chunks_end_at_the_first_whitespace_after_chunk_chars_and_cover_the_text():
    text = "alpha  beta\n\ngamma delta epsilon zeta eta theta"
    chunks = chunk_text(text, 10)
    assert chunks == ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    assert " ".join(chunks) == " ".join(text.split())  # nothing lost, nothing repeated
    assert chunk_text("a" * 50, 10) == ["a" * 50]  # no whitespace: one unit


def _eval_corpus(tmp_path: Path, **src_kw) -> tuple[Corpus, DataConfig]:
    (tmp_path / "wiki.txt").write_text("\n\n".join(_words(40, f"d{d}w") for d in range(30)))
    cfg = _cfg(eval_sources=[EvalSourceConfig(path=str(tmp_path / "wiki.txt"), **src_kw)])
    return build_corpus(cfg), cfg


def test_eval_units_go_to_validation_or_test_only_and_the_splits_share_no_text(tmp_path: Path):
    corpus, cfg = _eval_corpus(tmp_path, chunk_chars=100)
    units = eval_source_units(cfg.eval_sources[0])
    assert len(units) > 40 and all(ex.source == "wiki" and ex.kind == "text" for ex in units)
    assert not [ex for ex in corpus.train if ex.source]  # never trained on
    val = [ex.text for ex in corpus.validation if ex.source]
    test = [ex.text for ex in corpus.test if ex.source]
    assert val and test and not set(val) & set(test)
    assert sorted(val + test) == sorted(ex.text for ex in units)  # every unit placed exactly once
    # Nothing of the source's text is in train at all, not even as a substring of a training example.
    assert not any("d0w1 " in ex.text for ex in corpus.train)
    # Units sit after the split's other examples, and the rest of the corpus is what it is without them.
    plain = build_corpus(_cfg())
    assert corpus.train == plain.train
    assert tuple(ex for ex in corpus.validation if not ex.source) == plain.validation
    assert corpus.validation[len(plain.validation):] == tuple(ex for ex in corpus.validation if ex.source)


def test_unit_assignment_is_stable_and_follows_the_split_percentages(tmp_path: Path):
    first, _ = _eval_corpus(tmp_path, chunk_chars=100)
    again, _ = _eval_corpus(tmp_path, chunk_chars=100)
    assert first.digest() == again.digest()
    # The assignment is a function of (name, index) alone: pinned values, so a change of hash shows here.
    assert "".join(eval_unit_split("wiki", i, 5, 5)[0] for i in range(12)) == "vvtvttttvttt"
    picks = [eval_unit_split("wiki", i, 10, 30) for i in range(4000)]
    assert set(picks) == {"validation", "test"}
    assert 0.21 < picks.count("validation") / len(picks) < 0.29  # 10 / (10 + 30) = 0.25
    assert [eval_unit_split("wiki", i, 5, 5) for i in range(6)] != [eval_unit_split("news", i, 5, 5) for i in range(6)]


def test_documents_as_units_and_name_override(tmp_path: Path):
    corpus, _ = _eval_corpus(tmp_path, chunk_chars=None, name="enwiki-2024")
    units = [ex for split in ("validation", "test") for ex in corpus.split(split) if ex.source]
    assert len(units) == 30 and {ex.source for ex in units} == {"enwiki-2024"}
    assert all(ex.text.startswith("d") and ex.text.endswith("w39") for ex in units)  # whole documents


def test_a_source_too_small_for_both_held_out_splits_is_refused(tmp_path: Path):
    (tmp_path / "tiny.txt").write_text("only one short document")
    with pytest.raises(ConfigError, match="none in"):
        build_corpus(_cfg(eval_sources=[EvalSourceConfig(path=str(tmp_path / "tiny.txt"))]))


def test_training_text_equal_to_an_eval_unit_is_dropped_everywhere(tmp_path: Path):
    docs = [_words(12, f"doc{d}w") for d in range(20)]
    (tmp_path / "train.txt").write_text("\n\n".join(docs))
    (tmp_path / "held.txt").write_text("\n\n".join(docs[:10]))
    cfg = _cfg(sources=[SourceConfig(path=str(tmp_path / "train.txt"))],
               eval_sources=[EvalSourceConfig(path=str(tmp_path / "held.txt"), chunk_chars=None)])
    corpus = build_corpus(cfg)
    held = set(docs[:10])
    assert not [ex for ex in corpus.train if ex.text in held]
    assert not [ex for s in ("validation", "test") for ex in corpus.split(s) if ex.text in held and not ex.source]
    assert {ex.text for ex in corpus.train if ex.kind == "text"} <= set(docs[10:])


def test_eval_source_config_is_checked_before_any_data_is_read(tmp_path: Path):
    with pytest.raises(ValidationError, match="also in data.sources"):
        _cfg(sources=[SourceConfig(path=str(tmp_path / "a.txt"))],
             eval_sources=[EvalSourceConfig(path=f"file://{tmp_path / 'a.txt'}")])
    with pytest.raises(ValidationError, match="also in data.sources"):
        _cfg(sources=[SourceConfig(path="s3://bucket/c.jsonl")], eval_sources=[EvalSourceConfig(path="s3://bucket/c.jsonl")])
    with pytest.raises(ValidationError, match="more than once"):
        _cfg(eval_sources=[EvalSourceConfig(path=str(tmp_path / "x" / "t.txt")), EvalSourceConfig(path=str(tmp_path / "t.txt"))])
    with pytest.raises(ValidationError, match="metric key"):
        EvalSourceConfig(path=str(tmp_path / "my corpus.txt"))
    with pytest.raises(ValidationError):
        EvalSourceConfig(path="a.txt", chunk_chars=5)
    with pytest.raises(ValidationError):
        EvalSourceConfig(path="a.txt", unknown=1)
    # Distinct names make two files with one stem fine.
    ok = _cfg(eval_sources=[EvalSourceConfig(path=str(tmp_path / "x" / "t.txt"), name="t1"),
                            EvalSourceConfig(path=str(tmp_path / "t.txt"))])
    assert [s.source_name for s in ok.eval_sources] == ["t1", "t"]


def test_eval_source_paths_must_match_eval_sources(tmp_path: Path):
    cfg = _cfg(eval_sources=[EvalSourceConfig(path="s3://bucket/held.txt")])
    with pytest.raises(ConfigError, match="eval_source_paths"):
        build_corpus(cfg, eval_source_paths=[])
    with pytest.raises(ConfigError, match="S3"):
        build_corpus(cfg)  # forge_models reads local files only; the task layer downloads


# ------------------------------------------------------------------------------------- task layer


def test_data_key_hashes_eval_source_content(tmp_path: Path):
    from flows.config import load_config
    from tasks.data import data_key

    held = tmp_path / "held.txt"
    held.write_text(_words(500))
    plain = data_key(load_config("tiny"))
    cfg = load_config("tiny", overrides=[f"data.eval_sources=[{{path: {held}}}]"])
    key = data_key(cfg)
    assert key != plain and key == data_key(cfg)
    held.write_text(_words(500) + " edited")  # same path, new bytes: a new dataset
    assert data_key(cfg) != key
    held.unlink()
    with pytest.raises(ConfigError, match="data.eval_sources: no such file"):
        data_key(cfg)


def test_s3_eval_sources_are_downloaded_and_reported_per_split(tmp_path: Path, monkeypatch):
    import contextlib
    import io

    import fsspec

    from flows.config import load_config
    from tasks.data import _materialize_sources, eval_source_units_by_split, eval_sources_table

    body = "\n\n".join(_words(40, f"d{d}w") for d in range(30)).encode()
    opened = []

    @contextlib.contextmanager
    def fake_open(url, mode="rb"):
        opened.append(url)
        yield io.BytesIO(body)

    monkeypatch.setattr(fsspec, "open", fake_open)
    cfg = load_config("tiny", overrides=["data.eval_sources=[{path: 's3://bucket/news.txt', chunk_chars: 100}]"])
    paths = _materialize_sources(cfg, tmp_path, "eval_sources")
    assert opened == ["s3://bucket/news.txt"] and paths[0].read_bytes() == body
    assert _materialize_sources(cfg, tmp_path) == []  # data.sources is a separate list
    corpus = build_corpus(cfg.data.model_copy(update={"synthetic": SyntheticConfig(n_examples=300)}), [], paths)
    units = eval_source_units_by_split(corpus)
    assert units["news"]["train"] == 0 and units["news"]["validation"] > 0 and units["news"]["test"] > 0
    assert units["news"]["validation"] + units["news"]["test"] == len(eval_source_units(cfg.data.eval_sources[0], paths[0]))
    table = eval_sources_table(units)
    assert f"| news | 0 | {units['news']['validation']} | {units['news']['test']} |" in table


def test_phase_reports_show_perplexity_by_kind_and_source_next_to_the_headline_table():
    from tasks.runtime import metrics_table

    before = {"loss": 2.0, "ppl": 7.389, "ppl_tokens": 10.0, "ppl_text": 30.0, "ppl_arithmetic": 3.0,
              "ppl_tokens_text": 4.0, "ppl_src_wiki": 55.5, "loss_src_wiki": 4.0}
    after = {**before, "ppl_src_wiki": 44.25}
    report = metrics_table({"before": {"input": before}, "after": {"trained": after}}, ["loss", "ppl"])
    headline, _, breakdown = report.partition("\n\n")
    assert headline.splitlines()[0] == "| when | model | loss | ppl |"  # the headline table is as it was
    assert "| when | model | ppl_arithmetic | ppl_text | ppl_src_wiki |" in breakdown
    assert "| before | input | 3 | 30 | 55.5 |" in breakdown and "| after | trained | 3 | 30 | 44.25 |" in breakdown
    assert "ppl_tokens" not in breakdown
    # Evaluations without a breakdown (older outputs) keep exactly the old single table.
    old = metrics_table({"after": {"m": {"loss": 1.0, "ppl": 2.718}}}, ["loss", "ppl"])
    assert "\n\n" not in old and old.count("| when |") == 1
