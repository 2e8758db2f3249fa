"""Packed BitNet inference on a GPU against the same model in fp16/bf16: the prepared device check.

    python bench/bitnet_gpu.py [--shape cognate-25m 1b-layer] [--repeats 5] [--out DIR/bitnet_gpu.json]
    python bench/bitnet_gpu.py --device cpu --shape small --repeats 1     # smoke run of the script itself

No GPU was lent to the sessions that wrote it, so this script is what a session with one runs, in one go
(a few minutes on one GPU), to measure and choose the GPU path. Per shape (random init, Llama
architecture, as in bench/bitnet_inference.py), interleaved, medians:

- ``bf16`` / ``fp16``: the float model (cuBLAS GEMMs);
- ``packed_int_mm``: ``load_packed(..., device=cuda)``: every linear a PackedBitLinear that expands its 2-bit
  codes to int8 per call and runs cuBLASLt's int8 GEMM (``torch._int_mm``; decode pads to 17 rows, shapes
  not multiples of 8 fall back to an exact float64 GEMM);
- ``hf_bitnet``: the same folder through transformers' own BitNet integration
  (``AutoModelForCausalLM.from_pretrained``), which unpacks the 2-bit weights in its forward pass.

Reported: prefill and decode tokens/s, peak GPU memory of a fresh load + run (``max_memory_allocated``),
weight bytes on the device, and the max relative logit difference of each packed variant against the
converted in-memory model on the same device (a check that the path computes the right thing). Printed and
written as JSON whatever the numbers are.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bitnet_inference import interleaved, time_decode, time_prefill  # bench/ is on sys.path when run as a script
from forge_models.bitnet import convert_to_bitnet, export_packed, load_packed

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688, vocab_size=2048),
    "cognate-25m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                        vocab_size=8192),
    "1b-layer": dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, intermediate_size=5632,
                     vocab_size=8192),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=16, intermediate_size=5632,
               vocab_size=32000),
}


def build(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=True, **SHAPES[shape])).eval()


def device_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def loaders(folder: str, shape: str, device: torch.device) -> dict:
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    return {
        "bf16": lambda: build(shape).to(device=device, dtype=torch.bfloat16),
        "fp16": lambda: build(shape).to(device=device, dtype=half),
        "packed_int_mm": lambda: load_packed(folder, device=device, backend="int_mm"),
        "hf_bitnet": lambda: AutoModelForCausalLM.from_pretrained(folder, device_map=str(device)).eval(),
    }


def run_shape(shape: str, device: torch.device, args) -> dict:
    converted = build(shape)
    convert_to_bitnet(converted, act_norm="rms")
    with tempfile.TemporaryDirectory() as tmp:
        export_packed(converted, tmp)
        converted = converted.to(device)
        gen = torch.Generator().manual_seed(1)
        vocab = SHAPES[shape]["vocab_size"]
        ids = torch.randint(2, vocab, (args.batch, args.seq), generator=gen).to(device)
        prompt = torch.randint(2, vocab, (1, 16), generator=gen).to(device)
        with torch.no_grad():
            reference = converted(input_ids=ids[:1]).logits.float()
        del converted
        result: dict = {"shape": shape, "config": SHAPES[shape], "variants": {}}
        models, errors = {}, {}
        for name, load in loaders(tmp, shape, device).items():
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            try:
                model = load()
                with torch.no_grad():
                    logits = model(input_ids=ids[:1]).logits.float()
                time_prefill(model, ids[:, :16])
                time_decode(model, prompt, 2)
            except Exception as exc:  # a path that does not run here is a result too, reported as such
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            entry = {"weight_bytes_on_device": device_bytes(model)}
            if name.startswith(("packed", "hf")):
                entry["max_rel_logit_diff_vs_converted"] = float(
                    (logits - reference).abs().max() / reference.abs().max().clamp(min=1.0))
            if device.type == "cuda":
                entry["peak_memory_bytes_load_and_warmup"] = torch.cuda.max_memory_allocated(device) - base
            result["variants"][name] = entry
            models[name] = model
        prefill, decode = interleaved(models, ids, prompt, args.repeats, args.new_tokens)
        for name in models:
            result["variants"][name]["prefill_tokens_per_s"] = statistics.median(prefill[name])
            result["variants"][name]["decode_tokens_per_s"] = statistics.median(decode[name])
        result["errors"] = errors
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["cognate-25m", "1b-layer"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/out/bitnet_gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine (or --device cpu for a smoke run)")
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "results": [run_shape(shape, device, args) for shape in args.shape],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"device: {report['device']}, torch {report['torch']}")
    for res in report["results"]:
        print(f"\n{res['shape']} {res['config']}")
        print(f"{'':15}{'prefill tok/s':>14}{'decode tok/s':>14}{'weights MB':>12}{'peak MB':>10}{'logit diff':>12}")
        for name, v in res["variants"].items():
            peak = v.get("peak_memory_bytes_load_and_warmup")
            diff = v.get("max_rel_logit_diff_vs_converted")
            print(f"{name:15}{v['prefill_tokens_per_s']:14.0f}{v['decode_tokens_per_s']:14.1f}"
                  f"{v['weight_bytes_on_device'] / 1e6:12.2f}{'' if peak is None else f'{peak / 1e6:10.1f}':>10}"
                  f"{'' if diff is None else f'{diff:12.2e}':>12}")
        for name, err in res["errors"].items():
            print(f"{name}: did not run: {err}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
