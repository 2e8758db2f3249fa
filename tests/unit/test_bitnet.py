"""BitNet b1.58 (Phase 4): quantisers (golden values), ternary invariants, STE, lambda, packing, integer
inference, conversion, export -> transformers reload, training sanity, and the phase (sizes, resume,
divergence, quality gate). Tiny fp32 models on CPU; the whole file runs in well under a minute.

transformers' BitNet layers are decorated with ``torch.compile``; compiling them costs ~20 s on this CPU,
so every call into them runs with dynamo disabled (eager), which computes the same thing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.integrations import bitnet as hf_bitnet

import forge_models  # noqa: F401  (registers "cognate" with the Auto classes)
from forge_models import bitnet
from forge_models.bitnet import (
    PACKINGS,
    BitLinear,
    BitNetConfig,
    BitNetInputs,
    PackedBitLinear,
    activation_fake_quant,
    activation_quant,
    calibrate_act_norms,
    convert_to_bitnet,
    export_packed,
    load_packed,
    pack_2bit,
    pack_base3,
    quant_strength_at,
    safetensors_bytes,
    set_quant_strength,
    unpack_2bit,
    unpack_base3,
    weight_fake_quant,
    weight_quant,
    write_bf16_reference,
)
from forge_models.config import DataConfig, EvalConfig, SyntheticConfig
from forge_models.data import TokenSampler, build_corpus
from forge_models.eval import evaluate, unigram_loss
from forge_models.runtime import (
    ArtifactIntegrityError,
    ConfigError,
    PhaseContext,
    QualityGateFailed,
    RecordingTracker,
    TrainingDiverged,
)
from forge_models.tokenizer import train_bpe
from tests.factories import tiny_cognate, tiny_llama
from tests.helpers import Interrupted, StopAt, poison_loss

# ------------------------------------------------------------------------------------------ helpers

GOLDEN_W = [[0.8, -0.5, 1.2], [-1.5, 0.4, -0.9], [1.3, -0.7, 0.2]]
GOLDEN_X = [[1.0, -0.6, 0.7], [-0.9, 0.4, -1.2], [0.8, -0.5, 0.3]]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def hf_reload(folder: Path):
    """transformers' own BitNet loading and forward, eager (see the module docstring)."""
    with torch._dynamo.config.patch(disable=True):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------- quantisers


def test_golden_weight_quantisation_from_the_reference():
    q, scale = weight_quant(torch.tensor(GOLDEN_W))
    # mean|W| = 0.8333, s_w = 1 / mean|W| = 1.2 (the reciprocal: the trap is storing mean|W| instead).
    assert float(scale) == pytest.approx(1.2, abs=1e-6)
    assert q.dtype == torch.int8
    assert q.tolist() == [[1, -1, 1], [-1, 0, -1], [1, -1, 0]]
    assert torch.allclose(weight_fake_quant(torch.tensor(GOLDEN_W)), q.float() / 1.2)


def test_golden_activation_quantisation_from_the_reference():
    q, scale = activation_quant(torch.tensor(GOLDEN_X))
    assert scale.shape == (3, 1)
    assert scale.flatten().tolist() == pytest.approx([127.0, 105.8333, 158.75], abs=1e-3)
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, -76, 89], [-95, 42, -127], [127, -79, 48]]


def test_quantised_weights_are_ternary_with_about_31_percent_zeros_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    q, scale = weight_quant(w)
    assert set(q.unique().tolist()) == {-1, 0, 1}
    assert weight_fake_quant(w).unique().numel() <= 3
    # P(|z| < 0.5 * E|z|) = P(|z| < 0.399) = 0.310 for a standard normal; a per-row scale at 0.1x gives ~6%.
    zeros = float((q == 0).float().mean())
    assert 0.29 < zeros < 0.33, zeros
    # Activations: int8 range, the largest |x| of each token maps to exactly +-127.
    x = torch.randn(5, 64) * torch.tensor([[0.01], [1.0], [30.0], [1e-3], [5.0]])
    xq, _ = activation_quant(x)
    assert xq.abs().amax(dim=-1).tolist() == [127] * 5


