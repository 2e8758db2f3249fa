"""Merge operators (forge_models.merge): golden values, identities, recipes, streaming merges of tiny HF
models, DFS routing, and a measured memory cap. Tiny models, CPU, seconds."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import forge_models  # noqa: F401  (registers "cognate" with the Auto classes)
from forge_models.cognate.model import CognateForCausalLM
from forge_models.merge import (
    MergeRecipe,
    build_dfs_model,
    dfs_route,
    evaluate_setting,
    get_method,
    load_recipe,
    merge_models,
    merge_tensors,
    tensor_generators,
    tensor_seed,
)
from forge_models.merge import sparsify
from forge_models.merge.safetensors_io import read_model_index
from forge_models.runtime import ConfigError
from tests.factories import make_cognate, make_llama, save_tokenizer

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ helpers

D1 = torch.tensor([1.0, -2.0, 0.5, 0.0])
D2 = torch.tensor([3.0, 1.0, -0.5, 0.2])
D3 = torch.tensor([-1.0, 1.5, 0.1, -0.3])


def weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (single file or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def recipe(text: str, **paths: Path) -> MergeRecipe:
    return MergeRecipe.from_yaml(textwrap.dedent(text).format(**{k: str(v) for k, v in paths.items()}))


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamas")
    return {f"m{i}": make_llama(root / f"m{i}", seed=i) for i in range(3)}


# ------------------------------------------------------------------------------- golden: TIES & co


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"weight": 1.0}, [2.0, 1.25, 0.3, -0.3]),
        ({"weight": 1.0, "density": 0.5}, [2.0, 1.25, 0.0, 0.0]),
        ({"weight": [1.0, 0.5, 1.0]}, [5 / 3, 4 / 3, 0.3, -0.3]),
    ],
)
def test_ties_golden_values(params, expected):
    base = torch.full((4,), 0.25)  # a non-zero base: task vectors must be taken against it
    out = merge_tensors("ties", [base + D1, base + D2, base + D3], base, **params)
    torch.testing.assert_close(out - base, torch.tensor(expected), rtol=0, atol=1e-6)


def test_task_arithmetic_golden_and_lambda():
    base = torch.full((4,), -1.0)
    out = merge_tensors("task_arithmetic", [base + D1, base + D2, base + D3], base, weight=1.0)
    torch.testing.assert_close(out - base, torch.tensor([3.0, 0.5, 0.1, -0.1]), rtol=0, atol=1e-6)
    half = merge_tensors("task_arithmetic", [base + D1, base + D2, base + D3], base, weight=1.0, **{"lambda": 0.5})
    torch.testing.assert_close(half - base, torch.tensor([1.5, 0.25, 0.05, -0.05]), rtol=0, atol=1e-6)


def test_ties_count_consensus_uses_majority_of_signs():
    # sum election would pick + for entry 0 (3 - 1 - 1 = 1); two of three signs are negative.
    deltas = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    base = torch.zeros(1)
    summed = get_method("ties").fn(deltas, base, weight=[1.0] * 3, density=[1.0] * 3, normalize=True)
    from forge_models.merge.methods import generalized_task_arithmetic

    counted = generalized_task_arithmetic(deltas, base, weight=[1.0] * 3, density=[1.0] * 3,
                                          sparsification="magnitude", consensus="count", normalize=True)
    assert summed.item() == 3.0 and counted.item() == -1.0


def test_linear_weighted_average():
    out = merge_tensors("linear", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])], weight=[3.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([0.75, 1.0]))
    plain = merge_tensors("linear", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])], weight=[3.0, 1.0], normalize=False)
    torch.testing.assert_close(plain, torch.tensor([3.0, 4.0]))


# ------------------------------------------------------------------------------------------ SLERP


def test_slerp_endpoints_are_bit_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    assert torch.equal(merge_tensors("slerp", [b], a, t=0.0), a)
    assert torch.equal(merge_tensors("slerp", [b], a, t=1.0), b)


def test_slerp_orthogonal_and_colinear():
    out = merge_tensors("slerp", [torch.tensor([0.0, 1.0])], torch.tensor([1.0, 0.0]), t=0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), rtol=0, atol=1e-6)
    assert abs(out.norm().item() - 1.0) < 1e-6  # lerp would give norm 0.707
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = 2.0 * v0 + torch.tensor([1e-4, 0.0, 0.0])  # |cos| > 0.9995: falls back to lerp
    torch.testing.assert_close(merge_tensors("slerp", [v1], v0, t=0.25), 0.75 * v0 + 0.25 * v1)


# ------------------------------------------------------------------------------------- Model Stock


@pytest.mark.parametrize(("delta2", "t_expected"), [((0.0, 1.0), 0.0), ((0.5, math.sqrt(0.75)), 2 / 3), ((1.0, 0.0), 1.0)])
def test_model_stock_ratio_for_cos_0_half_1(delta2, t_expected):
    base = torch.tensor([0.5, -0.5])
    m1 = base + torch.tensor([1.0, 0.0])
    m2 = base + torch.tensor(delta2)
    out = merge_tensors("model_stock", [m1, m2], base)
    expected = t_expected * (m1 + m2) / 2 + (1 - t_expected) * base
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- DARE


def test_dare_keep_rate_within_binomial_bounds_and_paper_rescale():
    n, density = 100_000, 0.3
    delta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    out = sparsify.bernoulli(delta, density, torch.Generator().manual_seed(7), "inverse")
    kept = out != 0
    sd = math.sqrt(n * density * (1 - density))
    assert abs(int(kept.sum()) - n * density) < 5 * sd
    # The paper's rescale: every kept entry is delta / (1 - p) = delta / density, exactly.
    torch.testing.assert_close(out[kept], delta[kept] / density, rtol=1e-6, atol=0)


def test_dare_rescale_is_unbiased_over_seeds_and_mergekit_l1_matches_norm():
    delta = torch.rand(1000, generator=torch.Generator().manual_seed(2)) + 0.1
    density = 0.3
    ratios = [float(sparsify.bernoulli(delta, density, torch.Generator().manual_seed(s), "inverse").sum() / delta.sum())
              for s in range(200)]
    assert abs(sum(ratios) / len(ratios) - 1.0) < 0.02  # E[out] = delta; a wrong factor (e.g. x2) is far off
    l1 = sparsify.bernoulli(delta, density, torch.Generator().manual_seed(0), "l1")
    torch.testing.assert_close(l1.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


def test_dare_is_seeded_and_merges_task_vectors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(32, 32, generator=g)
    models = [base + 0.01 * torch.randn(32, 32, generator=g) for _ in range(2)]
    a = merge_tensors("dare_ties", models, base, weight=1.0, density=0.5, seed=11)
    b = merge_tensors("dare_ties", models, base, weight=1.0, density=0.5, seed=11)
    c = merge_tensors("dare_ties", models, base, weight=1.0, density=0.5, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Through the registry, dare's default rescale is the paper's: kept deltas are delta / density exactly.
    one = merge_tensors("dare_linear", [models[0]], base, weight=1.0, density=0.25, seed=5)
    delta = models[0] - base
    kept = one != base
    assert 0.15 < kept.float().mean().item() < 0.35
    torch.testing.assert_close((one - base)[kept], delta[kept] / 0.25, rtol=1e-4, atol=1e-6)
    # Per-tensor seeds are stable (part of the reproducibility contract) and differ between tensors and seeds.
    assert tensor_seed(0, "model.layers.0.self_attn.q_proj.weight") == 2029460002771584163
    names = [f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight")]
    seeds = {tensor_seed(s, n, i) for n in names for s in (0, 1) for i in (0, 1)}
    assert len(seeds) == 4 * len(names)  # 2 seeds x 2 input models per tensor, all distinct
    # Without consensus and with density 1, DARE is plain task arithmetic.
    torch.testing.assert_close(merge_tensors("dare_linear", models, base, weight=1.0, density=1.0, seed=0),
                               merge_tensors("task_arithmetic", models, base, weight=1.0))


# ------------------------------------------------------------------------------ breadcrumbs, DELLA


@pytest.mark.parametrize(("numel", "density", "gamma"), [(1000, 0.3, 0.05), (64, 0.3, 0.01), (100, 0.9, 0.2)])
def test_breadcrumbs_exact_density(numel, density, gamma):
    delta = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    out = sparsify.magnitude_outliers(delta, density, gamma)
    assert int((out != 0).sum()) == int(density * numel)
    n_top = min(int(gamma * numel), numel - int(density * numel))
    if n_top:
        largest = torch.topk(delta.abs(), n_top).indices
        assert bool((out[largest] == 0).all())  # the largest outliers are the ones dropped


def test_della_keep_probability_follows_magnitude_rank():
    delta = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    out = sparsify.della_magprune(delta, 0.5, 0.2, torch.Generator().manual_seed(5), "inverse")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    order = delta.abs().argsort(dim=1)
    low = kept.gather(1, order[:, :128]).float().mean().item()  # keep prob ~0.3 .. 0.4
    high = kept.gather(1, order[:, -128:]).float().mean().item()  # keep prob ~0.6 .. 0.7
    assert 0.3 < low < 0.4 and 0.6 < high < 0.7
    # Each kept entry is divided by its own keep probability (DELLA's rescale).
    rank = order.argsort(dim=1).float() / 511
    prob = 0.3 + 0.4 * rank
    torch.testing.assert_close(out[kept], (delta / prob)[kept], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- identities


def test_merging_a_tensor_with_itself_returns_it():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(merge_tensors("linear", [x, x], weight=[1.0, 1.0]), x)
    torch.testing.assert_close(merge_tensors("linear", [x, x], weight=[0.3, 0.7]), x, rtol=1e-6, atol=0)
    torch.testing.assert_close(merge_tensors("slerp", [x], x, t=0.3), x, rtol=1e-6, atol=0)
    assert torch.equal(merge_tensors("ties", [x, x], x, weight=1.0), x)
    y = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(merge_tensors("task_arithmetic", [y], x, weight=1.0), y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- recipe


def test_recipe_gradients_filters_and_yaml_round_trip(tmp_path):
    r = MergeRecipe.from_yaml("""
        merge_method: slerp
        base_model: a
        models: [{model: a}, {model: b}]
        parameters:
          t:
            - {filter: self_attn, value: [0.0, 0.5, 1.0]}
            - {filter: mlp, value: [1.0, 0.0]}
            - {value: 0.25}
        dtype: bf16
    """)
    t = r.parameters["t"]
    assert evaluate_setting(t, "model.layers.3.self_attn.q_proj.weight", 0.75) == pytest.approx(0.75)
    assert evaluate_setting(t, "model.layers.3.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(t, "model.layers.0.mlp.up_proj.weight", 0.25) == pytest.approx(0.75)
    assert evaluate_setting(t, "model.norm.weight", 0.0) == 0.25
    assert r.dtype == "bfloat16"
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(path) == r


def test_parameter_lookup_prefers_model_then_slice_then_global(llamas):
    from forge_models.merge import build_plan

    plan = build_plan(recipe("""
        merge_method: ties
        base_model: {m0}
        slices:
          - sources:
              - {{model: {m0}, layer_range: [0, 2]}}
              - {{model: {m1}, layer_range: [0, 2], parameters: {{weight: 0.9}}}}
              - {{model: {m2}, layer_range: [0, 2]}}
            parameters: {{density: 0.6, normalize: false}}
        parameters: {{weight: 0.1, density: 0.2, normalize: true, lambda: 0.5}}
    """, **llamas))
    q = next(t for t in plan.tensors if t.name == "model.layers.1.self_attn.q_proj.weight")
    assert [m["weight"] for m in q.per_model] == [0.9, 0.1]  # model scope, then top level
    assert [m["density"] for m in q.per_model] == [0.6, 0.6]  # slice scope beats top level
    assert q.values["normalize"] is False and q.values["lambda"] == 0.5
    assert q.base.source == str(llamas["m0"]) and [i.source for i in q.inputs] == [str(llamas["m1"]), str(llamas["m2"])]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("merge_method: tiez\nmodels: [{model: a}]", "unknown merge method"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "needs base_model"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {wieght: 1}}]", "'wieght' is not a parameter"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: c}]", "exactly 1"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union", "union"),
        ("merge_method: linear\nmodules: {}\nmodels: [{model: a}]", "modules"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: int4", "dtype"),
        ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]}]",
         "exactly one source"),
        ("merge_method: linear\nbase_model: z\nmodels: [{model: a}]", "takes no base model"),
        ("merge_method: dfs\nmodels: [{model: a}]\nparameters: {repeats: 1}", "indicator"),
    ],
)
def test_bad_recipes_fail_with_a_clear_config_error(text, needle):
    with pytest.raises(ConfigError, match=needle):
        MergeRecipe.from_yaml(text)


def test_plan_time_errors_name_the_problem_and_write_nothing(tmp_path, llamas):
    out = tmp_path / "out"
    cases = [
        # missing required per-model weight
        ("merge_method: ties\nbase_model: {m0}\nmodels: [{{model: {m1}}}, {{model: {m2}, parameters: {{weight: 1}}}}]",
         "needs 'weight'"),
        # density outside (0, 1], through a filter that only hits some tensors
        ("merge_method: ties\nbase_model: {m0}\nmodels: [{{model: {m1}, parameters: {{weight: 1, "
         "density: [{{filter: mlp, value: 1.5}}, {{value: 0.5}}]}}}}]", "model.layers.0.mlp.*density .* must be in"),
        ("merge_method: della\nbase_model: {m0}\nmodels: [{{model: {m1}, parameters: {{weight: 1, density: 0.9}}}}]",
         "DELLA needs"),
        ("merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}, {{model: {m2}, parameters: {{weight: -1}}}}]",
         "sum to 0"),
        ("merge_method: passthrough\nslices: [{{sources: [{{model: {m1}, layer_range: [0, 3]}}]}}]", "exceeds its 2 layers"),
        ("merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}, {{model: /nonexistent/x, parameters: {{weight: 1}}}}]",
         "does not exist"),
    ]
    for text, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            merge_models(recipe(text, **llamas), out)
        assert not out.exists()


def test_mismatched_models_are_refused_before_any_work(tmp_path, llamas):
    other_vocab = make_llama(tmp_path / "v80", seed=5, vocab_size=80)
    other_heads = make_llama(tmp_path / "h8", seed=5, num_attention_heads=8, num_key_value_heads=8)
    other_width = make_llama(tmp_path / "i96", seed=5, intermediate_size=96)
    deeper = make_llama(tmp_path / "l3", seed=5, num_hidden_layers=3)
    cognate = make_cognate(tmp_path / "cog", seed=5)
    other_tok = make_llama(tmp_path / "tok", seed=5, tokenizer=False)
    save_tokenizer(other_tok, 64)
    tj = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["t1"], vocab["t2"] = vocab["t2"], vocab["t1"]
    (other_tok / "tokenizer.json").write_text(json.dumps(tj))
    pickled = tmp_path / "pickle"
    pickled.mkdir()
    shutil.copy(llamas["m1"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    compressed = tmp_path / "compressed"  # phase 8's folder: its index lists only the plain tensors
    shutil.copytree(llamas["m1"], compressed)
    (compressed / "recipe.json").write_text("{}")

    text = "merge_method: ties\nbase_model: {a}\nmodels: [{{model: {b}, parameters: {{weight: 1}}}}]"
    for other, needle in [
        (other_vocab, r"vocab"),
        (other_heads, r"num_attention_heads"),
        (other_width, r"intermediate_size"),
        (deeper, r"different layer counts"),
        (cognate, r"architectures"),
        (other_tok, r"vocabularies differ: token 't1'"),
        (pickled, r"pickled weights"),
        (compressed, r"compressed artifact"),
    ]:
        out = tmp_path / f"out-{other.name}"
        with pytest.raises(ConfigError, match=needle):
            merge_models(recipe(text, a=llamas["m0"], b=other), out)
        assert not out.exists()


def test_output_folder_rules(tmp_path, llamas):
    text = "merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}, {{model: {m2}, parameters: {{weight: 1}}}}]"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        merge_models(recipe(text, **llamas), busy)
    with pytest.raises(ConfigError, match="holds no model"):
        merge_models(recipe(text, **llamas), busy, overwrite=True)
    assert (busy / "notes.txt").exists()
    with pytest.raises(ConfigError, match="overlaps"):
        merge_models(recipe(text, **llamas), llamas["m1"] / "sub")
    out = tmp_path / "out"
    merge_models(recipe(text, **llamas), out)
    merge_models(recipe(text, **llamas), out, overwrite=True)


# ------------------------------------------------------------------------------- streaming, end to end

# Per method: recipe text and the hand-resolved per-tensor parameters for 2-layer models (t = 0 at layer
# 0 and for non-layer tensors, t = 1 at layer 1), written out independently of the recipe resolver.
W1 = "[1.0, 0.5]"
W2 = "[{{filter: self_attn, value: 0.3}}, {{value: 0.7}}]"


def w1(name):
    return 0.5 if layer_of(name) == 1 else 1.0


def w2(name):
    return 0.3 if "self_attn" in name else 0.7


E2E = {
    "linear": (
        f"models: [{{{{model: {{m0}}, parameters: {{{{weight: 2.0}}}}}}}}, {{{{model: {{m1}}, parameters: {{{{weight: {W1}}}}}}}}},"
        f" {{{{model: {{m2}}, parameters: {{{{weight: {W2}}}}}}}}}]",
        lambda n: dict(weight=[2.0, w1(n), w2(n)]),
    ),
    "task_arithmetic": (
        f"base_model: {{m0}}\nmodels: [{{{{model: {{m1}}, parameters: {{{{weight: {W1}}}}}}}}}, {{{{model: {{m2}}, parameters: {{{{weight: {W2}}}}}}}}}]\n"
        "parameters: {{lambda: 0.8}}",
        lambda n: {"weight": [w1(n), w2(n)], "lambda": 0.8},
    ),
    "ties": (
        f"base_model: {{m0}}\nmodels: [{{{{model: {{m1}}, parameters: {{{{weight: {W1}, density: 0.5}}}}}}}},"
        f" {{{{model: {{m2}}, parameters: {{{{weight: {W2}, density: [0.9, 0.5]}}}}}}}}]",
        lambda n: dict(weight=[w1(n), w2(n)], density=[0.5, 0.5 if layer_of(n) == 1 else 0.9]),
    ),
    "dare_linear": (
        f"base_model: {{m0}}\nmodels: [{{{{model: {{m1}}, parameters: {{{{weight: {W1}, density: 0.5}}}}}}}},"
        f" {{{{model: {{m2}}, parameters: {{{{weight: {W2}, density: 0.7}}}}}}}}]",
        lambda n: dict(weight=[w1(n), w2(n)], density=[0.5, 0.7]),
    ),
    "dare_ties": (
        f"base_model: {{m0}}\nmodels: [{{{{model: {{m1}}, parameters: {{{{weight: {W1}, density: 0.5}}}}}}}},"
        f" {{{{model: {{m2}}, parameters: {{{{weight: {W2}, density: 0.7}}}}}}}}]\nparameters: {{{{rescale_norm: l1}}}}",
        lambda n: dict(weight=[w1(n), w2(n)], density=[0.5, 0.7], rescale_norm="l1"),
    ),
    "breadcrumbs": (
        f"base_model: {{m0}}\nmodels: [{{{{model: {{m1}}, parameters: {{{{weight: {W1}, density: 0.8, gamma: 0.05}}}}}}}},"
        f" {{{{model: {{m2}}, parameters: {{{{weight: {W2}, density: 0.8, gamma: 0.05}}}}}}}}]",
        lambda n: dict(weight=[w1(n), w2(n)], density=0.8, gamma=0.05),
    ),
    "della": (
        f"base_model: {{m0}}\nmodels: [{{{{model: {{m1}}, parameters: {{{{weight: {W1}, density: 0.5, epsilon: 0.1}}}}}}}},"
        f" {{{{model: {{m2}}, parameters: {{{{weight: {W2}, density: 0.5, epsilon: 0.1}}}}}}}}]",
        lambda n: dict(weight=[w1(n), w2(n)], density=0.5, epsilon=0.1),
    ),
    "model_stock": ("base_model: {m0}\nmodels: [{{model: {m1}}}, {{model: {m2}}}]", lambda n: {}),
    "slerp": (
        "base_model: {m0}\nmodels: [{{model: {m1}}}]\nparameters: {{t: [{{filter: self_attn, value: [0.2, 0.8]}}, {{value: 0.5}}]}}",
        lambda n: dict(t=(0.8 if layer_of(n) == 1 else 0.2) if "self_attn" in n else 0.5),
    ),
}


@pytest.mark.parametrize("chunk_bytes", [1024, 2**30], ids=["chunked", "whole"])
@pytest.mark.parametrize("method", sorted(E2E))
def test_streaming_merge_of_tiny_llamas_equals_per_tensor_functions(tmp_path, llamas, method, chunk_bytes):
    body, params = E2E[method]
    r = recipe(f"merge_method: {method}\n" + body, **llamas)
    out = tmp_path / "merged"
    # 1 KiB chunks split every 2-D tensor (the 64 x 32 embedding into 8 chunks); the results must not change.
    result = merge_models(r, out, seed=3, chunk_bytes=chunk_bytes)

    assert set(result.files) == {"config.json", "mergekit_config.yml", "model-00001-of-00001.safetensors",
                                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}
    src = {k: weights(p) for k, p in llamas.items()}
    merged = weights(out)
    assert set(merged) == set(src["m0"])
    spec = get_method(method)
    for name, tensor in merged.items():
        if spec.base == "required":
            others = ["m1"] if method == "slerp" else ["m1", "m2"]
            base = src["m0"][name]
        else:
            others, base = ["m0", "m1", "m2"], None
        generators = tensor_generators(3, name, len(others)) if spec.random else None
        expected = merge_tensors(method, [src[k][name] for k in others], base, generator=generators, **params(name))
        if method in ("slerp", "model_stock") and chunk_bytes < tensor.numel() * 4:
            # Chunks sum norms and dot products in another order (float64): last-bit differences.
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(tensor, expected), f"{method}: {name} differs from the per-tensor function"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    assert AutoTokenizer.from_pretrained(out)("t3 t5")["input_ids"] == [3, 5]


def test_streaming_merge_of_a_model_with_itself_returns_it(tmp_path, llamas):
    twin = tmp_path / "twin"
    shutil.copytree(llamas["m1"], twin)
    cases = {
        "linear": "models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]",
        "slerp": "base_model: {a}\nmodels: [{{model: {b}}}]\nparameters: {{t: 0.5}}",
        "ties": "base_model: {a}\nmodels: [{{model: {b}, parameters: {{weight: 1}}}}]",
    }
    original = weights(llamas["m1"])
    for method, body in cases.items():
        out = tmp_path / method
        merge_models(recipe(f"merge_method: {method}\n" + body, a=llamas["m1"], b=twin), out)
        merged = weights(out)
        assert merged.keys() == original.keys()
        assert all(torch.equal(merged[k], original[k]) for k in original), method
    # Task arithmetic with one model and weight 1 returns that model (up to float rounding of b + (a - b)).
    out = tmp_path / "ta"
    merge_models(recipe("merge_method: task_arithmetic\nbase_model: {b}\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]",
                        a=llamas["m2"], b=llamas["m0"]), out)
    merged, m2 = weights(out), weights(llamas["m2"])
    for k in m2:
        torch.testing.assert_close(merged[k], m2[k], rtol=0, atol=1e-6)


def test_dtype_seed_and_shards(tmp_path, llamas):
    text = ("merge_method: dare_ties\nbase_model: {m0}\nmodels: [{{model: {m1}, parameters: {{weight: 1, density: 0.5}}}},"
            " {{model: {m2}, parameters: {{weight: 1, density: 0.5}}}}]\ndtype: bfloat16\nout_dtype: float16")
    a = merge_models(recipe(text, **llamas), tmp_path / "a", seed=1, max_shard_bytes=8000)
    b = merge_models(recipe(text, **llamas), tmp_path / "b", seed=1)
    c = merge_models(recipe(text, **llamas), tmp_path / "c", seed=2)
    wa, wb, wc = weights(a.out_dir), weights(b.out_dir), weights(c.out_dir)
    assert all(t.dtype == torch.float16 for t in wa.values())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, different sharding: same tensors
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    index = json.loads((a.out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and set(index["weight_map"]) == set(wa)
    assert json.loads((a.out_dir / "config.json").read_text())["dtype"] == "float16"
    model = AutoModelForCausalLM.from_pretrained(a.out_dir, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2]])).logits).all()
    # bf16 input rounding happened: merging in fp32 without `dtype` gives different bits somewhere.
    d = merge_models(recipe(text.replace("dtype: bfloat16\n", ""), **llamas), tmp_path / "d", seed=1)
    assert any(not torch.equal(wa[k], weights(d.out_dir)[k]) for k in wa)


def test_command_line_entry_point(tmp_path, llamas, capsys):
    from forge_models.merge.__main__ import main

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe("merge_method: slerp\nbase_model: {m0}\nmodels: [{{model: {m1}}}]\nparameters: {{t: 0.5}}",
                           **llamas).to_yaml())
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "slerp" and report["tensors"] == 21 and report["layers"] == 2
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2  # not empty: refused, exit 2
    assert "not empty" in capsys.readouterr().err


def test_failed_merge_leaves_no_index(tmp_path, llamas, monkeypatch):
    from forge_models.merge import streaming

    calls = {"n": 0}
    real = streaming.merge_tensor_into

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "merge_tensor_into", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        merge_models(recipe("merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}]", **llamas), out)
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.safetensors*"))


# ------------------------------------------------------------------------------------ tied embeddings


def test_cognate_tied_models_merge_and_load(tmp_path):
    paths = [make_cognate(tmp_path / f"c{i}", seed=10 + i) for i in range(3)]
    assert "lm_head.weight" not in read_model_index(paths[0])  # tied: the checkpoint omits the head
    out = tmp_path / "merged"
    merge_models(recipe("merge_method: ties\nbase_model: {a}\nmodels: [{{model: {b}, parameters: {{weight: 1, density: 0.5}}}},"
                        " {{model: {c}, parameters: {{weight: 1, density: 0.5}}}}]", a=paths[0], b=paths[1], c=paths[2]), out)
    merged = weights(out)
    assert "lm_head.weight" not in merged and "model.halt.weight" in merged
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["model_type"] == "cognate" and cfg["num_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, CognateForCausalLM)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, merged["model.embed_tokens.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tied_and_untied_sources_write_a_merged_untied_head(tmp_path):
    tied = make_llama(tmp_path / "tied", seed=20, tie_word_embeddings=True)
    untied = make_llama(tmp_path / "untied", seed=21)
    assert "lm_head.weight" not in read_model_index(tied)
    out = tmp_path / "merged"
    merge_models(recipe("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}, "
                        "{{model: {b}, parameters: {{weight: 3}}}}]", a=tied, b=untied), out)
    a, b, merged = weights(tied), weights(untied), weights(out)
    expected = (a["model.embed_tokens.weight"] + 3 * b["lm_head.weight"]) / 4
    torch.testing.assert_close(merged["lm_head.weight"], expected)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, merged["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# --------------------------------------------------------------------------- passthrough (frankenmerge)


def test_passthrough_stacks_layers_by_real_index(tmp_path):
    a = make_llama(tmp_path / "a", seed=30, num_hidden_layers=3)
    b = make_llama(tmp_path / "b", seed=31, num_hidden_layers=12)
    out = tmp_path / "stacked"
    r = recipe("""
        merge_method: passthrough
        slices:
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
          - sources: [{{model: {b}, layer_range: [10, 12]}}]
            parameters: {{scale: [{{filter: o_proj, value: 0.0}}, {{value: 1.0}}]}}
    """, a=a, b=b)
    merge_models(r, out)
    wa, wb, merged = weights(a), weights(b), weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    for i, (src, j) in enumerate([(wa, 0), (wa, 1), (wb, 10), (wb, 11)]):
        for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{i}.{rest}"], src[f"model.layers.{j}.{rest}"]), (i, rest)
    assert not merged["model.layers.3.self_attn.o_proj.weight"].any()  # scaled by 0 through the filter
    assert torch.equal(merged["model.layers.1.self_attn.o_proj.weight"], wa["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])  # first slice
    assert torch.equal(merged["model.norm.weight"], wb["model.norm.weight"])  # last slice
    assert torch.equal(merged["lm_head.weight"], wb["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4 and torch.isfinite(model(torch.tensor([[1, 2]])).logits).all()


# ---------------------------------------------------------------------------------------------- DFS


def test_dfs_route_layout_repeats_and_joint_scales():
    w = [[float(10 * i + j) for j in range(5)] for i in range(5)]  # M = 2 + 3 layers
    route = dfs_route([1, 0, 1, 1, 0, 0, 1, 0, 0, 1], [2, 3], repeats=2, scales=w)
    assert route.layers == ((0, 0), (1, 0), (1, 1), (0, 1), (1, 2))
    # Scales apply where the model changes: 0:0 -> 1:0 is global 0 -> 2, 1:1 -> 0:1 is 3 -> 1, 0:1 -> 1:2 is 1 -> 4.
    assert route.scales == (1.0, w[0][2], 1.0, w[3][1], w[1][4])
    assert route.joints == (1, 3, 4)
    with pytest.raises(ValueError, match="T = M \\* r"):
        dfs_route([1, 1, 1], [2, 3], repeats=1)
    with pytest.raises(ValueError, match="selects no layer"):
        dfs_route([0] * 5, [2, 3], repeats=1)


def _hidden_inputs(model, ids):
    """Input hidden states of every decoder layer."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                             with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return logits, seen


