"""The byte-level BPE: exact round trip, fixed special ids, save/load, pad fallback, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from forge_models.config import SyntheticConfig, TokenizerConfig
from forge_models.data import generate_synthetic
from forge_models.runtime import ConfigError
from forge_models.tokenizer import build_tokenizer, load_tokenizer, train_bpe

TRICKY = [
    "Q: What is 3 + 4 * 2?\nA: 4 * 2 = 8. 3 + 8 = 11. The answer is 11.\n",
    "  two leading spaces, trailing space ",
    "\n\nstarts with blank lines\n\n\nand   runs of   spaces\t\ttabs",
    " . , ! ? ' \" ( ) don't can't I'll  ;:  -- ++ **",
    "<tool>calculator(37 * 12)</tool>\nTool: 444\n",
    "~`@#$%^&{}[]|\\/<>=_ 0123456789",
    "",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [ex.text for ex in generate_synthetic(SyntheticConfig(n_examples=800), seed=0)]


@pytest.fixture(scope="module")
def tok(texts):
    return train_bpe(texts, vocab_size=600)


def test_round_trip_is_exact(tok, texts):
    for text in TRICKY + texts[:200]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.encode(text) == ids  # no special tokens are added by default


def test_special_ids_are_fixed(tok):
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.convert_tokens_to_ids("<|pad|>") == 1
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)


def test_vocab_respects_budget_and_merges_were_learned(tok, texts):
    assert 300 < len(tok) <= 600
    text = texts[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2  # BPE compresses well beyond bytes


def test_save_and_load_round_trip(tok, texts, tmp_path: Path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in TRICKY + texts[:100]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (0, 1, len(tok))


def test_load_falls_back_to_eos_as_pad(tmp_path: Path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_special_tokens(["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id


def test_load_errors_name_the_folder(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"{tmp_path} holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match=f"cannot load the tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_build_tokenizer_trains_or_loads(tok, texts, tmp_path: Path):
    trained = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400), texts[:300])
    assert len(trained) <= 400 and trained.decode(trained.encode(texts[0])) == texts[0]
    tok.save_pretrained(tmp_path)
    loaded = build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path)), [])
    assert loaded.encode(texts[1]) == tok.encode(texts[1])


def test_train_bpe_rejects_bad_input():
    with pytest.raises(ConfigError, match="vocab_size 200"):
        train_bpe(["abc"], vocab_size=200)
    with pytest.raises(ConfigError, match="no non-empty training texts"):
        train_bpe(["", ""], vocab_size=400)