def test_quant_strength_schedule_is_min_step_over_warmup_and_one():
    assert [quant_strength_at(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert quant_strength_at(0, 0) == 1.0


# ---------------------------------------------------------------------------------------- BitLinear


@pytest.mark.parametrize("act_norm", ["none", "rms"])
def test_ste_gradient_equals_a_linear_layer_at_the_dequantised_weights(act_norm):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    layer = BitLinear.from_linear(copy.deepcopy(linear), act_norm=act_norm)
    x = torch.randn(3, 5, 24)
    layer(x).square().sum().backward()

    x_n = layer.rms_norm(x).detach() if act_norm == "rms" else x
    reference = torch.nn.Linear(24, 16)
    with torch.no_grad():
        reference.weight.copy_(weight_fake_quant(linear.weight))
        reference.bias.copy_(linear.bias)
    reference(activation_fake_quant(x_n)).square().sum().backward()

    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
    assert torch.allclose(layer.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-6)
    if act_norm == "rms":  # the norm gain trains too
        assert float(layer.rms_norm.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("act_norm", ["none", "rms"])
def test_lambda_zero_is_the_linear_layer_and_lambda_one_the_quantised_layer(act_norm):
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 12)
    layer = BitLinear.from_linear(copy.deepcopy(linear), act_norm=act_norm)
    x = torch.randn(4, 32)
    set_quant_strength(torch.nn.Sequential(layer), 0.0)
    assert torch.equal(layer(x), linear(x))

    layer.quant_strength = 1.0
    x_n = layer.rms_norm(x) if act_norm == "rms" else x
    quantised = F.linear(activation_fake_quant(x_n), weight_fake_quant(layer.weight), layer.bias)
    assert torch.equal(layer(x), quantised)  # training forward (grad enabled): exactly the fake-quant layer
    with torch.no_grad():  # inference forward: the integer product, equal up to float rounding
        assert relative_error(layer(x), quantised) < 1e-6

    layer.quant_strength = 0.5
    blended = F.linear(0.5 * x + 0.5 * activation_fake_quant(x_n),
                       0.5 * layer.weight + 0.5 * weight_fake_quant(layer.weight), layer.bias)
    assert torch.allclose(layer(x), blended, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        set_quant_strength(torch.nn.Sequential(layer), 1.5)


# ------------------------------------------------------------------------------------------ packing

SHAPES = [(4, 3), (5, 7), (7, 1), (13, 9), (1, 5), (64, 32), (10, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_pack_unpack_round_trip_is_exact_with_the_computed_size(shape, packing):
    torch.manual_seed(sum(shape))
    q = torch.randint(-1, 2, shape, dtype=torch.int8)
    fmt = PACKINGS[packing]
    packed = fmt.pack(q)
    assert packed.dtype == torch.uint8
    assert packed.numel() == fmt.packed_bytes(*shape) == math.ceil(shape[0] / fmt.values_per_byte) * shape[1]
    assert torch.equal(fmt.unpack(packed, shape[0]), q)


@pytest.mark.parametrize("shape", SHAPES)
def test_2bit_packing_is_byte_compatible_with_transformers(shape):
    torch.manual_seed(sum(shape))
    q = torch.randint(-1, 2, shape, dtype=torch.int8)
    theirs = hf_bitnet.pack_weights(q.clone())  # pack_weights adds 1 in place: give it a copy
    assert torch.equal(pack_2bit(q), theirs)
    with torch._dynamo.config.patch(disable=True):
        unpacked = hf_bitnet.unpack_weights(theirs, dtype=torch.float32)
    assert torch.equal(unpacked[: shape[0]].to(torch.int8), unpack_2bit(theirs, shape[0]))


def test_packing_refuses_non_ternary_input_and_corrupt_bytes():
    with pytest.raises(ConfigError, match="ternary"):
        pack_2bit(torch.tensor([[2, 0], [1, -1]]))
    with pytest.raises(ConfigError, match="non-integer"):
        pack_base3(torch.tensor([[0.5, 0.0]]))
    with pytest.raises(ArtifactIntegrityError, match="code 3"):
        unpack_2bit(torch.full((1, 2), 0xFF, dtype=torch.uint8), 4)
    with pytest.raises(ArtifactIntegrityError, match="> 242"):
        unpack_base3(torch.full((1, 2), 250, dtype=torch.uint8), 5)
    with pytest.raises(ArtifactIntegrityError, match="cannot hold"):
        unpack_2bit(torch.zeros((2, 2), dtype=torch.uint8), 12)


# ---------------------------------------------------------------------------------- integer inference


@pytest.mark.parametrize("backend", ["int_mm", "int32"])
@pytest.mark.parametrize("act_norm", ["none", "rms"])
@pytest.mark.parametrize("out_features", [48, 10])
def test_integer_path_matches_the_fake_quantised_float_path(backend, act_norm, out_features):
    torch.manual_seed(2)
    layer = BitLinear.from_linear(torch.nn.Linear(40, out_features), act_norm=act_norm)
    if act_norm == "rms":
        with torch.no_grad():
            layer.rms_norm.weight.uniform_(0.5, 2.0)
    packed = PackedBitLinear.from_bitlinear(layer, backend=backend)
    x = torch.randn(2, 7, 40) * 3

    x_n = layer.rms_norm(x) if act_norm == "rms" else x
    with torch.no_grad():
        fake = F.linear(activation_fake_quant(x_n), weight_fake_quant(layer.weight), layer.bias)
        got = packed(x)
    assert got.shape == fake.shape
    assert relative_error(got, fake) < 1e-5
    # It really is held as 2-bit codes: no float weight matrix anywhere in the layer.
    assert packed.codes.dtype == torch.uint8 and packed.codes.numel() == 40 * math.ceil(out_features / 4)
    assert not any(t.is_floating_point() and t.numel() >= 40 * out_features for t in packed.state_dict().values())
    assert torch.equal(packed.ternary(), weight_quant(layer.weight)[0])


needs_rowwise = pytest.mark.skipif(not bitnet.rowwise_available(), reason="torch build without fbgemm quantized ops")
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler: the fused kernel cannot be built here")


def _counting_int_mm(monkeypatch) -> list[int]:
    """Replace the int_mm GEMM by a wrapper that records the rows of each call (the GEMM path ran)."""
    calls: list[int] = []
    gemm = bitnet.layers.MATMUL_BACKENDS["int_mm"]

    def counted(x_q, w_t):
        calls.append(x_q.shape[0])
        return gemm(x_q, w_t)

    monkeypatch.setitem(bitnet.layers.MATMUL_BACKENDS, "int_mm", counted)
    return calls


def _layer_and_outlier_input(in_features: int, out_features: int, act_norm: str, rows: int):
    """A BitLinear (norm gain not 1 when it has one) and an input ``(1, rows, in)`` whose first token has an
    outlier, so that token's other activations quantise to small integers."""
    torch.manual_seed(in_features * out_features + rows)
    layer = BitLinear.from_linear(torch.nn.Linear(in_features, out_features), act_norm=act_norm)
    if act_norm == "rms":
        with torch.no_grad():
            layer.rms_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(1, rows, in_features) * 3
    x[0, 0, 0] = 1e4
    return layer, x


def _fake_quantised(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """The float reference: fake-quantised activations (after the norm, if any) times fake-quantised weights."""
    return F.linear(activation_fake_quant(layer.rms_norm(x) if layer.rms_norm is not None else x),
                    weight_fake_quant(layer.weight), layer.bias)


@needs_rowwise
@pytest.mark.parametrize("act_norm", ["none", "rms"])
@pytest.mark.parametrize(("in_features", "out_features"), [(40, 48), (40, 10), (13, 7), (9, 1), (33, 6)])
@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_rowwise_backend_is_bit_identical_to_the_integer_path(monkeypatch, act_norm, in_features, out_features, rows):
    layer, x = _layer_and_outlier_input(in_features, out_features, act_norm, rows)
    reference = PackedBitLinear.from_bitlinear(layer, backend="int_mm")
    rowwise = PackedBitLinear.from_bitlinear(layer, backend="rowwise2bit")
    # rowwise2bit is the default where fbgemm exists and the fused kernel does not
    assert PackedBitLinear.from_bitlinear(layer).backend == ("ternary_kernel" if bitnet.kernel_available()
                                                             else "rowwise2bit")
    with torch.no_grad():
        want = reference(x)
        calls = _counting_int_mm(monkeypatch)
        got = rowwise(x)
        fake = _fake_quantised(layer, x)
    assert torch.equal(got, want)  # the same integers, the same scale division: bit for bit
    assert relative_error(got, fake) < 1e-5
    # Decode-sized calls never touch the GEMM (the embedding bag ran); larger ones use it once. Batch-1
    # decode (one row) must always take the bag: that is what the backend is for.
    assert bitnet.ROWWISE_MAX_ROWS >= 1 and bitnet.layers.ROWWISE_MAX_ROWS == bitnet.ROWWISE_MAX_ROWS
    assert calls == ([] if rows <= bitnet.ROWWISE_MAX_ROWS else [rows])
    assert torch.equal(rowwise.ternary(), reference.ternary())
    assert torch.equal(rowwise.ternary(), weight_quant(layer.weight)[0])


@pytest.mark.parametrize("backend", [pytest.param("rowwise2bit", marks=needs_rowwise),
                                     pytest.param("ternary_kernel", marks=needs_compiler)])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_decode_backends_are_exact_at_the_largest_accumulators(backend, rows):
    # Every product +-127 * +-1 with one sign: |acc| = 127 * in, far beyond float16 and bf16 and where a
    # float32 sum of 1376 terms would round if it were not exact integer arithmetic below 2^24.
    in_features, out_features = 1376, 12
    ternary = torch.ones(out_features, in_features, dtype=torch.int8)
    ternary[1::2] = -1
    ternary[2, ::3] = 0
    decoder = PackedBitLinear(ternary, 1.0, backend=backend)
    reference = PackedBitLinear(ternary, 1.0, backend="int_mm")
    x = torch.ones(rows, in_features)  # row 0: x_q = 127 everywhere, s_x = 127
    x[1:] = -torch.rand(rows - 1, in_features) - 1.0
    got = decoder(x)
    assert torch.equal(got, reference(x))
    # acc = +-127 * 1376 = +-174752, divided by s_x * s_w = 127
    assert got[0, 0] == in_features and got[0, 1] == -in_features


@needs_rowwise
@pytest.mark.parametrize(("in_features", "out_features"), [(512, 512), (512, 1376), (1376, 512), (40, 10), (13, 7)])
def test_rowwise_memory_is_2_bits_per_weight_plus_4_bytes_per_input(in_features, out_features):
    torch.manual_seed(0)
    ternary = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
    bias = torch.randn(out_features)
    layer = PackedBitLinear(ternary, 0.5, bias=bias, rms_norm_weight=torch.ones(in_features), backend="rowwise2bit")
    assert layer.codes.dtype == torch.uint8
    assert layer.codes.shape == (in_features, math.ceil(out_features / 4) + 4)
    expected = in_features * (math.ceil(out_features / 4) + 4) + 4 + 4 * out_features + 4 * in_features
    assert layer.resident_bytes() == expected
    assert sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == expected
    state = layer.state_dict().values()
    assert not any(t.is_floating_point() and t.numel() >= in_features * out_features for t in state)
    if in_features >= 512:  # the goal, for layers of a real model: >= 5x smaller than fp32 (here ~15x)
        weights_only = layer.codes.numel() + 4
        assert 4 * in_features * out_features / weights_only > 14
    layer(torch.randn(1, in_features))
    # The shared index cache is int32 (indices + offsets), a few bytes per input feature per cached row count.
    assert bitnet.bag_index_bytes() <= 4 * sum(i * r + r for i, r, _ in bitnet.layers._BAG_INDICES)


def test_rowwise_falls_back_cleanly_without_fbgemm(monkeypatch):
    monkeypatch.setattr(bitnet.layers, "kernel_available", lambda: False)
    monkeypatch.setattr(bitnet.layers, "rowwise_available", lambda: False)
    assert bitnet.default_packed_backend() == bitnet.default_backend()
    ternary = torch.randint(-1, 2, (8, 16), dtype=torch.int8)
    assert PackedBitLinear(ternary, 1.0).backend == bitnet.default_backend()
    with pytest.raises(ConfigError, match="fbgemm"):
        PackedBitLinear(ternary, 1.0, backend="rowwise2bit")
    with pytest.raises(ConfigError, match="unknown integer matmul backend"):
        PackedBitLinear(ternary, 1.0, backend="nope")


@needs_rowwise
def test_load_packed_backends_decode_with_the_kv_cache_identically(tmp_path):
    model = tiny_llama(hidden=64)
    convert_to_bitnet(model, act_norm="rms")
    export_packed(model, tmp_path)
    rowwise, int_mm = load_packed(tmp_path, backend="rowwise2bit"), load_packed(tmp_path, backend="int_mm")
    assert {m.backend for _, m in bitnet.packed_linears(rowwise)} == {"rowwise2bit"}
    models = [rowwise, int_mm, model]
    if bitnet.kernel_available():
        fused = load_packed(tmp_path)  # the default where the kernel builds
        assert {m.backend for _, m in bitnet.packed_linears(fused)} == {"ternary_kernel"}
        models.append(fused)
    prompt = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        outs = [m.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True) for m in models]
    for other in outs[1:]:
        assert torch.equal(outs[0].sequences, other.sequences)
        for step in range(6):  # step 0 is the 5-token prefill, then 1-token calls (embedding bag / fused kernel)
            assert torch.equal(outs[0].logits[step], other.logits[step])


# ------------------------------------------------------------------------- the fused ternary kernel



@needs_compiler
def test_kernel_builds_where_a_compiler_exists():
    # Not a skip condition: with a compiler on PATH a broken build must fail the suite, not hide the kernel.
    assert bitnet.kernel.load_kernel().is_file()
    assert bitnet.default_packed_backend() == "ternary_kernel"


@needs_compiler
@pytest.mark.parametrize("act_norm", ["none", "rms"])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 48), (40, 10), (13, 7), (9, 1), (97, 6), (512, 129)])
@pytest.mark.parametrize("rows", [1, 2, 5, 32, 33])
def test_kernel_backend_is_bit_identical_to_the_integer_path(monkeypatch, act_norm, in_features, out_features, rows):
    # in = 40, 13, 9, 97: not multiples of the 32-byte vector step (the scalar tail); out % 4 != 0: padding rows.
    layer, x = _layer_and_outlier_input(in_features, out_features, act_norm, rows)
    reference = PackedBitLinear.from_bitlinear(layer, backend="int_mm")
    fused = PackedBitLinear.from_bitlinear(layer, backend="ternary_kernel")
    with torch.no_grad():
        want = reference(x)
        calls = _counting_int_mm(monkeypatch)
        got = fused(x)
        fake = _fake_quantised(layer, x)
    assert got.shape == want.shape and torch.equal(got, want)  # same integers, same scale division, bias
    assert relative_error(got, fake) < 1e-5
    assert calls == ([] if rows <= bitnet.KERNEL_MAX_ROWS else [rows])  # the kernel ran, or the GEMM did
    assert torch.equal(fused.ternary(), weight_quant(layer.weight)[0])


@needs_compiler
def test_kernel_output_does_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    big = PackedBitLinear(torch.randint(-1, 2, (1376, 512), dtype=torch.int8), 0.3, backend="ternary_kernel")
    reference = PackedBitLinear(big.ternary(), 0.3, backend="int_mm")
    x = torch.randn(3, 512)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):  # the layer's rows are split over the threads
            torch.set_num_threads(threads)
            outs.append(big(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], reference(x))


@needs_compiler
def test_kernel_layout_is_transformers_2bit_and_holds_2_bits_per_weight():
    torch.manual_seed(0)
    ternary = torch.randint(-1, 2, (130, 96), dtype=torch.int8)
    bias = torch.randn(130)
    layer = PackedBitLinear(ternary, 0.5, bias=bias, rms_norm_weight=torch.ones(96), backend="ternary_kernel")
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (33, 96)
    assert torch.equal(layer.codes, pack_2bit(ternary))  # the file's layout as is: nothing converted at load
    assert layer.resident_bytes() == 33 * 96 + 4 + 4 * 130 + 4 * 96
    assert not any(t.is_floating_point() and t.numel() >= 96 * 130 for t in layer.state_dict().values())


@needs_compiler
def test_kernel_gives_nan_for_nan_input_not_garbage():
    layer = PackedBitLinear(torch.randint(-1, 2, (8, 40), dtype=torch.int8), 1.0, backend="ternary_kernel")
    x = torch.randn(2, 40)
    x[1, 3] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


@needs_compiler
def test_load_packed_gives_the_kernel_the_files_codes_and_refuses_corrupt_ones(tmp_path):
    import safetensors.torch

    model = tiny_llama(hidden=64)
    convert_to_bitnet(model, act_norm="rms")
    export_packed(model, tmp_path)
    stored = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    fused = load_packed(tmp_path, backend="ternary_kernel")
    name, layer = bitnet.packed_linears(fused)[0]
    assert torch.equal(layer.codes, stored[f"{name}.weight"])  # the file's bytes, not unpacked and re-packed
    assert layer.codes.untyped_storage().nbytes() == layer.codes.numel()  # its own copy, not a view of the file
    # One real weight set to code 3 (no ternary value): refused with the file and layer named.
    corrupt = dict(stored)
    corrupt[f"{name}.weight"] = stored[f"{name}.weight"].clone()
    corrupt[f"{name}.weight"][0, 0] |= 0b11
    safetensors.torch.save_file(corrupt, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactIntegrityError, match=f"{name}.weight.*code 3"):
        load_packed(tmp_path, backend="ternary_kernel")
    with pytest.raises(ArtifactIntegrityError, match="code 3"):
        load_packed(tmp_path, backend="int_mm")
    with pytest.raises(ConfigError, match="layout"):
        PackedBitLinear(torch.zeros(8, 4, dtype=torch.int8), 1.0, backend="int_mm",
                        codes_2bit=torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="cannot hold"):
        PackedBitLinear(torch.zeros(8, 4, dtype=torch.int8), 1.0, backend="ternary_kernel",
                        codes_2bit=torch.zeros(3, 4, dtype=torch.uint8))


def test_kernel_build_failures_are_clear_errors_and_leave_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(bitnet.kernel, "_LOADED", None)
    monkeypatch.setenv("FORGE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(bitnet.kernel.KernelUnavailable, match="no C.. compiler"):
        bitnet.kernel.load_kernel()
    assert not bitnet.kernel_available()  # the outcome is remembered, never retried per call
    with pytest.raises(ConfigError, match="ternary_kernel.*unavailable"):
        PackedBitLinear(torch.randint(-1, 2, (8, 16), dtype=torch.int8), 1.0, backend="ternary_kernel")
    assert bitnet.default_packed_backend() in ("rowwise2bit", bitnet.default_backend())

    monkeypatch.setattr(bitnet.kernel, "_LOADED", None)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that exits 1
    with pytest.raises(bitnet.kernel.KernelUnavailable, match="compiling ternary_linear.cpp failed"):
        bitnet.kernel.load_kernel()
    assert list(tmp_path.iterdir()) == []  # no half-written library left to load later

    monkeypatch.setattr(bitnet.kernel, "_LOADED", None)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FORGE_KERNEL_CACHE", str(blocker / "cache"))  # cannot be created: a file is in the way
    monkeypatch.setenv("CXX", "g++" if shutil.which("g++") else "false")
    with pytest.raises(bitnet.kernel.KernelUnavailable, match="cannot write the kernel cache"):
        bitnet.kernel.load_kernel()

    monkeypatch.setattr(bitnet.kernel, "_LOADED", None)
    monkeypatch.setenv("FORGE_BITNET_KERNEL", "0")
    assert not bitnet.kernel_available()


# --------------------------------------------------------------------------------------- conversion


def test_conversion_of_llama_and_cognate_lists_converted_and_kept_modules():
    llama = tiny_llama()
    report = convert_to_bitnet(llama)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert report.converted == [f"model.layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert report.kept_linear == ["lm_head"]
    assert report.kept["model.embed_tokens"] == "embedding"
    assert report.kept["model.norm"] == "norm" and report.kept["model.layers.1.post_attention_layernorm"] == "norm"
    assert all(isinstance(llama.get_submodule(n), BitLinear) for n in report.converted)
    assert type(llama.lm_head) is torch.nn.Linear

    cognate = tiny_cognate()
    report = convert_to_bitnet(cognate, keep_patterns=["halt"])  # lm_head is kept anyway (tied embedding)
    assert sorted(report.kept_linear) == ["lm_head", "model.halt"]
    assert "keep pattern 'halt'" in report.kept["model.halt"]
    assert len(report.converted) == 14

    regex = convert_to_bitnet(tiny_llama(), keep_patterns=[r"model\.layers\.0\..*"])
    assert len(regex.converted) == 7 and "model.layers.0.mlp.down_proj" in regex.kept_linear


def test_conversion_refuses_models_it_cannot_ternarise():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ConfigError, match="Conv1D"):
        convert_to_bitnet(gpt2)
    with pytest.raises(ConfigError, match="no linear layer was converted"):
        convert_to_bitnet(tiny_llama(), keep_patterns=[".*"])
    with pytest.raises(ConfigError, match="regular expression"):
        convert_to_bitnet(tiny_llama(), keep_patterns=["("])


def test_norm_calibration_keeps_the_scale_of_each_layer_input():
    model = tiny_llama()
    convert_to_bitnet(model, act_norm="rms")
    ids = torch.randint(0, 97, (2, 16))
    gains = calibrate_act_norms(model, ids)
    down = model.model.layers[0].mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(float(a[0].detach().pow(2).mean(-1).sqrt().mean())))
    set_quant_strength(model, 0.0)
    model(input_ids=ids)
    handle.remove()
    assert gains["model.layers.0.mlp.down_proj"] == pytest.approx(seen[0], rel=1e-5)
    assert torch.all(down.rms_norm.weight == down.rms_norm.weight[0])
    assert all(m.quant_strength == 0.0 for _, m in bitnet.bit_linears(model))  # strengths restored as found


# ------------------------------------------------------------------------------ export and reload


@pytest.mark.parametrize("act_norm", ["rms", "none"])
def test_export_reloads_with_transformers_and_gives_the_same_logits(tmp_path, act_norm):
    model = tiny_llama(hidden=64)
    report = convert_to_bitnet(model, act_norm=act_norm)
    if act_norm == "rms":
        calibrate_act_norms(model, torch.randint(0, 97, (2, 16)))
    export_packed(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
        "use_rms_norm": act_norm == "rms", "rms_norm_eps": 1e-6, "modules_to_not_convert": ["lm_head"]}

    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        in_memory = model(input_ids=ids).logits
        ours = load_packed(tmp_path)(input_ids=ids).logits
    theirs_model = hf_reload(tmp_path)
    assert isinstance(theirs_model.model.layers[0].mlp.down_proj, hf_bitnet.BitLinear)
    assert type(theirs_model.lm_head) is torch.nn.Linear
    theirs = hf_logits(theirs_model, ids)
    assert torch.equal(ours, in_memory)
    assert torch.equal(theirs, ours)

    packed = safetensors_bytes(tmp_path / "model.safetensors", report.converted)
    bf16 = safetensors_bytes(write_bf16_reference(model, tmp_path / "bf16.safetensors"), report.converted)
    expected = sum(math.ceil(m.out_features / 4) * m.in_features + 4 for _, m in bitnet.bit_linears(model))
    assert packed["linear"] == expected
    assert 7.9 < bf16["linear"] / packed["linear"] <= 8.0


def test_cognate_export_reloads_with_transformers(tmp_path):
    model = tiny_cognate()
    convert_to_bitnet(model, keep_patterns=["halt"])
    export_packed(model, tmp_path)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        in_memory = model(input_ids=ids).logits
        ours = load_packed(tmp_path)(input_ids=ids).logits
    theirs = hf_logits(hf_reload(tmp_path), ids)
    assert torch.equal(ours, in_memory) and torch.equal(theirs, in_memory)


def test_base3_export_is_smaller_and_reloads_exactly_and_2bit_refuses_odd_shapes(tmp_path):
    model = tiny_llama(hidden=32, inter=30)  # gate/up have 30 outputs: not a multiple of 4
    report = convert_to_bitnet(model)
    with pytest.raises(ConfigError, match="multiple of 4"):
        export_packed(model, tmp_path / "2bit")
    export_packed(model, tmp_path / "base3", packing="base3", kept_dtype="bfloat16")
    assert "quantization_config" not in json.loads((tmp_path / "base3" / "config.json").read_text())
    packed = safetensors_bytes(tmp_path / "base3" / "model.safetensors", report.converted)
    expected = sum(math.ceil(m.out_features / 5) * m.in_features + 4 for _, m in bitnet.bit_linears(model))
    assert packed["linear"] == expected

    reference = copy.deepcopy(model)
    for name, p in reference.named_parameters():  # kept tensors were stored in bf16
        if not (name.endswith(".weight") and name[:-7] in report.converted):
            p.data = p.data.bfloat16().float()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "base3")(input_ids=ids).logits, reference(input_ids=ids).logits)