@pytest.mark.parametrize("kind", ["llama", "cognate"])
def test_dfs_selecting_model_a_layers_reproduces_a(tmp_path, kind):
    make = make_llama if kind == "llama" else make_cognate
    a, b = make(tmp_path / "a", seed=40), make(tmp_path / "b", seed=41)
    ma, mb = AutoModelForCausalLM.from_pretrained(a).eval(), AutoModelForCausalLM.from_pretrained(b).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        ref = ma(ids).logits
    only_a = dfs_route([1, 1, 0, 0], [2, 2], repeats=1)
    routed = build_dfs_model([ma, mb], only_a)
    with torch.no_grad():
        assert (routed(ids).logits - ref).abs().max().item() <= 1e-6
        # Repeating a layer changes depth and logits.
        deeper = build_dfs_model([ma, mb], dfs_route([1, 1, 0, 0, 1, 0, 0, 0], [2, 2], repeats=2))
        assert len(deeper.model.layers) == 3
        assert (deeper(ids).logits - ref).abs().max().item() > 1e-3
    assert len(ma.model.layers) == 2  # sources untouched
    # The streaming export of the same route is a plain HF folder with A's logits.
    out = tmp_path / "dfs"
    merge_models(recipe("merge_method: dfs\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                        "parameters: {{repeats: 1, indicator: [1, 1, 0, 0]}}", a=a, b=b), out)
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits - ref).abs().max().item() <= 1e-6


def test_dfs_scales_change_activations_only_at_joints(tmp_path):
    a, b = make_llama(tmp_path / "a", seed=42), make_llama(tmp_path / "b", seed=43)
    ma, mb = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (a, b))
    ids = torch.tensor([[2, 7, 1, 8, 2, 8]])
    indicator = [1, 1, 0, 1]  # A0, A1, B1: one joint, into B's layer 1 (global 3) from A's layer 1 (global 1)
    w = [[1.0] * 4 for _ in range(4)]
    plain = build_dfs_model([ma, mb], dfs_route(indicator, [2, 2], repeats=1, scales=w))
    w[1][3], w[0][1] = 0.5, 7.0  # 0 -> 1 is inside model A: no joint, so it must have no effect
    scaled = build_dfs_model([ma, mb], dfs_route(indicator, [2, 2], repeats=1, scales=w))
    logits_p, inputs_p = _hidden_inputs(plain, ids)
    logits_s, inputs_s = _hidden_inputs(scaled, ids)
    assert torch.equal(inputs_p[0], inputs_s[0]) and torch.equal(inputs_p[1], inputs_s[1])
    # The hook captures the input before the scaling pre-hook runs; the layer itself sees half of it.
    captured = []
    scaled.model.layers[2].register_forward_pre_hook(lambda m, a, k: captured.append(a[0] if a else k["hidden_states"]),
                                                     with_kwargs=True)
    with torch.no_grad():
        scaled(ids)
    torch.testing.assert_close(captured[-1], 0.5 * inputs_p[2])
    assert (logits_p - logits_s).abs().max().item() > 1e-4
    with pytest.raises(ConfigError, match="cannot be written"):
        merge_models(recipe("merge_method: dfs\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                            "parameters: {{repeats: 1, indicator: [1, 1, 0, 1], scales: " + json.dumps(w).replace("{", "{{")
                            + "}}", a=a, b=b), tmp_path / "out")


# ------------------------------------------------------------------------------------- memory cap

_MEASURE = r"""
import ctypes, gc, json, shutil, sys
import torch
torch.set_num_threads(1)  # on a busy 2-core machine, 2 threads make every small elementwise op ~100x slower
from forge_models.merge import MergeRecipe, merge_models
from forge_models.merge.safetensors_io import TensorReader, read_model_index

libc = ctypes.CDLL("libc.so.6")

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

def peak_growth(fn):
    # Return freed heap to the OS, reset the peak-RSS mark (Linux clear_refs 5), run, read the new peak.
    gc.collect(); libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    keep = fn()
    return (kib("VmHWM") - before) * 1024, keep

warm, big, out, *models = sys.argv[1:]
# One-time costs (lazy imports, kernel and allocator set-up: ~11 MiB) are paid by a tiny merge first.
merge_models(MergeRecipe.from_yaml(warm), out + "-warm", chunk_bytes=2**19)
chunked, _ = peak_growth(lambda: merge_models(MergeRecipe.from_yaml(big), out, chunk_bytes=2**19))
shutil.rmtree(out + "-whole", ignore_errors=True)
whole, _ = peak_growth(lambda: merge_models(MergeRecipe.from_yaml(big), out + "-whole", chunk_bytes=2**40))
def load_all():
    with TensorReader() as r:
        return [r.read(i) for p in models for i in read_model_index(p).values()]
load_bytes, kept = peak_growth(load_all)
orchestration = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "mlflow", "s3fs"))
print(json.dumps({"chunked": chunked, "whole_tensors": whole, "load_all": load_bytes,
                  "loaded": sum(t.nbytes for t in kept), "orchestration_modules": orchestration}))
"""


def test_streaming_merge_stays_under_a_memory_cap(tmp_path, llamas):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS mark")
    # 3 models of 18 MiB each (fp32; the 4096 x 256 embedding and head are 4 MiB each, as vocabulary-heavy
    # as small real models); the cap is below one model.
    shape = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4)
    paths = [make_llama(tmp_path / f"big{i}", seed=50 + i, tokenizer=False, **shape) for i in range(3)]
    total = sum(p.stat().st_size for path in paths for p in path.glob("*.safetensors"))
    cap = 16 * 2**20
    assert total > 3 * cap and total / 3 > cap
    text = ("merge_method: ties\nbase_model: {a}\nmodels: [{{model: {b}, parameters: {{weight: 1, density: 0.5}}}},"
            " {{model: {c}, parameters: {{weight: 1, density: 0.5}}}}]")
    warm = recipe(text, a=llamas["m0"], b=llamas["m1"], c=llamas["m2"]).to_yaml()
    big = recipe(text, a=paths[0], b=paths[1], c=paths[2]).to_yaml()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, warm, big, str(tmp_path / "out"), *map(str, paths)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured.pop("orchestration_modules") == []  # a merge pulls in no prefect / mlflow / s3fs
    print({k: f"{v / 2**20:.1f} MiB" for k, v in measured.items()}, f"models {total / 2**20:.1f} MiB")
    # The measurement sees real allocations: holding all three models shows up as all three models, and
    # merging whole 4 MiB tensors (N inputs + TIES temporaries) shows up above the cap.
    assert measured["load_all"] >= 0.9 * measured["loaded"] and measured["loaded"] > 0.95 * total
    assert measured["whole_tensors"] > cap
    assert measured["chunked"] < cap, f"merge grew RSS by {measured['chunked'] / 2**20:.1f} MiB (cap {cap / 2**20:.0f} MiB)"
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "out").values(), weights(tmp_path / "out-whole").values()))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", dict(weight=[1.0, 0.5], density=[0.3, 0.7])),
        ("breadcrumbs", dict(weight=1.0, density=[0.5, 0.8], gamma=[0.1, 0.05])),
        ("breadcrumbs_ties", dict(weight=[1.0, -0.5], density=0.6, gamma=0.2)),
        ("dare_ties", dict(weight=1.0, density=[0.4, 0.6])),
        ("della", dict(weight=1.0, density=0.5, epsilon=0.2)),
        ("slerp", dict(t=0.3)),
        ("model_stock", dict()),
        ("model_stock", dict(filter_wise=True)),
    ],
)
def test_chunked_kernels_equal_the_reference_under_any_chunking(method, params):
    from forge_models.merge import chunked

    g = torch.Generator().manual_seed(9)
    # Quarter-integers are exact in float32, so many |delta| values tie: ties are broken by position.
    base = torch.randint(-8, 8, (37, 11), generator=g).float() / 4
    count = {"slerp": 1, "model_stock": 3}.get(method, 2)
    models = [base + torch.randint(-3, 4, (37, 11), generator=g).float() / 4 for _ in range(count)]
    spec = get_method(method)
    per_model = [{k: (v[i] if isinstance(v, list) else v) for k, v in params.items() if spec.param(k) in spec.tensor_parameters}
                 for i in range(len(models))]
    values, per_model = spec.resolve({k: v for k, v in params.items() if spec.param(k) in spec.parameters}, per_model, 37 * 11, "t")
    expected = spec.apply(models, base, values, per_model, tensor_generators(0, "w", len(models)))
    for step in (1, 4, 36, 37):
        kernel = chunked.kernel_for(spec, values, per_model, tensor_generators(0, "w", len(models)))
        ranges = [(a, min(37, a + step)) for a in range(0, 37, step)]
        read = lambda i, a, b: (base if i < 0 else models[i])[a:b].clone()  # noqa: E731
        kernel.prepare(read, ranges)
        got = torch.cat([kernel.rows(read, a, b) for a, b in ranges])
        if method == "slerp" or (method == "model_stock" and not params):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # two-pass float64 sums
        else:
            assert torch.equal(got, expected), (method, step)
