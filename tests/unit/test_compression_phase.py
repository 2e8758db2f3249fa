"""Phase 8: the chooser, the artifact round trip and the phase on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forge_models.compression import make_encoder
from forge_models.compression.artifact import artifact_bytes, load_compressed
from forge_models.compression.chooser import Option, choose, hull
from forge_models.compression.phase import CompressionConfig, CompressionInputs, mean_loss, run
from forge_models.runtime import ConfigError, PhaseContext


def test_hull_drops_dominated_and_non_convex_options():
    opts = [Option(100, 10.0), Option(200, 4.0), Option(250, 6.0), Option(300, 3.5), Option(400, 0.5)]
    h = hull(opts)
    assert 2 not in h  # dominated: more bytes and more damage than option 1
    assert 3 not in h  # above the segment 1-4: never optimal for any byte price
    assert h == [0, 1, 4]


def test_chooser_meets_budget_and_never_picks_dominated_on_planted_case():
    g = torch.Generator().manual_seed(0)
    options = {}
    dominated = {}
    for t in range(30):
        base = float(torch.rand(1, generator=g)) * 10 + 1
        size = int(torch.randint(100, 1000, (1,), generator=g))
        opts = [Option(size * 16, 0.0), Option(size * 8, base * 0.01), Option(size * 4, base), Option(size * 3, base * 8)]
        opts.append(Option(size * 5, base * 2))  # planted: more bytes than the 4-bit option and more damage
        options[f"t{t}"] = opts
        dominated[f"t{t}"] = 4
    total_min = sum(o[3].bytes for o in options.values())
    total_max = sum(o[0].bytes for o in options.values())
    for frac in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0):
        budget = int(total_min + frac * (total_max - total_min))
        pick = choose(options, budget)
        assert sum(options[n][i].bytes for n, i in pick.items()) <= budget
        assert all(pick[n] != dominated[n] for n in pick)
    # exhaustive check on a small instance: the greedy hull solution is within the LP gap of the optimum
    small = {k: options[k] for k in list(options)[:4]}
    budget = sum(o[2].bytes for o in small.values())
    pick = choose(small, budget)
    import itertools

    best = min(
        sum(small[n][i].damage for n, i in zip(small, combo))
        for combo in itertools.product(range(5), repeat=4)
        if sum(small[n][i].bytes for n, i in zip(small, combo)) <= budget
    )
    assert sum(small[n][i].damage for n, i in pick.items()) <= best + 1e-9 + max(o[2].damage for o in small.values())
    with pytest.raises(ConfigError):
        choose(options, total_min - 1)


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


class _Tok:
    def save_pretrained(self, folder):
        (__import__("pathlib").Path(folder) / "tokenizer_config.json").write_text("{}")


def _ids(seed, n=8, length=32):
    # Tokens from the model's own (seeded) sampling make the loss meaningful rather than uniform noise.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, length), generator=g)


def _kl(model_a, model_b, ids):
    with torch.no_grad():
        la = torch.log_softmax(model_a(input_ids=ids).logits.float(), -1)
        lb = torch.log_softmax(model_b(input_ids=ids).logits.float(), -1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def _single(spec):
    return CompressionConfig(candidates=(spec,), target_bpw=32.0, max_loss_increase=100.0)


def test_phase_artifact_reload_equals_in_memory_and_kl_rises_as_bits_fall(tmp_path):
    model = _tiny()
    kls = {}
    sizes = {}
    for label, spec in {
        "rtn8": {"name": "rtn", "bits": 8, "group": 32},
        "rtn4": {"name": "rtn", "bits": 4, "group": 32},
        "vptq3": {"name": "vptq", "v": 2, "k1": 64, "kiter": 5},
        "rtn2": {"name": "rtn", "bits": 2, "group": 32},
    }.items():
        inputs = CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), tmp_path / label)
        out = run(inputs, _single(spec), PhaseContext(seed=0))
        assert out.metrics["reload_max_logit_diff"] <= 1e-4
        # the folder reloads independently too, and its logits equal the phase's reloaded model
        again = load_compressed(tmp_path / label)
        probe = _ids(4, 2, 16)
        assert torch.equal(again(input_ids=probe).logits, out.models["model"](input_ids=probe).logits)
        recipe = json.loads((tmp_path / label / "recipe.json").read_text())
        assert all(r["encoding"] == spec["name"] for r in recipe["tensors"].values())
        sizes[label] = artifact_bytes(tmp_path / label)["weights"]
        assert out.metrics["bytes_weights"] == sizes[label]
        kls[label] = _kl(model, again, _ids(5))
    assert sizes["rtn8"] > sizes["rtn4"] > sizes["vptq3"] > sizes["rtn2"]
    assert kls["rtn8"] < kls["rtn4"] < kls["vptq3"] < kls["rtn2"]


def test_phase_meets_budget_with_mixed_choice(tmp_path):
    model = _tiny()
    cands = ({"name": "bf16"}, {"name": "rtn", "bits": 8, "group": 32}, {"name": "rtn", "bits": 4, "group": 32}, {"name": "rtn", "bits": 2, "group": 32})
    inputs = CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), tmp_path / "a")
    out = run(inputs, CompressionConfig(candidates=cands, target_bpw=5.0, max_loss_increase=100.0), PhaseContext())
    assert out.metrics["bits_per_weight_encoded"] <= 5.0
    assert len(out.details["weights_by_encoding"]) >= 2
    target = int(out.metrics["bytes_total"]) + 20_000
    out2 = run(
        CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), tmp_path / "b"),
        CompressionConfig(candidates=cands, target_bytes=target, max_loss_increase=100.0),
        PhaseContext(),
    )
    assert artifact_bytes(tmp_path / "b")["total"] <= target


def test_phase_rolls_back_a_group_that_breaks_the_retention_bound(tmp_path):
    model = _tiny()
    cands = ({"name": "bf16"}, {"name": "rtn", "bits": 2, "group": 64})
    inputs = CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), tmp_path / "r")
    out = run(inputs, CompressionConfig(candidates=cands, target_bpw=2.3, max_loss_increase=1e-4), PhaseContext())
    assert out.metrics["groups_rolled_back"] >= 1
    assert out.metrics["val_loss"] - out.metrics["input_val_loss"] <= 1e-4 + 1e-6 or out.metrics["groups_rolled_back"] == 3


def test_bad_config_and_inputs_fail_before_compute(tmp_path):
    with pytest.raises(ValueError):
        CompressionConfig(target_bytes=10, target_bpw=4.0)
    with pytest.raises(ConfigError):
        CompressionConfig(candidates=({"name": "zip"},), target_bpw=4.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError):
        run(CompressionInputs(_tiny(), _Tok(), _ids(1), _ids(2), _ids(3), tmp_path / "full"), _single({"name": "bf16"}), PhaseContext())
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_bitnet_model_ternary_layers_stored_exactly_and_reloaded_as_packed(tmp_path):
    from forge_models.bitnet.convert import convert_to_bitnet
    from forge_models.bitnet.layers import PackedBitLinear

    model = _tiny()
    convert_to_bitnet(model)
    cands = ({"name": "ternary", "packing": "base3"}, {"name": "bf16"}, {"name": "rtn", "bits": 4, "group": 32})
    inputs = CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), tmp_path / "bit")
    out = run(inputs, CompressionConfig(candidates=cands, target_bpw=8.0, max_loss_increase=100.0), PhaseContext())
    recipe = json.loads((tmp_path / "bit" / "recipe.json").read_text())
    bit = [n for n, r in recipe["tensors"].items() if r.get("bitlinear")]
    assert len(bit) == 2 * 7 and all(recipe["tensors"][n]["encoding"] == "ternary" for n in bit)
    reloaded = load_compressed(tmp_path / "bit")
    assert sum(isinstance(m, PackedBitLinear) for m in reloaded.modules()) == 14
    probe = _ids(4, 2, 16)
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max()
    # the embedding/head is RTN or bf16 (not ternary), so compare with the phase's reloaded model exactly
    assert torch.equal(reloaded(input_ids=probe).logits, out.models["model"](input_ids=probe).logits)
    assert float(diff) < 1.0  # same model up to the encoding of the (non-ternary) embedding


def test_tied_embedding_damage_is_head_term_plus_lookup_of_calibration_tokens(tmp_path):
    from forge_models.compression.chooser import collect_hessians, output_damage

    model = _tiny()
    spec = {"name": "rtn", "bits": 2, "group": 32}
    calib = torch.randint(0, 8, (4, 32), generator=torch.Generator().manual_seed(0))  # only 8 rows looked up
    run(CompressionInputs(model, _Tok(), calib, _ids(2), _ids(3), tmp_path / "e"), _single(spec), PhaseContext())
    damage = json.loads((tmp_path / "e" / "recipe.json").read_text())["tensors"]["model.embed_tokens.weight"]["damage"]
    w = model.model.embed_tokens.weight.detach().float()
    enc = make_encoder(spec)
    dec = enc.decode(enc.encode(w))
    h = collect_hessians(model, calib, 4, {"lm_head": model.lm_head})["lm_head"]
    head = output_damage(w, dec, h)
    counts = torch.bincount(calib.reshape(-1), minlength=128).double()
    lookup = float((counts / counts.sum() * ((w - dec).double() ** 2).sum(1)).sum())
    assert lookup > 0 and damage == pytest.approx(head + lookup, rel=1e-5)


def test_from_pretrained_loads_the_folder_exactly_as_load_compressed(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    import forge_models  # noqa: F401  (registers the forge_compressed quantizer)

    model = _tiny()
    out = tmp_path / "hf"
    run(CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), out), _single({"name": "rtn", "bits": 4, "group": 32}), PhaseContext())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "forge_compressed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    recipe = json.loads((out / "recipe.json").read_text())
    assert not set(index["weight_map"]) & set(recipe["tensors"])  # encoded tensors are decoded, not loaded
    with caplog.at_level("WARNING"):
        hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not [r for r in caplog.records if "corrupted" in r.getMessage() or "MISSING" in r.getMessage()]
    ref = load_compressed(out)
    probe = _ids(4, 2, 16)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=probe).logits, ref(input_ids=probe).logits)
        plain = model(input_ids=probe).logits
        assert not torch.equal(hf(input_ids=probe).logits, plain)  # the 4-bit weights, not the input's
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied again
    half = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (half(input_ids=probe).logits.float() - ref(input_ids=probe).logits).abs().max() < 0.1
    with pytest.raises(ValueError, match="not serializable"):
        hf.save_pretrained(tmp_path / "again")


def test_from_pretrained_of_a_bitnet_artifact_has_packed_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    from forge_models.bitnet.convert import convert_to_bitnet
    from forge_models.bitnet.layers import PackedBitLinear

    model = _tiny()
    convert_to_bitnet(model)
    cands = ({"name": "ternary", "packing": "2bit"}, {"name": "bf16"})
    out = tmp_path / "bit"
    run(CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), out), CompressionConfig(candidates=cands, target_bpw=8.0, max_loss_increase=100.0), PhaseContext())
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, PackedBitLinear) for m in hf.modules()) == 14
    probe = _ids(4, 2, 16)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=probe).logits, load_compressed(out)(input_ids=probe).logits)


def test_from_pretrained_refuses_a_folder_whose_shard_is_gone(tmp_path):
    from transformers import AutoModelForCausalLM

    from forge_models.runtime import ArtifactIntegrityError

    out = tmp_path / "gone"
    run(CompressionInputs(_tiny(), _Tok(), _ids(1), _ids(2), _ids(3), out), _single({"name": "rtn", "bits": 8, "group": 32}), PhaseContext())
    next(p for p in out.glob("shard-*.safetensors") if p.name != "shard-plain.safetensors").unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        AutoModelForCausalLM.from_pretrained(out)


def test_from_pretrained_loads_a_compressed_cognate_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from forge_models.cognate.model import CognateForCausalLM, CognateModelConfig

    torch.manual_seed(0)
    model = CognateForCausalLM(CognateModelConfig(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
        max_refine_steps=3,
    )).eval()
    out = tmp_path / "cog"
    run(CompressionInputs(model, _Tok(), _ids(1), _ids(2), _ids(3), out), _single({"name": "rtn", "bits": 4, "group": 32}), PhaseContext())
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf, CognateForCausalLM)
    probe = _ids(4, 2, 16)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=probe).logits, load_compressed(out)(input_ids=probe).logits)
