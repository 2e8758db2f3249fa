"""Prefect task for phase 8, final compression: every tensor in its chosen encoding, one loadable folder.

Input: the one model of the previous phase's artifact. A BitNet artifact (``model/`` with ``model/latent/``)
is rebuilt from its latent weights (`tasks.inputs.load_input_model`), so its BitLinear weights are stored
exactly as the ternary codes the layer computes with; anything else is loaded as a Hugging Face causal LM.

When the input carries what phase 7 attached (``experts/``, ``agent.json`` at its root), both travel into the
compressed folder: ``model/agent.json`` as it was and ``model/experts/`` basis-free (z only; the served agent
re-bases it on the decoded weights, see ``forge_models.experts.library``). Their bytes count in the folder's
size and budget. The report measures how far each target's singular values and directions moved and, per
skill on at most ``eval.max_examples`` held-out examples, the expert's effect on the input vs on the
compressed model.

When the input model folder carries Quiet-STaR's files (``quietstar.json``, ``quietstar_head.safetensors``, the
thought ids checked against the tokenizer before compute), both are copied as they are into the compressed folder
(counted in its size and budget; the mixing head stays float32, the thought rows are compressed with the
embeddings) and the reloaded compressed model is re-measured with vs without thoughts (``tasks.thoughts``).

Output prefix: ``model/`` — the compressed folder (``config.json``, tokenizer, ``recipe.json``,
``shard-*.safetensors``, and ``agent.json`` / ``experts/`` when carried; loads with
``forge_models.compression.artifact.load_compressed``), ``phase.json``, ``report.md`` and ``manifest.json`` (last).

Cache key: ``previous.digest`` is the sha256 of the input's manifest, which lists every file of the input
prefix with its sha256 (``experts/*`` and ``agent.json`` included), so a changed library or configuration
changes the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forge_models.eval import difference_lines
from forge_models.runtime import PhaseContext
from tasks.cache import phase_key
from tasks.inputs import input_model_folder, load_input_model
from tasks.config import ForgeConfig
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, metrics_table, phase_task
from tasks.store import ArtifactRef
from tasks import thoughts

COMPRESSION_VERSION = "6"  # 2: carries agent.json and the expert vectors; 3: and Quiet-STaR's files, re-measured; 4: grid encoding, damages in nats, compact tokenizer.json; 5: ECSQ candidates; 6: baked behaviour re-measured
EVAL_COLUMNS = list(HEADLINE_METRICS)


def compression_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"compression": config.compression.model_dump(mode="json"),
                          "eval": config.eval.model_dump(mode="json"), "seed": config.seed,
                          "precision": config.device.precision, "thoughts": thoughts.key_section(config)},
                         sort_keys=True)
    return phase_key("compression", COMPRESSION_VERSION, section, [previous.digest], dataset.digest)


def folder_bytes(folder: Path, exclude: str | None = None) -> int:
    """Bytes of the files under ``folder`` (``exclude``: a sub-folder left out), read from the disk."""
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and (exclude is None or exclude not in p.relative_to(folder).parts))


def input_attachments(model_root: Path, folder: Path) -> tuple[Path | None, Path | None]:
    """(expert library folder, agent.json) the input carries, each None when absent: at the input prefix's
    root (phase 7's layout), else in its model folder (a compressed folder's layout)."""
    for place in (model_root, folder):
        experts, agent = place / "experts", place / "agent.json"
        found = (experts if (experts / "manifest.json").is_file() else None, agent if agent.is_file() else None)
        if any(found):
            return found
    return None, None


def _effect_lines(effects: dict, metrics: dict) -> list[str]:
    lines = ["", "Each expert on its own skill (held-out examples, the same for both models; d = expert - base, "
             "paired; 95% bootstrap):", "",
             "| skill | n | d on input [95%] | d on compressed [95%] | d compressed - d input [95%] |",
             "|---|---|---|---|---|"]
    for k, row in effects.items():
        cells = []
        for what in ("d_input", "d_compressed", "d_change"):
            m = f"experts/{k}/{what}"
            cells.append(f"{metrics[m]:+.3f} [{metrics[m + '_lo']:+.3f}, {metrics[m + '_hi']:+.3f}]")
        lines.append(f"| {k} | {row} | " + " | ".join(cells) + " |")
    return lines


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)

        from forge_models import bitnet
        from forge_models.bitnet.layers import BitLinear
        from forge_models.compression.phase import CompressionConfig, CompressionInputs, run, token_blocks
        from forge_models.data import Corpus
        from forge_models.eval import evaluate, paired_metrics
        from forge_models.adas import AgentConfig
        from forge_models.experts import load_experts
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, None, previous.uri, None)
        model, latent_meta = load_input_model(folder)
        tokenizer = load_tokenizer(folder)
        thought_meta = thoughts.input_thoughts(folder, tokenizer, model)  # refused here, before any compute
        attachments = {}
        if thought_meta is not None:
            from forge_models.quietstar import THOUGHT_FILES

            attachments = {n: (folder / n).read_bytes() for n in THOUGHT_FILES}
        corpus = Corpus.load(dataset_dir / "corpus")
        cfg = config.compression
        experts_dir, agent_path = input_attachments(model_root, folder)
        library = load_experts(experts_dir, model=model) if experts_dir is not None else None
        agent_text = agent_path.read_text() if agent_path is not None else None
        if agent_path is not None:  # refused before compute if the served agent could not run it
            AgentConfig.from_artifact(agent_path, library.skills if library is not None else [])
        is_bitnet = any(isinstance(m, BitLinear) for m in model.modules())
        added = []
        if is_bitnet and not any(c.get("name") == "ternary" for c in cfg.candidates):
            # BitLinear weights only take the ternary encoding (exact for the layer); add it, in the
            # packing the BitNet phase used, rather than refusing the pipeline's default candidates.
            added = [{"name": "ternary", "packing": config.bitnet.packing}]
            cfg = CompressionConfig(**{**cfg.model_dump(), "candidates": (*added, *cfg.candidates)})
        train_texts = [e.text for e in corpus.split("train")]
        calib = token_blocks(tokenizer, train_texts, cfg.seq_len, cfg.calib_sequences)
        val = token_blocks(tokenizer, train_texts, cfg.seq_len, cfg.val_sequences, skip=cfg.calib_sequences)
        held_out = corpus.split(config.eval.split)
        # The pooled held-out text (eval sources are scored per source by the harness below).
        test = token_blocks(tokenizer, [e.text for e in held_out if not e.source], cfg.seq_len, cfg.test_sequences)

        out = run(CompressionInputs(model=model, tokenizer=tokenizer, calib_ids=calib, val_ids=val, test_ids=test,
                                    out_dir=out_dir / "model", experts=library, agent_config=agent_text,
                                    attachments=attachments), cfg, ctx)
        compressed = out.models["model"]  # reloaded from the written folder: what is stored is what is measured

        # The harness on the held-out split, input vs the reloaded artifact, paired on the same examples.
        before_o: dict[str, list[float]] = {}
        after_o: dict[str, list[float]] = {}
        before = evaluate(model.to(ctx.device), tokenizer, held_out, config.eval, ctx, before_o)
        after = evaluate(compressed, tokenizer, held_out, config.eval, ctx, after_o)
        after.update(paired_metrics(after_o, before_o, config.eval.bootstrap_samples, config.eval.bootstrap_seed))
        in_bytes = folder_bytes(folder, exclude=bitnet.LATENT_DIR)
        m = out.metrics
        metrics = {f"compression/{k}": float(v) for k, v in m.items()}
        metrics["compression/input_bytes"] = float(in_bytes)
        metrics["compression/ratio"] = in_bytes / m["bytes_total"]
        for k, v in before.items():
            metrics[f"input/{k}"] = float(v)
        for k, v in after.items():
            metrics[f"compressed/{k}"] = float(v)

        carried_lines: list[str] = []
        details = {k: v for k, v in out.details.items() if k != "recipe"}
        if library is not None or agent_text is not None:
            carried_lines = _carried(config, out, metrics, details, library, agent_text, experts_dir, model, compressed,
                                     tokenizer, held_out, out_dir / "model", ctx)

        thought_lines: list[str] = []
        if thought_meta is not None:
            found, thought_lines = thoughts.remeasure(out_dir / "model", compressed, tokenizer, held_out, config, ctx,
                                                      "compressed (reloaded, decoded)")
            metrics.update(found)
        found, behaviour_lines = baked_behaviour(config, model, compressed, tokenizer, held_out, ctx)
        metrics.update(found)

        recipe = json.loads((out_dir / "model" / "recipe.json").read_text())["tensors"]
        by_enc = out.details.get("weights_by_encoding", {})
        total_w = sum(by_enc.values()) or 1
        lines = [
            "# Phase 8: final compression",
            "",
            f"Input: `{previous.uri}/{name}`" + (" (BitNet: rebuilt from its latent weights; BitLinear weights "
                                                   "stored as their ternary codes)" if latent_meta else "")
            + f". Budget: " + (f"{cfg.target_bytes:,} bytes" if cfg.target_bytes else f"{cfg.target_bpw} bits "
                               "per encoded weight") + f"; retention bound {cfg.max_loss_increase} nats "
            f"(validation loss, train side). Held-out split: **{config.eval.split}**."
            + (f" Added candidate {added} (BitLinear weights)." if added else ""),
            "",
            metrics_table({"before": {"input": before}, "after": {"compressed": after}}, EVAL_COLUMNS),
            "", *difference_lines(after, "compressed - input"), "",
            "| measured | input | compressed |",
            "|---|---|---|",
            f"| bytes on disk (from the files) | {in_bytes:,}"
            + (" (packed folder, latent/ excluded)" if latent_meta else "") + f" | {int(m['bytes_total']):,} |",
            f"| loss on {cfg.test_sequences} x {cfg.seq_len} {config.eval.split} tokens (nats) | "
            f"{m['input_test_loss']:.4f} | {m['test_loss']:.4f} (ppl ratio {m['test_ppl_ratio']:.3f}) |",
            f"| validation loss, train side (nats) | {m['input_val_loss']:.4f} | {m['val_loss']:.4f} |",
            "",
            f"Ratio (input bytes / compressed bytes): {in_bytes / m['bytes_total']:.2f}x; encoded weights at "
            f"{m['bits_per_weight_encoded']:.2f} bits per weight; weights shards {int(m['bytes_weights']):,} bytes. "
            f"Reloaded-vs-working logits differ by at most {m['reload_max_logit_diff']:.1e}. Groups rolled back: "
            f"{out.details.get('rolled_back', [])}. Wall time {m['wall_s_total']:.1f} s.",
            "",
            "Recipe summary (share of encoded weights per encoding):",
            "",
            "| encoding | weights | share |",
            "|---|---|---|",
            *[f"| {k} | {v:,} | {v / total_w:.1%} |" for k, v in sorted(by_enc.items(), key=lambda kv: -kv[1])],
            "",
            f"{len(recipe)} tensors encoded; the full per-tensor recipe is `model/recipe.json`.",
            *carried_lines,
            *thought_lines,
            *behaviour_lines,
        ]
        return PhaseWritten(
            metrics=metrics, report_md="\n".join(lines) + "\n",
            params=sum(p.numel() for p in model.parameters()), curves=out.curves, details=details,
        )

    return body


def baked_behaviour(config: ForgeConfig, model: Any, compressed: Any, tokenizer: Any, held_out, ctx: PhaseContext
                    ) -> tuple[dict[str, float], list[str]]:
    """Phase 6's behaviour checks re-measured on the final artifact (issue: "after phase 8, the baked behaviour is
    re-measured"): the compression input and the reloaded compressed model, both without any prompt, on the
    held-out system-dialogue questions, paired. Only when the run baked a checkable system prompt."""
    from forge_models.baking.behaviour import BEHAVIOURS, baked_spec, behaviour_cases, compare, run_cases

    c = config.baking
    if "baking" not in config.phases or not c.prompts or not c.max_behaviour_inputs:
        return {}, []
    spec = baked_spec([p.prompt_text() for p in c.prompts])
    if spec is None:
        return {}, ["", "Baked behaviour: not re-measured (the baked prompts are not a checkable system prompt)."]
    cases = behaviour_cases(held_out, spec, c.max_behaviour_inputs)
    if len(cases) < 2:
        return {}, ["", f"Baked behaviour: not re-measured ({len(cases)} held-out system-dialogue questions)."]
    kw = dict(ctx=ctx, max_new_tokens=c.behaviour_max_new_tokens)
    runs = {"input_plain": run_cases(model, tokenizer, cases, spec, prompted=False, **kw),
            "compressed_plain": run_cases(compressed, tokenizer, cases, spec, prompted=False, **kw)}
    found = compare(runs, "compressed_plain", "compression/behaviour", config.eval.bootstrap_seed)
    rows = []
    for b in BEHAVIOURS:
        k = f"compression/behaviour/{b}"
        if f"{k}/compressed_plain" in found:
            d = f"{k}/compressed_plain_minus_input_plain"
            rows.append(f"| {b} | {int(found[k + '/n'])} | {found[k + '/input_plain']:.3f} | "
                        f"{found[k + '/compressed_plain']:.3f} | {found[d]:+.3f} [{found[d + '_lo']:+.3f}, "
                        f"{found[d + '_hi']:+.3f}] |")
    return found, ["", f"Baked behaviour, re-measured without any prompt (persona {spec.persona}, tools "
                       f"{list(spec.tools)}; held-out system-dialogue questions, tool loop, greedy; 95% intervals):", "",
                   "| behaviour | n | input | compressed | compressed - input |", "|---|---|---|---|---|", *rows]


def _carried(config, out, metrics, details, library, agent_text, experts_dir, model, compressed, tokenizer, held_out,
             folder: Path, ctx: PhaseContext) -> list[str]:
    """Report lines (and metrics) on what phase 7 attached and this phase carried into ``folder``."""
    from forge_models.eval import paired_difference
    from forge_models.experts import load_experts
    from forge_models.experts.phase import skill_effects

    m = out.metrics
    lines = ["", "## Carried from phase 7", ""]
    if agent_text is not None:
        lines.append(f"- `agent.json` (the chosen agent configuration), copied as it was: "
                     f"{(folder / 'agent.json').stat().st_size:,} bytes.")
    if library is None:
        return lines
    vec_bytes = folder_bytes(folder / "experts")
    lines += [
        f"- `experts/` basis-free: {len(library.skills)} experts ({', '.join(library.skills)}) over "
        f"{int(m['experts_targets'])} targets, {vec_bytes:,} bytes (the input's library with its fp32 basis: "
        f"{folder_bytes(experts_dir):,} bytes). Attachments in all: {int(m['bytes_attachments']):,} bytes, "
        "counted in the folder's size and budget.",
        f"- **Deviation**: the z vectors were trained on the SVD basis of the uncompressed weights; loading re-bases "
        f"them on the SVD of the decoded compressed weights. {int(m['experts_targets_changed'])} of "
        f"{int(m['experts_targets'])} target weights changed; relative change of the singular values "
        f"||S_compressed - S_input|| / ||S_input|| (over the directions z scales): mean "
        f"{m['experts_s_rel_change_mean']:.3g}, max {m['experts_s_rel_change_max']:.3g}. Alignment of the singular "
        f"directions with the trained ones (mean over directions of |u.u'| |v.v'|; 1 = unchanged): mean "
        f"{m['experts_alignment_mean']:.3f}, lowest target {m['experts_alignment_min']:.3f}.",
        "", "| target | weights changed | singular values, relative change | direction alignment |",
        "|---|---|---|---|",
        *[f"| {n} | {'yes' if r['changed'] else 'no'} | {r['s_rel_change']:.3g} | {r['alignment']:.3f} |"
          for n, r in details.get("experts_rebase", {}).items()],
    ]
    carried = load_experts(folder / "experts", model=compressed)  # the stored vectors on the stored weights
    n = config.eval.max_examples
    before = skill_effects(model, tokenizer, library, held_out, config.eval, ctx, n)
    after = skill_effects(compressed, tokenizer, carried, held_out, config.eval, ctx, n)
    bs, seed = config.eval.bootstrap_samples, config.eval.bootstrap_seed
    counts = {}
    for k, (bi, ei) in before.items():
        bc, ec = after[k]
        di, dc = [e - b for e, b in zip(ei, bi)], [e - b for e, b in zip(ec, bc)]
        for what, (a, b) in {"d_input": (ei, bi), "d_compressed": (ec, bc), "d_change": (dc, di)}.items():
            d, lo, hi = paired_difference(a, b, bs, seed)
            metrics.update({f"experts/{k}/{what}": d, f"experts/{k}/{what}_lo": lo, f"experts/{k}/{what}_hi": hi})
        metrics[f"experts/{k}/n"] = float(len(bi))
        counts[k] = len(bi)
    if counts:
        lines += _effect_lines(counts, metrics)
    else:
        lines += ["", f"No held-out ({config.eval.split}) examples of the experts' skills: their effect was not "
                  "measured."]
    return lines


compression_task = phase_task(
    "compression", kind="model", key=compression_key, body=_body, section="compression",
    doc="Compress (or reuse) the previous phase's model into its final artifact.",
)
