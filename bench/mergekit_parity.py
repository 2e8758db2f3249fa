"""Merge the same recipes with mergekit and with forge_models.merge, and compare the written tensors.

mergekit is not a dependency of this project; install it beside the venv for this check only:

    .venv/bin/pip install --target /tmp/mergekit-pkgs --no-deps mergekit==0.1.5 immutables
    PYTHONPATH=/tmp/mergekit-pkgs .venv/bin/python bench/mergekit_parity.py [--chunk-bytes 8388608]

Builds tiny float32 Llama models in bench/out/parity (a random base, three base + N(0, 0.01^2)
"fine-tunes", and a tied-embedding family), runs every deterministic method with gradients and filters
through both, and prints per recipe: tensors bit-identical, the largest absolute difference, and config
keys that differ. DARE and DELLA are left out: their masks are random and mergekit draws them from the
global torch generator in its own order.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import forge_models  # noqa: F401
from forge_models.merge import MergeRecipe, merge_models

ROOT = Path(__file__).resolve().parents[1]


def make(root: Path, name: str, seed: int, base: LlamaForCausalLM | None = None, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    if base is not None:  # a "fine-tune": base + small noise, so task vectors look like real ones
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                p.copy_(q + 0.01 * torch.randn_like(q))
    model.save_pretrained(root / name)
    return model


def recipes(p: dict[str, str]) -> dict[str, str]:
    w = "[{filter: self_attn, value: [0.2, 0.9]}, {filter: mlp, value: 0.6}, {value: 1.0}]"
    return {
        "linear": f"merge_method: linear\nmodels: [{{model: {p['a']}, parameters: {{weight: {w}}}}}, "
                  f"{{model: {p['b']}, parameters: {{weight: [1.0, 0.3, 2.0]}}}}]",
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}, "
                           f"parameters: {{weight: {w}}}}}, {{model: {p['b']}, parameters: {{weight: 0.5}}}}]\n"
                           "parameters: {lambda: 0.7}",
        "ties": f"merge_method: ties\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}, parameters: {{weight: {w}, "
                f"density: [1.0, 0.3]}}}}, {{model: {p['b']}, parameters: {{weight: 0.5, density: 0.5}}}}, "
                f"{{model: {p['c']}, parameters: {{weight: 1.0, density: 0.7}}}}]",
        "ties_rescale_l1": f"merge_method: ties\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}, parameters: "
                           f"{{weight: 1, density: 0.4}}}}, {{model: {p['b']}, parameters: {{weight: 1, density: 0.6}}}}]\n"
                           "parameters: {rescale: true, normalize: false}",
        "breadcrumbs": f"merge_method: breadcrumbs\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}, parameters: "
                       f"{{weight: 1, density: 0.8, gamma: 0.05}}}}, {{model: {p['b']}, parameters: {{weight: 0.5, "
                       "density: 0.6, gamma: 0.1}}]",
        "breadcrumbs_ties": f"merge_method: breadcrumbs_ties\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}, "
                            f"parameters: {{weight: 1, density: 0.8, gamma: 0.05}}}}, {{model: {p['b']}, parameters: "
                            "{weight: 1, density: 0.6, gamma: 0.1}}]",
        "slerp": f"merge_method: slerp\nbase_model: {p['a']}\nmodels: [{{model: {p['a']}}}, {{model: {p['b']}}}]\n"
                 "parameters: {t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, "
                 "{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]}",
        "model_stock": f"merge_method: model_stock\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}}}, "
                       f"{{model: {p['b']}}}, {{model: {p['c']}}}]",
        "model_stock_filter_wise": f"merge_method: model_stock\nbase_model: {p['base']}\nmodels: [{{model: {p['a']}}}, "
                                   f"{{model: {p['b']}}}]\nparameters: {{filter_wise: true}}",
        "passthrough": f"merge_method: passthrough\nslices:\n  - sources: [{{model: {p['a']}, layer_range: [0, 3]}}]\n"
                       f"  - sources: [{{model: {p['b']}, layer_range: [1, 4]}}]\n"
                       "    parameters: {scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]}",
        "slices_linear": f"merge_method: linear\nslices:\n  - sources: [{{model: {p['a']}, layer_range: [0, 2], "
                         f"parameters: {{weight: [1, 0]}}}}, {{model: {p['b']}, layer_range: [2, 4], "
                         "parameters: {weight: 1}}]",
        "tied_ties": f"merge_method: ties\nbase_model: {p['tbase']}\nmodels: [{{model: {p['ta']}, parameters: "
                     f"{{weight: 1, density: 0.5}}}}, {{model: {p['tb']}, parameters: {{weight: 1, density: 0.5}}}}]",
        "tied_and_untied_linear": f"merge_method: linear\nmodels: [{{model: {p['ta']}, parameters: {{weight: 1}}}}, "
                                  f"{{model: {p['a']}, parameters: {{weight: 2}}}}]",
    }


def load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-bytes", type=int, default=8 * 2**20, help="forge merge_models chunk_bytes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "parity"))
    args = ap.parse_args()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = make(root, "base", 0)
    for i, name in enumerate("abc"):
        make(root, name, i + 1, base)
    tbase = make(root, "tbase", 4, tie_word_embeddings=True)
    make(root, "ta", 5, tbase, tie_word_embeddings=True)
    make(root, "tb", 6, tbase, tie_word_embeddings=True)
    paths = {p.name: str(p) for p in root.iterdir()}
    for name, text in recipes(paths).items():
        text += "\ndtype: float32\n"
        mk_out, fm_out = root / f"mergekit-{name}", root / f"forge-{name}"
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(mk_out),
                  options=MergeOptions(copy_tokenizer=False, quiet=True))
        merge_models(MergeRecipe.from_yaml(text), fm_out, chunk_bytes=args.chunk_bytes)
        a, b = load(mk_out), load(fm_out)
        common = sorted(set(a) & set(b))
        exact = sum(torch.equal(a[k], b[k]) for k in common)
        worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in common)
        ca, cb = (json.loads((d / "config.json").read_text()) for d in (mk_out, fm_out))
        diff = {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k) and k != "transformers_version"}
        only = sorted(set(a) ^ set(b))
        print(f"{name:24s} bit-identical {exact}/{len(common)}  max|diff| {worst[0]:.3g}  "
              f"{'only in one: ' + str(only[:3]) + '  ' if only else ''}config diffs {diff}")


if __name__ == "__main__":
    main()