# --------------------------------------------------------------------------------- training sanity

P = 17  # modular addition a + b mod 17: 289 facts, memorised by a 32-wide 2-layer Llama


def _mod_add() -> tuple[torch.Tensor, torch.Tensor]:
    a, b = (t.flatten() for t in torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij"))
    ids = torch.stack([a, b, torch.full_like(a, P), (a + b) % P], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return ids, labels


def _accuracy(model, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(input_ids=ids[:, :-1]).logits[:, -1].argmax(-1) == ids[:, -1]).float().mean())


def _fit(model, ids, labels, steps: int, lr: float, warmup: int | None = None, params=None) -> None:
    params = list(model.parameters()) if params is None else params
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        if warmup is not None:
            set_quant_strength(model, quant_strength_at(step, warmup))
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if warmup is not None:
        set_quant_strength(model, 1.0)


def test_a_tiny_model_fine_tuned_to_ternary_keeps_its_accuracy():
    """Modular addition memorised by a 2-layer, 32-wide Llama, then QAT of the latent ternary weights only.

    Only the BitLinear latent weights train here (the phase trains everything): embeddings, norm gains and
    the head could otherwise relearn the task around ternary layers that never changed, and the test would
    pass with a broken STE (it did, in a deliberate-breakage check).
    Pilot, seeds 0-4: fp accuracy 1.00 after 200 steps; ternary without fine-tuning 0.26-0.54; after 100
    QAT steps (warm-up 25) 1.00 for every seed; with the weight STE's gradient zeroed 0.72 / 0.53 (seeds
    0 / 1; only the warm-up's (1 - lambda) share trains). Required: QAT keeps >= 95% of the fp accuracy
    and gains >= 0.3 over the untrained ternary model."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=P + 1, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                                         max_position_embeddings=8))
    ids, labels = _mod_add()
    _fit(model, ids, labels, steps=200, lr=3e-3)
    fp = _accuracy(model, ids)
    assert fp >= 0.95, f"the full-precision pilot model did not learn the task ({fp})"

    convert_to_bitnet(model, act_norm="rms")
    calibrate_act_norms(model, ids)
    no_ft = _accuracy(model, ids)
    latent = [m.weight for _, m in bitnet.bit_linears(model)]
    _fit(model, ids, labels, steps=100, lr=2e-3, warmup=25, params=latent)
    ternary = _accuracy(model, ids)
    assert ternary >= 0.95 * fp, (fp, no_ft, ternary)
    assert ternary - no_ft >= 0.3, (fp, no_ft, ternary)


# -------------------------------------------------------------------------------------------- phase


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    corpus = build_corpus(DataConfig(seed=1, synthetic=SyntheticConfig(n_examples=400), validation_percent=10))
    return corpus, train_bpe([ex.text for ex in corpus.train], 400)


EVAL = EvalConfig(max_examples=3, ppl_max_tokens=512, max_new_tokens=6, batch_size=8, seq_len=64)


def phase_config(**overrides) -> BitNetConfig:
    fields = dict(steps=10, warmup_steps=4, lr=1e-3, batch_size=4, seq_len=32, checkpoint_every=4)  # default gates
    fields.update(overrides)
    return BitNetConfig(**fields)


def run_phase(corpus_and_tokenizer, cfg: BitNetConfig, model=None, export_dir=None, **ctx_fields):
    corpus, tokenizer = corpus_and_tokenizer
    model = model if model is not None else tiny_cognate(vocab=len(tokenizer))
    ctx = PhaseContext(seed=ctx_fields.pop("seed", 0), precision="fp32", **ctx_fields)
    return bitnet.run(BitNetInputs(model, tokenizer, corpus, EVAL, export_dir=export_dir), cfg, ctx)


def test_phase_converts_fine_tunes_exports_and_measures_sizes_from_the_files(corpus_and_tokenizer, tmp_path):
    _, tokenizer = corpus_and_tokenizer
    source = tiny_cognate(vocab=len(tokenizer))
    original = {k: v.clone() for k, v in source.state_dict().items()}
    tracker = RecordingTracker()
    out = run_phase(corpus_and_tokenizer, phase_config(), model=source, export_dir=tmp_path / "export",
                    tracker=tracker)

    assert all(torch.equal(original[k], v) for k, v in source.state_dict().items())  # input untouched
    model = out.models["model"]
    layers = bitnet.bit_linears(model)
    assert len(layers) == 14 and all(m.quant_strength == 1.0 for _, m in layers)
    assert out.details["conversion"]["kept_linear"] == ["model.halt", "lm_head"]
    assert out.details["steps_run"] == 10
    assert out.curves["qat/lambda"] == [(s + 1, min(s / 4, 1.0)) for s in range(10)]
    assert [s for s, _ in tracker.series("qat/loss")] == list(range(1, 11))
    for name in ("input", "ternary_no_ft", "bitnet"):
        assert math.isfinite(out.metrics[f"{name}/loss"])
    assert set(out.evaluations["after"]) == {"ternary_no_ft", "bitnet"}

    # Sizes are those of the written files: check them against the folder and the packing arithmetic.
    folder = tmp_path / "export"
    assert {"model.safetensors", "config.json", "bitnet.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    size = out.details["size"]
    on_disk = safetensors_bytes(folder / "model.safetensors", out.details["conversion"]["converted"])
    assert size["ternary_linear"] == on_disk["linear"] == sum(
        math.ceil(m.out_features / 4) * m.in_features + 4 for _, m in layers)
    assert size["weights_file"] == (folder / "model.safetensors").stat().st_size
    assert size["folder_total"] == sum(p.stat().st_size for p in folder.iterdir())
    assert 7.5 < size["linear_ratio_vs_bf16"] <= 8.0
    assert size["bits_per_ternary_weight"] == pytest.approx(2.0)
    assert out.metrics["export/max_rel_logit_diff"] == 0.0

    # The stored folder evaluates like the returned model.
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        assert torch.equal(load_packed(folder)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_after_interruption_gives_bit_identical_weights(corpus_and_tokenizer, tmp_path):
    _, tokenizer = corpus_and_tokenizer
    source = tiny_llama(vocab=len(tokenizer), hidden=32, inter=64)
    cfg = phase_config(steps=10, warmup_steps=4, checkpoint_every=3)
    reference = run_phase(corpus_and_tokenizer, cfg, model=source, checkpoint_dir=tmp_path / "reference")

    folder = tmp_path / "resumed"
    saved: list[Path] = []
    with pytest.raises(Interrupted):
        run_phase(corpus_and_tokenizer, cfg, model=source, checkpoint_dir=folder, tracker=StopAt(8),
                  on_checkpoint=saved.append)
    assert [p.name for p in saved] == ["step-000003", "step-000006"]
    assert [p.name for p in (folder / "qat").iterdir()] == ["step-000006"]
    assert {p.name for p in (folder / "qat" / "step-000006").iterdir()} == {
        "model.safetensors", "optimizer.pt", "state.json", "COMPLETE"}

    resumed = run_phase(corpus_and_tokenizer, cfg, model=source, checkpoint_dir=folder)
    assert resumed.details["steps_run"] == 4 and resumed.details["resumed_from"] == 6
    ref_state, new_state = reference.models["model"].state_dict(), resumed.models["model"].state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    assert resumed.curves["qat/loss"] == reference.curves["qat/loss"]

    again = run_phase(corpus_and_tokenizer, cfg, model=source, checkpoint_dir=folder)
    assert again.details["steps_run"] == 0 and again.metrics["bitnet/loss"] == resumed.metrics["bitnet/loss"]

    other = tiny_llama(seed=1, vocab=len(tokenizer), hidden=32, inter=64)  # another input model
    with pytest.raises(ConfigError, match="Clear the checkpoint folder"):
        run_phase(corpus_and_tokenizer, cfg, model=other, checkpoint_dir=folder)


def test_nan_loss_raises_training_diverged(corpus_and_tokenizer, monkeypatch):
    poison_loss(monkeypatch, at_call=3)
    with pytest.raises(TrainingDiverged, match="step 3"):
        run_phase(corpus_and_tokenizer, phase_config())


def test_quality_gate_fails_a_model_that_lost_too_much(corpus_and_tokenizer):
    # lr 1.0 for two fully quantised steps wrecks the model (Adam moves every weight by ~1).
    cfg = phase_config(steps=2, warmup_steps=0, lr=1.0, max_loss_increase=0.5)
    with pytest.raises(QualityGateFailed, match="max_loss_increase is 0.5"):
        run_phase(corpus_and_tokenizer, cfg)


def test_gain_gate_uses_the_input_gain_over_unigram():
    from forge_models.bitnet.phase import _gain_gate

    # The tiny-preset pilot: unigram 4.647, merged input 0.859; ternary without fine-tuning 1.954, after QAT 0.832.
    with pytest.raises(QualityGateFailed, match="keeps 71.1% of the input's gain"):
        _gain_gate({"loss": 0.859}, {"loss": 1.954}, 4.647, 0.9)
    _gain_gate({"loss": 0.859}, {"loss": 0.832}, 4.647, 0.9)
    _gain_gate({"loss": 0.859}, {"loss": 1.2}, 4.647, 0.9)  # keeps 91%
    # An input without gain over unigram (untrained) must simply not get worse.
    _gain_gate({"loss": 6.0}, {"loss": 5.9}, 4.6, 0.9)
    with pytest.raises(QualityGateFailed):
        _gain_gate({"loss": 6.0}, {"loss": 6.01}, 4.6, 0.9)


@pytest.fixture(scope="module")
def trained_input(corpus_and_tokenizer):
    """A tiny Cognate model trained on the corpus until it clearly beats the unigram baseline."""
    corpus, tokenizer = corpus_and_tokenizer
    model = tiny_cognate(vocab=len(tokenizer))
    sampler = TokenSampler(corpus.train, tokenizer, {"arithmetic": 1, "tool": 1, "persona": 1, "narrative": 1},
                           seq_len=32, batch_size=16, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(150):
        model(input_ids=sampler.batch(step), labels=sampler.labels(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_quality_gate_fails_a_ternary_model_that_was_not_fine_tuned(corpus_and_tokenizer, trained_input):
    """The phase must make the model usable, not merely run: ternarising without fine-tuning fails the gate."""
    corpus, tokenizer = corpus_and_tokenizer
    held = corpus.validation
    before = evaluate(trained_input, tokenizer, held, EVAL, PhaseContext(precision="fp32"))["loss"]
    unigram = unigram_loss(corpus.train, held, tokenizer, EVAL.ppl_max_tokens)
    assert unigram - before > 1.0, (unigram, before)  # the input has a real gain to keep
    barely = phase_config(steps=2, warmup_steps=1, lr=1e-7)
    with pytest.raises(QualityGateFailed, match="min_gain_kept is 90%"):
        run_phase(corpus_and_tokenizer, barely, model=trained_input)


def test_config_rejects_contradictions_before_any_work():
    with pytest.raises(ValidationError, match="must be < steps"):
        BitNetConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValidationError, match="regular expression"):
        BitNetConfig(keep_patterns=["[unclosed"])
    with pytest.raises(ValidationError, match="unknown data kinds"):
        BitNetConfig(data_mix={"poetry": 1.0})
    with pytest.raises(ValidationError):
        BitNetConfig(packing="1bit")
    with pytest.raises(ValidationError):
        BitNetConfig(extra_field=1)
    assert all(f.description for f in BitNetConfig.model_fields.values())


def test_latent_weights_round_trip_so_training_can_continue(tmp_path):
    from forge_models.bitnet import load_latent, save_latent
    from tasks.inputs import load_input_model

    model = tiny_cognate(seed=3)
    convert_to_bitnet(model, keep_patterns=["lm_head", "halt"], act_norm="rms")
    calibrate_act_norms(model, torch.randint(0, 97, (2, 16)))
    export_packed(model, tmp_path / "packed")
    save_latent(model, tmp_path / "packed" / "latent", keep_patterns=["lm_head", "halt"], act_norm="rms")
    again = load_latent(tmp_path / "packed" / "latent")
    want, got = model.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # latent, not ternary
    assert len(bitnet.bit_linears(again)) == len(bitnet.bit_linears(model))
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    loaded, meta = load_input_model(tmp_path / "packed")  # what the training phase does with a BitNet input
    assert meta["act_norm"] == "rms" and bitnet.bit_linears(loaded)
    # a packed folder without its latent weights cannot be trained: clear error, no silent fallback
    import shutil

    shutil.rmtree(tmp_path / "packed" / "latent")
    with pytest.raises(ArtifactIntegrityError, match="without its latent weights"):
        load_input_model(tmp_path / "packed")
