"""Per-source perplexity of held-out-only real text, checked with models whose perplexity is known."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from forge_models.config import EvalConfig, SourceConfig
from forge_models.eval.real_text import document_windows, eval_source_metrics
from forge_models.runtime import ConfigError, PhaseContext

CTX = PhaseContext(precision="fp32")
CFG = EvalConfig(ppl_max_tokens=10_000, seq_len=16)
VOCAB = 128


class ByteTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


class CycleLM(nn.Module):
    """Certain that "a" follows "c", "b" follows "a", "c" follows "b"; uniform after anything else."""

    def forward(self, input_ids):
        nxt = {ord("a"): ord("b"), ord("b"): ord("c"), ord("c"): ord("a")}
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for (b, t), tok in zip([(b, t) for b in range(input_ids.shape[0]) for t in range(input_ids.shape[1])],
                               input_ids.flatten().tolist()):
            if tok in nxt:
                logits[b, t, nxt[tok]] = 60.0
        return SimpleNamespace(logits=logits)


def test_windows_never_span_two_documents():
    docs = ["abcdefgh", "XYZ", "q", "0123456789"]
    windows = document_windows(docs, ByteTok(), seq_len=3, max_tokens=100)
    texts = [bytes(w).decode() for w in windows]
    assert texts == ["abc", "def", "gh", "XYZ", "012", "345", "678"]  # "q" and the lone "9" predict nothing
    assert all(any(t in d for d in docs) for t in texts)
    assert sum(map(len, document_windows(docs, ByteTok(), 3, max_tokens=8))) == 8  # the token budget holds
    assert sum(map(len, document_windows(docs, ByteTok(), 3, max_tokens=7))) == 6  # a 1-token rest predicts nothing


def test_each_source_reports_its_own_perplexity(tmp_path: Path):
    cyclic, other = tmp_path / "cyclic.txt", tmp_path / "prose.txt"
    cyclic.write_text("abcabcabcabcabcabcabc\n\nbcabcabca")
    other.write_text("xyzzy plugh\n\nfee fie foe")
    metrics = eval_source_metrics(CycleLM(), ByteTok(), [SourceConfig(path=str(cyclic)), SourceConfig(path=str(other))],
                                  CFG, CTX)
    assert metrics["cyclic/ppl"] == pytest.approx(1.0, abs=1e-6)  # perfectly predicted
    assert metrics["prose/ppl"] == pytest.approx(VOCAB, rel=1e-6)  # uniform: ppl = vocabulary size
    # 21 chars -> windows 16 + 5, 9 chars -> one window: each window's first token is unscored.
    assert metrics["cyclic/ppl_tokens"] == (16 - 1) + (5 - 1) + (9 - 1)
    assert metrics["prose/loss"] == pytest.approx(math.log(VOCAB))


def test_sources_with_one_name_or_no_text_are_refused(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.txt").write_text("abc")
    (tmp_path / "t.txt").write_text("abc")
    with pytest.raises(ConfigError, match="share a file name"):
        eval_source_metrics(CycleLM(), ByteTok(), [SourceConfig(path=str(tmp_path / "t.txt")),
                                                   SourceConfig(path=str(tmp_path / "a" / "t.txt"))], CFG, CTX)
    (tmp_path / "short.txt").write_text("a\n\nb")
    with pytest.raises(ConfigError, match="perplexity is undefined"):
        eval_source_metrics(CycleLM(), ByteTok(), [SourceConfig(path=str(tmp_path / "short.txt"))], CFG, CTX)
