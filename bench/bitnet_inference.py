"""Packed BitNet inference on CPU against the same model in fp32 and bf16: tokens/s and weight memory.

    .venv/bin/python bench/bitnet_inference.py [--shape cognate-25m] [--threads 2] [--repeats 5]
                                              [--out bench/out/bitnet_inference.json]

One randomly initialised Llama-architecture model (the shape of the `full` preset's ~25M Cognate model,
as a plain decoder so every variant does exactly the same work; tokens/s do not depend on the weight
values) is run four ways:

- ``fp32``: the float model as is;
- ``bf16``: the same model cast to bfloat16 (oneDNN/AMX bf16 GEMMs where the CPU has them);
- ``packed_int_mm``: converted with ``convert_to_bitnet`` (act_norm "rms"), exported with ``export_packed``
  (2-bit) and reloaded with ``load_packed(backend="int_mm")``: every linear layer a ``PackedBitLinear``
  holding 2-bit codes, expanding them to int8 on every call and computing int8 x ternary with
  ``torch._int_mm`` and one scale division. Embeddings, ``lm_head`` and norms stay float32.
- ``packed_rowwise``: the same folder reloaded with ``load_packed(backend="rowwise2bit")``: calls of
  <= ``ROWWISE_MAX_ROWS`` rows (decode) run fbgemm's 2-bit row-wise embedding bag straight on the codes;
  larger calls (prefill) run the ``_int_mm`` path.
- ``packed_kernel``: the same folder reloaded with ``load_packed(backend="ternary_kernel")`` (the default
  where the fused C++ kernel builds): calls of <= ``KERNEL_MAX_ROWS`` rows run the fused kernel (int8
  activations x 2-bit codes, VNNI/AVX2, torch's threads); larger calls (prefill) the ``_int_mm`` path.

Measured, interleaved (fp32, bf16, packed_int_mm, packed_rowwise, fp32, ...) so machine noise hits all of
them; medians reported:

- ``prefill``: one forward pass over ``batch x seq`` tokens, tokens/s;
- ``decode``: greedy generation of ``new_tokens`` tokens at batch 1 with the KV cache, tokens/s;
- ``weight memory``: bytes of every parameter and persistent buffer the model holds, split into the linear
  layers that BitNet converts and the rest (the packed layers' transient int8 operand, allocated per call
  and freed, is reported separately as the largest one; the embedding-bag index cache that all rowwise
  layers share is counted in the rowwise model's "other").

- ``resident``: each variant loaded in a fresh process (fp32 and bf16 built directly in their dtype, the
  packed ones with ``load_packed``) and run for the same decode: resident set size (RSS, /proc/self/statm)
  after loading and after decoding, and peak RSS, each minus the process's RSS after imports.

Goal (issue 5): packed at least as fast as fp32, and >= 5x less weight memory. The numbers are printed
and written as JSON whatever they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forge_models.bitnet import (PackedBitLinear, bag_index_bytes, convert_to_bitnet, export_packed, kernel_available,
                                  load_packed)

SHAPES = {
    # The `full` preset's Cognate shape (hidden 512, 8 layers, SwiGLU 1376), vocabulary 8192.
    "cognate-25m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                        vocab_size=8192),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688, vocab_size=2048),
    "1b-layer": dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, intermediate_size=5632,
                     vocab_size=8192),
}


def build(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=1024, tie_word_embeddings=True, **SHAPES[shape])
    return LlamaForCausalLM(cfg).eval()


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of distinct parameters and persistent buffers: converted linear layers vs everything else."""
    seen, linear, other = set(), 0, 0
    linear_prefixes = tuple(
        f"{n}." for n, m in model.named_modules()
        if isinstance(m, PackedBitLinear) or (isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    )
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        if name.startswith(linear_prefixes):
            linear += t.numel() * t.element_size()
        else:
            other += t.numel() * t.element_size()
    return {"linear": linear, "other": other, "total": linear + other}


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timing covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_prefill(model, ids: torch.Tensor) -> float:
    sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids)
    sync(ids.device)
    return ids.numel() / (time.perf_counter() - t0)


@torch.no_grad()
def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    sync(prompt.device)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)
    sync(prompt.device)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - t0)


