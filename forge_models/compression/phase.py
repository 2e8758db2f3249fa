"""Phase 8 — final compression: each tensor in its best encoding under a byte budget, one loadable folder.

1. Validate the config and inputs (before any compute): candidates parse, exactly one budget is set.
2. Losses of the input model on the validation ids (decisions) and the test ids (the report).
3. Hessians E[x x^T] of every linear layer's inputs on the calibration ids (train split only).
4. Per 2-D tensor and candidate: encode, decode, damage = output error on calibration activations
   (:mod:`forge_models.compression.chooser`; for an embedding also its lookup error on the calibration
   tokens, added to the LM-head term when tied), bytes = the payload bytes that will be written.
   BitLinear weights only take the ``ternary`` encoding (exact for what the layer computes). An encoder
   that cannot represent a tensor (``grid``, the exact one, on a tensor that is not on its grid) raises
   ``NotApplicable`` and is dropped for that tensor.
   With ``damage_units="loss"`` (default) each tensor's damages are then rescaled to nats: its most
   damaging candidate is decoded into the model alone and the calibration-loss increase measured (one
   forward pass over the calibration ids per tensor); see :func:`_damage_in_nats`.
5. Choose one candidate per tensor minimising total damage under the budget left after the tensors that
   are not encoded (norms, biases: float32) and the non-weight files (config, tokenizer, recipe), both
   measured by writing them first.
6. Encode group by group (``layers_per_group`` decoder layers each, plus "other" for embeddings and head): write the
   group's shard, read it back from disk, decode it into the working model, evaluate the validation loss;
   if it rose by more than ``max_loss_increase`` over the input model, roll the group back to its
   highest-fidelity candidate (and re-write the shard).
7. Write the recipe, reload the whole folder with :func:`load_compressed`, check its logits equal the
   working model's, evaluate the test loss; sizes from the files. Fails the gate if the written folder is
   larger than the budget (after rollbacks).

What phase 7 attached travels with the model (``inputs.experts``, ``inputs.agent_config``): ``agent.json`` as it
was and the expert library **basis-free** (z, trained singular values, metadata; see
:mod:`forge_models.experts.library`) are written into the folder before step 5, so their bytes come off the
budget. The library's targets are checked against the input model before any compute (names, shapes, kind,
and that its weights are the ones z was trained on). After step 7 the stored library is re-based on the
reloaded model (SVD of the decoded weights) and, per target, the relative change of the singular values and
the alignment of the singular directions with the trained ones are measured (metrics ``experts_*``, details
``experts_rebase``).

SeedLM and VPTQ are alternative encodings of a tensor, never stages: no ratio multiplies another.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from forge_models.compression.artifact import (
    AGENT_FILE,
    EXPERTS_DIR,
    RECIPE_FILE,
    artifact_bytes,
    load_compressed,
    read_shard,
    shard_name,
    write_recipe,
    write_shard,
)
from forge_models.compression.chooser import Option, choose, collect_hessians, hull, output_damage
from forge_models.compression.encoders import Encoded, NotApplicable, make_encoder
from forge_models.compression.hf import write_hf_files
from forge_models.config import Frozen
from forge_models.runtime import ConfigError, PhaseContext, PhaseOutput, QualityGateFailed

__all__ = ["CompressionConfig", "CompressionInputs", "run", "mean_loss", "token_blocks", "DEFAULT_CANDIDATES",
           "DEFAULT_BPW"]

DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    # Exact where a tensor already lies on a Q4_1-style grid (a model dequantised from GGUF), else declined
    {"name": "grid", "bits": 4, "group": 32},
    {"name": "bf16"},
    {"name": "rtn", "bits": 8, "group": 128},
    {"name": "rtn", "bits": 4, "group": 32, "sym": False},
    {"name": "rtn", "bits": 4, "group": 128},
    # NF4 b64 (4.127 bpw): on SmolLM2 alone 1.34x perplexity at 73.2 MB against RTN int4 g128's 2.21x at 73.3 MB
    {"name": "nf4", "block": 64},
    # Entropy-coded SQ (rANS): on SmolLM2 at 75 MB the chooser gave the embedding step 0.15 and coarser steps
    # to the least sensitive linears, 1.050x [1.032, 1.071] against 1.084x with NF4 in their place
    {"name": "ecsq", "step": 0.15},
    {"name": "ecsq", "step": 0.25},
    {"name": "ecsq", "step": 0.4},
    {"name": "ecsq", "step": 0.7},
    {"name": "rtn", "bits": 3, "group": 32, "sym": False},
    {"name": "vptq", "v": 4, "k1": 256, "k2": 256},
    {"name": "vptq", "v": 4, "k1": 256, "k2": 16},
    {"name": "vptq", "v": 4, "k1": 256},
)
DEFAULT_BPW = 4.5  # budget when neither target_bytes nor target_bpw is given
# Logits of the reloaded folder vs the working model: both decode the same stored bytes to float32.
RELOAD_LOGIT_TOLERANCE = 1e-4
_LAYER = re.compile(r"layers\.(\d+)\.")


class CompressionConfig(Frozen):
    """Phase 8: per-tensor encodings chosen under a byte budget, written as one loadable folder."""

    candidates: tuple[dict[str, Any], ...] = Field(
        DEFAULT_CANDIDATES, description="Candidate encodings ({'name': ..., **params}) tried on every 2-D tensor."
    )
    target_bytes: int | None = Field(None, ge=1, description="Budget for the whole folder on disk, in bytes.")
    target_bpw: float | None = Field(
        None, gt=0, le=32,
        description=f"Alternative budget: bits per weight over all encoded (2-D) tensors ({DEFAULT_BPW} when "
                    "neither budget is given).",
    )
    calib_sequences: int = Field(16, ge=1, description="Calibration sequences (train split) for Hessians and damages.")
    val_sequences: int = Field(8, ge=1, description="Sequences (train split, after the calibration ones) deciding rollbacks.")
    test_sequences: int = Field(16, ge=1, description="Sequences of the held-out split for the phase's own loss metrics.")
    seq_len: int = Field(128, ge=8, description="Tokens per calibration / validation / test sequence.")
    max_loss_increase: float = Field(
        0.5, gt=0, description="Retention bound: validation loss (nats) may rise at most this much over the input."
    )
    calib_batch: int = Field(4, ge=1, description="Sequences per forward pass when collecting Hessians.")
    eval_batch: int = Field(4, ge=1, description="Sequences per forward pass when evaluating losses.")
    skip_patterns: tuple[str, ...] = Field((), description="Regexes of 2-D tensors kept in bf16 (never encoded).")
    layers_per_group: int = Field(
        1, ge=1, description="Decoder layers per encode/reload/evaluate/rollback group (larger = fewer evaluations)."
    )
    damage_units: Literal["loss", "output"] = Field(
        "loss",
        description="'loss': each tensor's output-error damages rescaled to nats by one measured calibration-loss "
                    "increase per tensor (comparable across tensors); 'output': raw output errors (one forward "
                    "pass less per tensor, but errors of different layers are in different units).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        # Neither budget given (the pipeline's default section): DEFAULT_BPW; giving one replaces it.
        if isinstance(data, dict) and data.get("target_bytes") is None and data.get("target_bpw") is None:
            data = {**data, "target_bpw": DEFAULT_BPW}
        return data

    @model_validator(mode="after")
    def _valid(self) -> "CompressionConfig":
        if (self.target_bytes is None) == (self.target_bpw is None):
            raise ValueError("set exactly one of target_bytes and target_bpw")
        if not self.candidates:
            raise ValueError("candidates must not be empty")
        for spec in self.candidates:
            make_encoder(spec)  # raises ConfigError on an unknown name or bad parameters
        for p in self.skip_patterns:
            re.compile(p)
        return self


@dataclass
class CompressionInputs:
    """What the compression phase consumes.

    Attributes:
        model: the causal LM (full precision, or with BitLinear layers); not modified.
        tokenizer: its tokenizer (saved into the folder).
        calib_ids: (n, L) token ids from the train split: Hessians and damages.
        val_ids: (n, L) ids (train side, disjoint from calib) for the rollback decisions.
        test_ids: (n, L) held-out ids for the reported metrics only.
        out_dir: the artifact folder to write (must be empty or absent).
        experts: the expert library trained on ``model`` (an ``ExpertLibrary`` with its basis), carried
            basis-free into ``out_dir/experts``; None: none.
        agent_config: the text of the chosen agent configuration (``agent.json``), copied as it is; None: none.
        attachments: other files the folder carries as they are, name -> bytes (e.g. Quiet-STaR's
            ``quietstar.json`` and float32 mixing head); written first, so they count in the size and budget.
    """

    model: nn.Module
    tokenizer: Any
    calib_ids: torch.Tensor
    val_ids: torch.Tensor
    test_ids: torch.Tensor
    out_dir: Path
    experts: Any = None
    agent_config: str | None = None
    attachments: dict[str, bytes] = field(default_factory=dict)


def token_blocks(tokenizer: Any, texts: list[str], seq_len: int, n: int, skip: int = 0) -> torch.Tensor:
    """(n, seq_len) int64 ids: the texts tokenised, joined with EOS, cut into consecutive blocks; the first
    ``skip`` blocks are dropped (so two calls with different skips give disjoint blocks of one split).

    Raises:
        ConfigError: when the texts hold fewer than ``skip + n`` blocks.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need = (skip + n) * seq_len
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ConfigError(f"the texts hold {len(stream) // seq_len} blocks of {seq_len} tokens; {skip + n} needed")
    return torch.tensor(stream[skip * seq_len : need], dtype=torch.long).reshape(n, seq_len)


