"""Tiny model, tokenizer, corpus and config factories shared by the tests (one place, like mergekit's
tests/common.py): test modules import from here, never from each other."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import forge_models  # noqa: F401  (registers "cognate" with the Auto classes)
from forge_models.cognate.model import CognateForCausalLM, CognateModelConfig
from forge_models.config import DataConfig, SyntheticConfig
from forge_models.data import build_corpus
from forge_models.tokenizer import train_bpe
from tasks.runtime import PhaseWritten, run_phase

# ------------------------------------------------------------------------------ models on disk (merges)


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer with tokens t0..t{n-1} (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)


def llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def make_llama(path: Path, seed: int, tokenizer: bool = True, **overrides) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).eval()
    model.save_pretrained(path)
    if tokenizer:
        save_tokenizer(path, model.config.vocab_size)
    return path


def make_cognate(path: Path, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    fields = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=64, max_refine_steps=2)
    fields.update(overrides)
    CognateForCausalLM(CognateModelConfig(**fields)).eval().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ models in memory


def tiny_llama(seed: int = 0, vocab: int = 97, hidden: int = 64, inter: int = 128, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=inter, max_position_embeddings=64)
    fields.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def tiny_cognate(seed: int = 0, vocab: int = 97, max_positions: int = 64) -> CognateForCausalLM:
    torch.manual_seed(seed)
    return CognateForCausalLM(CognateModelConfig(
        vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=max_positions, max_refine_steps=2)).eval()


# ------------------------------------------------------------------------------ data


def corpus_and_tokenizer(n_examples: int = 600, vocab_size: int = 400, validation_percent: int = 10):
    """A small synthetic corpus (seed 1) and a BPE tokenizer trained on its training split."""
    corpus = build_corpus(DataConfig(seed=1, synthetic=SyntheticConfig(n_examples=n_examples),
                                     validation_percent=validation_percent))
    return corpus, train_bpe([ex.text for ex in corpus.train], vocab_size)


# ------------------------------------------------------------------------------ pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(**extra: str) -> list[str]:
    """The tiny preset shrunk so a whole pipeline run takes tens of seconds."""
    sets = {
        "data.synthetic.n_examples": "2500",
        "data.tokenizer.vocab_size": "512",
        "eval.max_examples": "8",
        "eval.ppl_max_tokens": "2048",
        "eval.max_new_tokens": "12",
        "cognate.arch.hidden_size": "64",
        "cognate.arch.intermediate_size": "176",
        "cognate.arch.num_heads": "2",
        "cognate.trunk.steps": "120",
        "cognate.trunk.batch_size": "8",
        "cognate.trunk.seq_len": "64",
        "cognate.trunk.warmup_steps": "10",
        "cognate.checkpoint_every": "40",
        "cognate.min_unigram_gain": "0.3",
        "cognate.variants": "[{name: math, act_threshold: 0.95, max_refine_steps: 2, train: {steps: 30, batch_size: 8, seq_len: 64, lr: 0.001, warmup_steps: 5, data_mix: {arithmetic: 3, tool: 1}}}, "
                            "{name: story, act_threshold: 0.99, max_refine_steps: 1, train: {steps: 30, batch_size: 8, seq_len: 64, lr: 0.001, warmup_steps: 5, data_mix: {narrative: 3, persona: 1}}}]",
        "evomerge.generations": "2",
        "evomerge.population": "4",
        "evomerge.elites": "1",
        "evomerge.patience": "2",
        "bitnet.steps": "30",
        "bitnet.warmup_steps": "10",
        "bitnet.lr": "0.001",
        "bitnet.batch_size": "8",
        "bitnet.seq_len": "64",
        "bitnet.checkpoint_every": "20",
        "bitnet.max_loss_increase": "1.5",
        # 30 QAT steps on a 64-wide model: it must still beat the unigram baseline (keep >= 0% of the gain),
        # not the preset's 90% (measured on the full tiny preset)
        "bitnet.min_gain_kept": "0.0",
        "training.stages": "[{name: adapt, group: adapt, steps: 10, exit: warmed_up}, "
                           "{name: ramp, group: ramp, steps: 10, exit: in_band, curriculum: true, chaos: 0.1}, "
                           "{name: dream, group: dream, steps: 10, exit: dreams_kept, dreams: true, replay: true}, "
                           "{name: self, group: self, steps: 10, exit: self_model_fit, self_model: 1.0, lr_decay: true}]",
        "training.warmup_steps": "5",
        "training.eval_every": "5",
        "training.checkpoint_every": "10",
        "training.dreams.every": "5",
        "training.dreams.n_samples": "4",
        "training.curriculum.window": "8",
        "training.check_tokens": "512",
        "training.max_loss_increase": "1.0",
        "device.precision": "fp32",
        "device.device": "cpu",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def racing_runs(store_url: str, n: int = 2):
    calls = []
    barrier = threading.Barrier(n)

    def body(ctx, inputs, out_dir: Path) -> PhaseWritten:
        calls.append(threading.get_ident())
        time.sleep(1.0)  # long enough for the other run to arrive while this one computes
        (out_dir / "weights.bin").write_bytes(b"w" * 100)
        return PhaseWritten(metrics={"x": 1.0}, report_md="# r")

    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(run_phase(
                phase="demo", kind="model", key="k" * 64, store_url=store_url, config_section={}, inputs=[],
                body=body, tracking=None, parent_run_id=None, device="cpu",
            ))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return calls, results, errors


# ------------------------------------------------------------------ scripted models (the tool loop)


def byte_tokenizer(chat: bool = False):
    """A byte-level tokenizer without merges (one token per ASCII character), so a scripted model can
    write any text one character at a time; ``chat`` adds <|im_start|>/<|im_end|> and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(["a"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|im_end|>" if chat else "<|endoftext|>", pad_token="<|pad|>",
                                  clean_up_tokenization_spaces=False)
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return tok


class ScriptedLM(torch.nn.Module):
    """A causal-LM stand-in whose next token is dictated by ``policy``.

    ``policy(transcript)`` gets the text up to the last ``Assistant:`` (or a chat template's ``assistant``
    line) and returns the reply to write there; the model writes it one character per step, then EOS.
    So it can read a ``Tool: RESULT`` line and answer with it: its answer is right only if the runtime
    really fed the result back. Needs :func:`byte_tokenizer`. Records every context it was called on.
    """

    def __init__(self, tokenizer, policy) -> None:
        super().__init__()
        self.tokenizer, self.policy = tokenizer, policy
        self.calls: list[str] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        from types import SimpleNamespace

        vocab = len(self.tokenizer)
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], vocab), -1e4)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
            text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            self.calls.append(text)
            at = max(text.rfind("Assistant:") + len("Assistant:") if "Assistant:" in text else -1,
                     text.rfind("assistant\n") + len("assistant\n") if "assistant\n" in text else -1)
            head, written = text[:at], text[at:]
            reply = self.policy(head)
            if written == reply[: len(written)] and len(written) < len(reply):
                token = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(reply[len(written)])[0])
            else:
                token = self.tokenizer.eos_token_id
            logits[row, -1, token] = 0.0
        return SimpleNamespace(logits=logits)