def interleaved(models: dict, ids: torch.Tensor, prompt: torch.Tensor, repeats: int,
                new_tokens: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Prefill and decode tokens/s of every model, ``repeats`` times, interleaved (m1, m2, ..., m1, ...) so
    machine noise hits all of them."""
    prefill = {k: [] for k in models}
    decode = {k: [] for k in models}
    for _ in range(repeats):
        for name, model in models.items():
            prefill[name].append(time_prefill(model, ids))
            decode[name].append(time_decode(model, prompt, new_tokens))
    return prefill, decode


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child started by this
    # (large) benchmark process would report the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(variant: str, folder: str, shape: str, threads: int, new_tokens: int) -> None:
    """Run in a fresh process: load one variant, decode, print its resident-memory growth as JSON."""
    torch.set_num_threads(threads)
    base = _rss_mb()
    if variant in ("fp32", "bf16"):
        torch.set_default_dtype(torch.float32 if variant == "fp32" else torch.bfloat16)
        model = build(shape)
        torch.set_default_dtype(torch.float32)
    else:
        model = load_packed(folder, backend=variant.removeprefix("packed_").replace("kernel", "ternary_kernel")
                            .replace("rowwise", "rowwise2bit"))
    loaded = _rss_mb()
    prompt = torch.randint(2, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    time_decode(model, prompt, new_tokens)
    # Peak can predate the baseline (imports): then it shows as ~0 growth, which is what it is.
    print(json.dumps({"loaded_mb": loaded - base, "after_decode_mb": _rss_mb() - base,
                      "peak_mb": max(0.0, _peak_rss_mb() - base)}))


def resident(names: list[str], folder: str, args) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--rss-child", name, "--rss-folder", folder, "--shape",
                               args.shape, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)],
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cognate-25m")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the dev box has 2 cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/out/bitnet_inference.json")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--rss-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.rss_folder, args.shape, args.threads, args.new_tokens)
    torch.set_num_threads(args.threads)

    fp32 = build(args.shape)
    bf16 = build(args.shape).to(torch.bfloat16)
    converted = build(args.shape)
    report = convert_to_bitnet(converted, act_norm="rms")
    folder = tempfile.TemporaryDirectory()
    tmp = folder.name
    export_packed(converted, tmp)
    packed = load_packed(tmp, backend="int_mm")
    rowwise = load_packed(tmp, backend="rowwise2bit")
    fused = load_packed(tmp, backend="ternary_kernel") if kernel_available() else None
    models = {"fp32": fp32, "bf16": bf16, "packed_int_mm": packed, "packed_rowwise": rowwise}
    if fused is not None:
        models["packed_kernel"] = fused
    else:
        print("the fused ternary kernel is unavailable here (no compiler?): packed_kernel not measured")
    packed_names = tuple(k for k in models if k.startswith("packed_"))

    gen = torch.Generator().manual_seed(1)
    vocab = fp32.config.vocab_size
    ids = torch.randint(2, vocab, (args.batch, args.seq), generator=gen)
    prompt = torch.randint(2, vocab, (1, 16), generator=gen)
    with torch.no_grad():  # the packed models compute what the converted in-memory model computes, bit for bit:
        reference = converted(input_ids=ids[:1]).logits  # prefill (128 rows per call: the GEMM path)
        one = converted(input_ids=ids[:1, :1]).logits  # one token (1 row per call: rowwise's embedding bag)
        same = {k: torch.equal(models[k](input_ids=ids[:1]).logits, reference)
                and torch.equal(models[k](input_ids=ids[:1, :1]).logits, one) for k in packed_names}
        tokens = {k: models[k].generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
                  for k in packed_names}
        same["greedy_tokens_all_packed_equal"] = all(torch.equal(tokens["packed_int_mm"], t) for t in tokens.values())

    for model in models.values():  # warm-up: first-call allocations and kernel selection
        time_prefill(model, ids[:1, :16])
        time_decode(model, prompt, 2)
    prefill, decode = interleaved(models, ids, prompt, args.repeats, args.new_tokens)

    rss = resident(list(models), tmp, args)
    folder.cleanup()
    memory = {k: weight_bytes(m) for k, m in models.items()}
    index_bytes = bag_index_bytes()  # shared by the rowwise layers (filled by the calls above)
    memory["packed_rowwise"]["other"] += index_bytes
    memory["packed_rowwise"]["total"] += index_bytes
    largest = max((m for _, m in packed.named_modules() if isinstance(m, PackedBitLinear)),
                  key=lambda m: m.in_features * m.out_features)
    result = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "converted_layers": len(report.converted),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "batch_x_seq": [args.batch, args.seq],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "packed_equals_in_memory_logits": same,
        "rowwise_bag_index_bytes": index_bytes,
        "prefill_tokens_per_s": {k: statistics.median(v) for k, v in prefill.items()},
        "decode_tokens_per_s": {k: statistics.median(v) for k, v in decode.items()},
        "prefill_samples": prefill,
        "decode_samples": decode,
        "weight_bytes": memory,
        "resident_mb": rss,
        "packed_transient_operand_bytes_max": largest.in_features * 4 * -(-largest.out_features // 4),
        "load_average": os.getloadavg(),
    }
    result["ratios"] = {}
    for k in packed_names:
        result["ratios"].update({
            f"prefill_{k}_vs_fp32": result["prefill_tokens_per_s"][k] / result["prefill_tokens_per_s"]["fp32"],
            f"decode_{k}_vs_fp32": result["decode_tokens_per_s"][k] / result["decode_tokens_per_s"]["fp32"],
            f"linear_memory_fp32_vs_{k}": memory["fp32"]["linear"] / memory[k]["linear"],
            f"total_memory_fp32_vs_{k}": memory["fp32"]["total"] / memory[k]["total"],
            f"total_memory_bf16_vs_{k}": memory["bf16"]["total"] / memory[k]["total"],
        })
    for k in packed_names[1:]:
        result["ratios"][f"decode_{k}_vs_packed_int_mm"] = (
            result["decode_tokens_per_s"][k] / result["decode_tokens_per_s"]["packed_int_mm"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"shape {args.shape} {SHAPES[args.shape]}, {args.threads} threads, load average {result['load_average']}")
    print(f"packed logits == converted in-memory logits: {same}")
    print(f"{'':16}{'prefill tok/s':>15}{'decode tok/s':>15}{'linear MB':>12}{'total MB':>12}")
    for k in models:
        print(f"{k:16}{result['prefill_tokens_per_s'][k]:15.0f}{result['decode_tokens_per_s'][k]:15.1f}"
              f"{memory[k]['linear'] / 1e6:12.2f}{memory[k]['total'] / 1e6:12.2f}")
    print(f"{'resident MB':16}{'after load':>12}{'after decode':>14}{'peak':>8}  (fresh process each, minus imports)")
    for k, v in rss.items():
        print(f"{k:16}{v['loaded_mb']:12.1f}{v['after_decode_mb']:14.1f}{v['peak_mb']:8.1f}")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}")
    print(f"largest transient int8 operand per call: {result['packed_transient_operand_bytes_max'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