@torch.no_grad()
def mean_loss(model: nn.Module, ids: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over all predicted positions of ids (n, L)."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += x[:, 1:].numel()
    return total / count


def _tensors(model: nn.Module, skip: tuple[str, ...]) -> tuple[dict[str, nn.Parameter], dict[str, nn.Module], dict[str, torch.Tensor]]:
    """(2-D tensors to encode, their owning linear module or None, the other tensors to keep as float32)."""
    from forge_models.bitnet.layers import BitLinear

    owners: dict[int, tuple[str, nn.Module]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            owners.setdefault(id(mod.weight), (mname, mod))
            if isinstance(mod, BitLinear):
                owners[id(mod.weight)] = (mname, mod)
    enc, own, plain = {}, {}, {}
    for name, p in model.named_parameters():  # tied parameters appear once
        if p.ndim == 2 and not any(re.search(s, name) for s in skip):
            enc[name] = p
            own[name] = owners.get(id(p))
        else:
            plain[name] = p.detach().float()
    return enc, own, plain


@torch.no_grad()
def _damage_in_nats(model: nn.Module, params: dict[str, nn.Parameter], encoders: list, encoded: dict,
                    options: dict[str, list[Option]], calib: torch.Tensor, cfg: CompressionConfig,
                    ctx: PhaseContext) -> dict[str, dict[str, Any]]:
    """Rescale each tensor's damages (in place) to nats of calibration loss; returns the scales measured.

    Output errors of different layers are in different units (a q_proj's output is not an LM head's
    logits), so their sum is no measure of the model; on SmolLM2 choosing by raw output error put 2-bit
    codes on linears and 6-bit on the embedding, 3.9x perplexity at 75 MB. Per tensor, its lossy candidate
    with the most damage (on its (bytes, damage) hull) is decoded into the model alone and the calibration
    loss increase dL measured; every damage of that tensor is multiplied by dL / damage(reference). Within
    a tensor the ordering is kept; across tensors damages become comparable (a second-order model: the loss
    rises in proportion to the output error, with a factor per tensor).

    The most damaging candidate is the reference because a mild one (4-bit) moves 8 x 128 calibration
    tokens' loss by less than its first-order noise: on SmolLM2 a third of the linears *lowered* the loss
    under NF4. Where dL <= 0 all the same (the first-order term won), |dL| is used: still the tensor's own
    response in nats (a median over other tensors would mix units again); recorded as such.
    """
    base = mean_loss(model, calib, cfg.eval_batch)
    scales: dict[str, dict[str, Any]] = {}
    for k, (name, p) in enumerate(params.items()):
        opts = options[name]
        lossy = [i for i in hull(opts) if encoded[name][i] is not None and 0 < opts[i].damage < float("inf")]
        if lossy:  # else nothing to trade (exact or a single option): its damages stay as they are (0 or inf)
            ref = max(lossy, key=lambda i: opts[i].damage)
            keep = p.data.clone()
            p.data.copy_(encoders[ref].decode(encoded[name][ref], torch.float32).to(p.device))
            dl = mean_loss(model, calib, cfg.eval_batch) - base
            p.data.copy_(keep)
            scales[name] = {"reference": encoders[ref].label(), "loss_increase": dl, "scale": abs(dl) / opts[ref].damage}
            if dl <= 0:
                scales[name]["scale_from"] = "|loss_increase| (the loss did not rise)"
            options[name] = [Option(o.bytes, o.damage * scales[name]["scale"]) for o in opts]
        ctx.tracker.progress(k + 1, len(params), f"measured the loss sensitivity of {name}")
    return scales


def _compact_json(path: Path) -> None:
    """Rewrite a JSON file without indentation (same document; SmolLM2's tokenizer.json: 3.5 MB -> 1.6 MB).

    ``save_pretrained`` writes tokenizer.json pretty-printed; in a 75 MB artifact its whitespace alone is 2 MB.
    """
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _group(name: str, layers_per_group: int = 1) -> str:
    m = _LAYER.search(name)
    return f"layer{int(m.group(1)) // layers_per_group * layers_per_group:03d}" if m else "other"


def run(inputs: CompressionInputs, cfg: CompressionConfig, ctx: PhaseContext) -> PhaseOutput:
    """Run the compression phase; see the module docstring. Raises ForgeError subclasses on failure."""
    from forge_models.bitnet.layers import BitLinear

    out = Path(inputs.out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; give a new folder (stored work is never overwritten)")
    for split in ("calib_ids", "val_ids", "test_ids"):
        ids = getattr(inputs, split)
        if ids.ndim != 2 or ids.numel() == 0 or ids.dtype != torch.long:
            raise ConfigError(f"{split} must be a non-empty (n, L) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    encoders = [make_encoder(s) for s in cfg.candidates]
    for name in inputs.attachments:
        if Path(name).name != name or name in ("config.json", RECIPE_FILE, AGENT_FILE, EXPERTS_DIR) \
                or name.startswith(("shard-", "tokenizer", "model.safetensors")):
            raise ConfigError(f"attachment {name!r} must be a plain file name that is not one of the artifact's own")
    if inputs.experts is not None:
        _check_experts(inputs.model, inputs.experts)
    t_start = time.perf_counter()
    model = copy.deepcopy(inputs.model).float().to(ctx.device).eval()
    enc_params, owners, plain = _tensors(model, cfg.skip_patterns)
    base_val = mean_loss(model, inputs.val_ids, cfg.eval_batch)
    base_test = mean_loss(model, inputs.test_ids, cfg.eval_batch)

    linears = {owners[n][0]: owners[n][1] for n in enc_params if owners[n] is not None}
    hessians = collect_hessians(model, inputs.calib_ids, cfg.calib_batch, linears)
    # An embedding's own output is the looked-up row: its output error on the calibration tokens is
    # sum_t p_t ||dE_t||^2 (p_t = token frequency), added to the LM-head term when the weight is tied.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    counts = torch.bincount(inputs.calib_ids.reshape(-1).cpu(), minlength=1).double()

    # Non-weight files and float32 tensors first: their bytes come off the budget.
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(out / "config.json"))
    inputs.tokenizer.save_pretrained(str(out))
    _compact_json(out / "tokenizer.json")
    if inputs.experts is not None:
        from forge_models.experts.library import save_expert_vectors

        save_expert_vectors(out / EXPERTS_DIR, inputs.experts)
    if inputs.agent_config is not None:
        (out / AGENT_FILE).write_text(inputs.agent_config)
    for name, data in inputs.attachments.items():
        (out / name).write_bytes(data)
    plain_shard = write_shard(out, "plain", {}, plain)
    write_hf_files(out, plain_shard.name, list(plain))  # from_pretrained loads the folder (compression/hf.py)

    options: dict[str, list[Option]] = {}
    encoded: dict[str, list[Encoded | None]] = {}
    bitlinear: dict[str, dict[str, Any]] = {}
    n_done = 0
    for name, p in enc_params.items():
        own = owners[name]
        h = hessians.get(own[0]) if own is not None else None
        w = p.detach().float().cpu()
        options[name], encoded[name] = [], []
        is_bit = own is not None and isinstance(own[1], BitLinear)
        if is_bit:
            bitlinear[name] = {
                "eps": float(own[1].rms_norm.variance_epsilon if own[1].rms_norm is not None else own[1].rms_norm_eps),
                "bias": None if own[1].bias is None else True,
            }
        declined: list[str] = []
        for enc in encoders:
            e = None
            if is_bit == (enc.name == "ternary"):
                try:
                    e = enc.encode(w, h, seed=ctx.seed)
                except NotApplicable as exc:  # e.g. an exact encoder on a tensor that is not on its grid
                    declined.append(f"{enc.label()}: {exc}")
            if e is None:
                options[name].append(Option(1 << 62, float("inf")))
                encoded[name].append(None)
                continue
            dec = enc.decode(e)
            damage = output_damage(w, dec, h) if (h is not None or id(p) not in embeddings) else 0.0
            if id(p) in embeddings:
                freq = torch.zeros(w.shape[0], dtype=torch.float64)
                n = min(w.shape[0], counts.numel())
                freq[:n] = counts[:n] / counts.sum()
                damage += float((freq * ((w - dec).double() ** 2).sum(1)).sum())
            options[name].append(Option(e.nbytes, damage))
            encoded[name].append(e)
        if not any(e is not None for e in encoded[name]):
            why = "; ".join(declined) or "BitLinear weights need a 'ternary' candidate, other tensors another one"
            raise ConfigError(f"no candidate applies to {name} ({why})")
        n_done += 1
        ctx.tracker.progress(n_done, len(enc_params), f"measured candidates of {name}")
    t_measure = time.perf_counter() - t_start

    # The safetensors header holds ~100 bytes of JSON per stored field besides its key; the recipe is
    # written last, so a draft with the longest entries is written and measured now (x1.2 margin).
    header_allowance = sum(
        len(n) + 2 + len(f) + 120 for n, opts in encoded.items() for e in opts if e is not None for f in e.tensors
    ) // max(1, len(encoders))
    _draft_recipe(out, encoded, options, bitlinear, plain, encoders)
    fixed = int(artifact_bytes(out)["total"] + 0.2 * (out / RECIPE_FILE).stat().st_size)
    numel = sum(p.numel() for p in enc_params.values())
    budget = cfg.target_bytes - fixed - header_allowance if cfg.target_bytes else int(cfg.target_bpw * numel / 8)
    loss_scales: dict[str, dict[str, float]] = {}
    if cfg.damage_units == "loss" and len(encoders) > 1:  # one candidate: no choice to rescale, so no loss pass
        loss_scales = _damage_in_nats(model, enc_params, encoders, encoded, options, inputs.calib_ids, cfg, ctx)
    choice = choose(options, budget)

    # Sequential encode, reload from disk, evaluate, roll back.
    groups: dict[str, list[str]] = {}
    for name in enc_params:
        groups.setdefault(_group(name, cfg.layers_per_group), []).append(name)
    order = sorted(groups, key=lambda g: (g == "other", g))
    rolled_back: list[str] = []
    group_losses: list[tuple[int, float]] = []
    with torch.no_grad():
        for gi, g in enumerate(order):
            names = groups[g]
            for attempt in range(2):
                shard = write_shard(out, g, {n: encoded[n][choice[n]] for n in names}, {})
                fields, _ = read_shard(shard)
                for n in names:
                    if n in bitlinear:  # exact for the layer: its latent weight already yields these codes
                        continue
                    e = encoded[n][choice[n]]
                    dec = encoders[choice[n]].decode(Encoded(e.encoding, e.params, e.shape, fields[n]), torch.float32)
                    enc_params[n].data.copy_(dec.to(enc_params[n].device))
                loss = mean_loss(model, inputs.val_ids, cfg.eval_batch)
                if loss - base_val <= cfg.max_loss_increase or attempt == 1:
                    break
                rolled_back.append(g)
                for n in names:  # highest fidelity applicable candidate
                    valid = [i for i, e in enumerate(encoded[n]) if e is not None]
                    choice[n] = min(valid, key=lambda i: options[n][i].damage)
            group_losses.append((gi, loss))
            ctx.tracker.log_metrics({"val_loss_after_group": loss}, step=gi)

    recipe_tensors = {}
    for n in enc_params:
        e = encoded[n][choice[n]]
        recipe_tensors[n] = {
            "encoding": e.encoding,
            "params": e.params,
            "shape": list(e.shape),
            "shard": shard_name(_group(n, cfg.layers_per_group)),
            "payload_bytes": e.nbytes,
            "bits_per_weight": e.bits_per_weight,
            "damage": options[n][choice[n]].damage,
            **({"damage_scale": loss_scales[n]} if n in loss_scales else {}),
            **({"bitlinear": bitlinear[n]} if n in bitlinear else {}),
        }
    write_recipe(out, {"tensors": recipe_tensors, "plain": {n: plain_shard.name for n in plain}})
    t_total = time.perf_counter() - t_start

    # What is stored is what is measured: reload the folder and evaluate that.
    reloaded = load_compressed(out, torch.float32, ctx.device)
    probe = inputs.test_ids[:1, :64]
    with torch.no_grad():
        diff = float((reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max())
    if diff > RELOAD_LOGIT_TOLERANCE:
        raise QualityGateFailed(f"the reloaded artifact's logits differ from the compressed model's by {diff:.2e}")
    test_loss = mean_loss(reloaded, inputs.test_ids, cfg.eval_batch)
    val_loss = group_losses[-1][1] if group_losses else base_val
    sizes = artifact_bytes(out)
    if cfg.target_bytes is not None and sizes["total"] > cfg.target_bytes:
        raise QualityGateFailed(
            f"the written folder is {sizes['total']:,} bytes, over target_bytes {cfg.target_bytes:,} "
            f"(groups rolled back to higher fidelity: {rolled_back}); raise the budget or max_loss_increase"
        )
    by_encoding: dict[str, int] = {}
    for n, r in recipe_tensors.items():
        key = make_encoder({"name": r["encoding"], **r["params"]}).label()
        by_encoding[key] = by_encoding.get(key, 0) + enc_params[n].numel()
    metrics = {
        "bytes_total": float(sizes["total"]),
        "bytes_weights": float(sizes["weights"]),
        "bits_per_weight_encoded": 8.0 * sum(r["payload_bytes"] for r in recipe_tensors.values()) / numel,
        "input_test_loss": base_test,
        "test_loss": test_loss,
        "test_ppl_ratio": math.exp(test_loss - base_test),
        "input_val_loss": base_val,
        "val_loss": val_loss,
        "reload_max_logit_diff": diff,
        "wall_s_measure": t_measure,
        "wall_s_total": t_total,
        "groups_rolled_back": float(len(rolled_back)),
    }
    details = {"weights_by_encoding": by_encoding, "rolled_back": rolled_back, "recipe": str(out / RECIPE_FILE)}
    carried = [p for p in (out / AGENT_FILE, out / EXPERTS_DIR, *(out / n for n in inputs.attachments)) if p.exists()]
    metrics["bytes_attachments"] = float(sum(f.stat().st_size for p in carried
                                             for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()))
    if inputs.experts is not None:
        from forge_models.experts.library import load_experts

        rebased = load_experts(out / EXPERTS_DIR, model=reloaded)  # the stored vectors, on the stored weights
        metrics.update({f"experts_{k}": v for k, v in rebased.rebase_summary().items()})
        align = {n: _alignment(inputs.experts.bases[n], b) for n, b in rebased.bases.items()}
        metrics["experts_alignment_mean"] = sum(align.values()) / len(align)
        metrics["experts_alignment_min"] = min(align.values())
        details["experts_rebase"] = {n: {"s_rel_change": r.s_rel_change, "changed": r.changed, "alignment": align[n]}
                                     for n, r in rebased.rebased.items()}
    ctx.tracker.log_metrics(metrics)
    return PhaseOutput(
        models={"model": reloaded}, tokenizer=inputs.tokenizer, metrics=metrics, details=details,
        curves={"val_loss_after_group": group_losses},
    )


def _alignment(old: Any, new: Any) -> float:
    """Mean over the scaled directions i of ``|u_i . u'_i| * |v_i . v'_i|`` (1: the same directions in the same
    order; sign-invariant): how well direction i, whose z entry was trained on ``old``, survives in ``new``."""
    cu = (old.U.float() * new.U.float()).sum(0).abs()
    cv = (old.Vh.float() * new.Vh.float()).sum(1).abs()
    return float((cu * cv).mean())


def _check_experts(model: nn.Module, lib: Any) -> None:
    """Refuse (before compute) a library whose targets the model lacks, or that was trained on other weights."""
    from forge_models.experts.library import check_targets
    from forge_models.experts.svf import effective_weight, weight_fingerprint

    targets = lib.targets()
    check_targets(model, targets)
    modules = dict(model.named_modules())
    other = [t["name"] for t in targets
             if weight_fingerprint(effective_weight(modules[t["name"]]).cpu()) != t["fingerprint"]]
    if other:
        raise ConfigError(f"the expert library was trained on other weights than the input model's ({len(other)} "
                          f"targets differ, e.g. {other[0]}); compress the model stored with the library")


def _draft_recipe(out: Path, encoded, options, bitlinear, plain, encoders) -> None:
    """A recipe whose every entry is the longest of its tensor's options (to measure the recipe's size)."""
    entries = {}
    for n, opts in encoded.items():
        cands = []
        for i, e in enumerate(opts):
            if e is not None:
                cands.append({
                    "encoding": e.encoding, "params": e.params, "shape": list(e.shape), "shard": shard_name(_group(n)),
                    "payload_bytes": e.nbytes, "bits_per_weight": e.bits_per_weight, "damage": options[n][i].damage,
                    # the loss-units entry written later, at its longest (full-precision floats, longest label)
                    "damage_scale": {"reference": max((x.label() for x in encoders), key=len),
                                     "loss_increase": -0.012345678901234567, "scale": 1.2345678901234567e-05,
                                     "scale_from": "|loss_increase| (the loss did not rise)"},
                    **({"bitlinear": bitlinear[n]} if n in bitlinear else {}),
                })
        entries[n] = max(cands, key=lambda c: len(json.dumps(c)))
    write_recipe(out, {"tensors": entries, "plain": {n: shard_name("plain") for n in plain}})