# ------------------------------------------------------------------------------ served agent


CALCULATOR_CALL = "<tool>calculator(3 + 4)</tool>"


def agent_artifact(store_url: str, name: str = "final", extra: dict[str, str] | None = None,
                   thoughts: bool = False) -> str:
    """A tiny final artifact in the store as the pipeline leaves it (``model/`` + phase.json, manifest last),
    whose model always calls the calculator: a real 1-layer Llama that loads with ``from_pretrained``.

    Its weights are set by hand: one-hot embeddings (hidden size = vocabulary), attention and MLP outputs
    zero, and an LM head that maps the current token to a fixed next token. After ``:`` (every transcript
    ends with ``Assistant:``) it writes the one token ``<tool>calculator(3 + 4)</tool>``, then EOS. So on
    the tool loop it calls the calculator at every step until the runtime's call limit stops it; with tools
    off it answers with the call text. Like our own models its tokenizer has no chat template. ``extra``:
    more files at the artifact's root (e.g. ``agent.json``), covered by the manifest. ``thoughts``: the model
    folder is made a Quiet-STaR one (two thought tokens added, zero-init mixing head: thinking leaves its
    predictions as they were).
    """
    import json
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tasks.store import Store

    words = ["<unk>", "<s>", "</s>", ":", CALCULATOR_CALL, "User", "Assistant", "Tool", "System", "7"]
    vocab = 16
    words += [f"w{i}" for i in range(len(words), vocab)]
    colon, call, eos = words.index(":"), words.index(CALCULATOR_CALL), words.index("</s>")
    store = Store(store_url)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model = tiny_llama(vocab=vocab, hidden=vocab, inter=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=eos,
                           tie_word_embeddings=False)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            model.model.embed_tokens.weight.copy_(torch.eye(vocab))
            model.model.norm.weight.fill_(1.0)
            for i in range(vocab):  # next token: the call after ':', EOS after anything else
                model.lm_head.weight[call if i == colon else eos, i] = 5.0
        model.save_pretrained(folder)
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>")
        fast.add_tokens([CALCULATOR_CALL])  # matched whole, before the whitespace split
        assert fast.convert_tokens_to_ids(CALCULATOR_CALL) == call
        fast.save_pretrained(folder)
        if thoughts:
            from forge_models.quietstar import QuietStar, QuietStarConfig, save_quietstar

            torch.manual_seed(0)
            save_quietstar(QuietStar.wrap(model, fast, QuietStarConfig(thought_tokens=2)).float().eval(), fast, folder)
        (Path(tmp) / "phase.json").write_text(json.dumps({"phase": "training", "metrics": {}}))
        for rel, text in (extra or {}).items():
            (Path(tmp) / rel).write_text(text)
        uri = store.uri(name)
        store.write_prefix(Path(tmp), uri, kind="model")
    return uri
