"""Prefect task for phase 6, prompt baking: the previous phase's model behaves without its prompts as it did with them.

Input: the one model of the previous phase's artifact (a BitNet artifact is rebuilt from its latent weights and
stored again as packed + ``latent/``). Output prefix: ``model/`` (the baked model, the input's format),
``halfbake/<prompt>/step-*.safetensors`` (the half-baked LoRA adapters, early-stop checkpoints),
``baking_curve.png``, ``phase.json``, ``report.md`` and ``manifest.json`` (last). Every KL in the report is
measured on ``model/`` after reloading it. An input carrying Quiet-STaR's files (``quietstar.json``,
``quietstar_head.safetensors``) gets them copied into ``model/`` and re-measured with vs without thoughts on the
reloaded baked model (``tasks.thoughts``).
"""

from __future__ import annotations

import json
from pathlib import Path

from forge_models.eval import difference_lines
from forge_models.runtime import PhaseContext
from tasks.cache import phase_key
from tasks.config import ForgeConfig
from tasks.inputs import input_model_folder, load_input_model
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, loss_curve_png, metrics_table, phase_task
from tasks.store import ArtifactRef
from tasks import thoughts

BAKING_VERSION = "4"  # 2: Quiet-STaR files carried and re-measured; 3: plain system slot, behaviour checks;
# 4: held-out text retention measured against baking.max_text_loss_rise
MAX_TRAIN_INPUTS = 4096


def baking_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    # A prompt given as a file enters the key by its text, so editing the file re-bakes.
    texts = {p.name: p.prompt_text() for p in config.baking.prompts}
    section = json.dumps({"baking": config.baking.model_dump(mode="json"), "texts": texts,
                          "eval": config.eval.model_dump(mode="json"), "seed": config.seed,
                          "thoughts": thoughts.key_section(config)}, sort_keys=True)
    return phase_key("baking", BAKING_VERSION, section, [previous.digest], dataset.digest)


def task_inputs(examples) -> list[str]:
    """The user prompts of answer-checked examples, deduplicated in order (the inputs x baking conditions on).
    A system dialogue's prompt loses its system line (``User: Q\nAssistant:``): the baked prompt takes that slot."""
    from forge_models.data.system_prompts import plain_turn

    return list(dict.fromkeys(plain_turn(e.prompt) for e in examples if e.prompt))


def retention_texts(held_out) -> dict[str, list[str]]:
    """The held-out text baking must not damage: every held-out-only eval source (real text, ``data.eval_sources``)
    by name, and the held-out corpus (``heldout_corpus``: the pooled synthetic examples)."""
    from forge_models.data import is_eval_unit, without_eval_units

    texts: dict[str, list[str]] = {}
    for ex in filter(is_eval_unit, held_out):
        texts.setdefault(ex.source, []).append(ex.text)
    corpus = [ex.text for ex in without_eval_units(held_out)]
    return {**texts, "heldout_corpus": corpus} if corpus else texts


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)

        from forge_models import baking
        from forge_models.data import Corpus
        from forge_models.eval import evaluate, paired_metrics
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, config.baking.input_model, previous.uri, "baking.input_model")
        model, latent_meta = load_input_model(folder)
        bitnet_meta = None
        if latent_meta is not None:
            packed = json.loads((folder / "bitnet.json").read_text())
            bitnet_meta = {"packing": packed["packing"], "kept_dtype": packed["kept_dtype"],
                           "keep_patterns": latent_meta["keep_patterns"], "act_norm": latent_meta["act_norm"]}
        tokenizer = load_tokenizer(folder)
        thought_meta = thoughts.input_thoughts(folder, tokenizer, model)  # refused here, before any compute
        corpus = Corpus.load(dataset_dir / "corpus")
        held_out = corpus.split(config.eval.split)
        # The harness on the input first: the phase bakes the input model in place.
        before_o: dict[str, list[float]] = {}
        after_o: dict[str, list[float]] = {}
        before = evaluate(model.to(ctx.device), tokenizer, held_out, config.eval, ctx, before_o)
        out = baking.run(baking.BakingInputs(
            model=model, tokenizer=tokenizer, train_inputs=task_inputs(corpus.split("train"))[:MAX_TRAIN_INPUTS],
            heldout_inputs=task_inputs(held_out), out_dir=out_dir / "model", bitnet_meta=bitnet_meta,
            halfbake_dir=out_dir / "halfbake", behaviour_examples=held_out,
            retention_texts=retention_texts(held_out), retention_seq_len=config.eval.seq_len,
            retention_max_tokens=config.eval.ppl_max_tokens), config.baking, ctx)
        after = evaluate(out.models["model"], tokenizer, held_out, config.eval, ctx, after_o)  # the reloaded model
        after.update(paired_metrics(after_o, before_o, config.eval.bootstrap_samples, config.eval.bootstrap_seed))
        metrics = dict(out.metrics)
        metrics.update({f"input/{k}": float(v) for k, v in before.items()})
        metrics.update({f"baked/{k}": float(v) for k, v in after.items()})
        thought_lines: list[str] = []
        if thought_meta is not None:
            from forge_models.quietstar import copy_thoughts

            copy_thoughts(folder, out_dir / "model")
            found, thought_lines = thoughts.remeasure(out_dir / "model", out.models["model"], tokenizer, held_out,
                                                      config, ctx, "baked (reloaded)")
            metrics.update(found)
        curves = {k: v for k, v in out.curves.items() if k.endswith("/train_kl")}
        if curves:
            loss_curve_png(curves, out_dir / "baking_curve.png", f"Prompt baking of {name}: train KL per token")

        m, c = metrics, config.baking
        rows = []
        for p in c.prompts:
            k = f"baking/{p.name}"
            d = out.details["prompts"][p.name]
            half = ", ".join(f"{s}: {v:.4f}" for s, v in d["half_baked"])
            rows.append(
                f"| {p.name} | {d['prompt_tokens']} | {m[f'{k}/kl_input']:.4f} [{m[f'{k}/kl_input_lo']:.4f}, "
                f"{m[f'{k}/kl_input_hi']:.4f}] | {m[f'{k}/kl_baked']:.4f} [{m[f'{k}/kl_baked_lo']:.4f}, "
                f"{m[f'{k}/kl_baked_hi']:.4f}] | {m[f'{k}/kl_ratio']:.3f} | "
                f"{'met' if m[f'{k}/goal_met'] else 'not met'} ({m[f'{k}/goal_margin']:+.4f} "
                f"[{m[f'{k}/goal_margin_lo']:+.4f}, {m[f'{k}/goal_margin_hi']:+.4f}]) | "
                f"{m[f'{k}/kl_reprompted']:.4f} | {half} |")
        lines = [
            "# Phase 6: prompt baking", "",
            f"Input: `{previous.uri}/{name}`" + (" (BitNet: trained through the quantised forward pass, merged into "
                                                   "the latent weights and re-ternarised)" if bitnet_meta else "")
            + f". Prompts baked in order: {[p.name for p in c.prompts]}; {c.steps} steps each, LoRA r {c.lora.rank} "
            f"alpha {c.lora.alpha}, lr {c.lr}, {c.inputs_per_step} x {c.samples_per_input} fresh {c.trajectory_tokens}-"
            f"token trajectories per step at T {c.temperature}.", "",
            "Held-out KL per generated token (nats), teacher = the input model with all baked prompts, measured on "
            "the stored model after reloading; 95% bootstrap intervals over held-out inputs. Goal: baked <= "
            f"{baking.GOAL_RATIO} x input (paired margin baked - {baking.GOAL_RATIO} x input < 0).", "",
            "| prompt | prompt tokens | input, unprompted | baked, unprompted | ratio | goal | baked, re-prompted | "
            "half-baked held-out KL by step (vs its own teacher) |",
            "|---|---|---|---|---|---|---|---|", *rows, "",
            *behaviour_lines(m, out.details.get("behaviour", {})), "",
            *retention_lines(m, c.max_text_loss_rise), "",
            "Harness, input vs the reloaded baked model (each without any system prompt):", "",
            metrics_table({"before": {"input": before}, "after": {"baked": after}}, list(HEADLINE_METRICS)), "",
            *difference_lines(after, "baked - input"), "", *thought_lines,
        ]
        return PhaseWritten(metrics=metrics, report_md="\n".join(lines) + "\n", params=int(out.details["params"]),
                            steps_run=c.steps * len(c.prompts), curves=out.curves,
                            details={k: v for k, v in out.details.items() if k != "params"})

    return body


def retention_lines(m: dict[str, float], bound: float) -> list[str]:
    """The held-out text table of the report: loss per window, input before vs stored model after, paired."""
    names = sorted({k.split("/")[2] for k in m if k.startswith("baking/text/") and k.endswith("/loss_rise")})
    if not names:
        return ["Held-out text: not measured (no held-out text)."]
    rows = []
    for n in names:
        k = f"baking/text/{n}"
        rows.append(f"| {n} | {int(m[f'{k}/windows'])} | {m[f'{k}/ppl_before']:.3f} | {m[f'{k}/ppl_after']:.3f} | "
                    f"{m[f'{k}/loss_rise']:+.4f} [{m[f'{k}/loss_rise_lo']:+.4f}, {m[f'{k}/loss_rise_hi']:+.4f}] | "
                    f"{'met' if m[f'{k}/goal_met'] else 'not met'} |")
    return [f"Held-out text (never trained on), loss per window, the input before baking vs the stored model after; "
            f"95% paired bootstrap interval; goal: upper end of the rise <= {bound} nats/token "
            "(`baking.max_text_loss_rise`):", "",
            "| text | windows | perplexity, input | perplexity, baked | loss rise (nats/token) [95%] | goal |",
            "|---|---|---|---|---|---|", *rows]


def behaviour_lines(m: dict[str, float], facts: dict) -> list[str]:
    """The behaviour table of the report (forge_models.baking.behaviour), or why there is none."""
    spec = facts.get("spec")
    if spec is None:
        return ["Behaviour: not checked (the prompts, joined in order, are not a system prompt of the corpus's "
                "family, so no checker knows their rules)."]
    if "baking/behaviour/persona_adherence/n" not in m:
        return [f"Behaviour: not checked ({facts.get('cases', 0)} held-out system-dialogue questions; need >= 2)."]
    rows = []
    for b in ("persona_adherence", "answer_correct", "tool_policy"):
        k = f"baking/behaviour/{b}"
        if f"{k}/baked_plain" not in m:
            continue
        cells = [f"{m[f'{k}/{r}']:.3f} [{m[f'{k}/{r}_lo']:.3f}, {m[f'{k}/{r}_hi']:.3f}]"
                 for r in ("input_prompted", "input_plain", "baked_plain")]
        diffs = [f"{m[d]:+.3f} [{m[d + '_lo']:+.3f}, {m[d + '_hi']:+.3f}]" for d in (
            f"{k}/input_prompted_minus_input_plain", f"{k}/baked_plain_minus_input_prompted")]
        rows.append(f"| {b} | {int(m[f'{k}/n'])} | {' | '.join(cells)} | {' | '.join(diffs)} |")
    goal = m.get("baking/behaviour/goal_met")
    verdict = ("not decidable: the prompt does not measurably change the input's persona adherence or answers, "
               "so reaching its level needs no bake" if goal is None else "met" if goal else "not met")
    return [f"Behaviour on held-out system-dialogue questions (persona {spec['persona']}, tools {spec['tools']}; "
            "tool loop, greedy; 95% bootstrap intervals; goal: baked without the prompt - input with it has an "
            "upper end >= 0 for persona adherence and answer correctness, each counted only where the prompt "
            f"changes the input measurably: {verdict}):", "",
            "| behaviour | n | input, prompted | input, unprompted | baked, unprompted | prompt effect on input | "
            "baked - input prompted |", "|---|---|---|---|---|---|---|", *rows]


baking_task = phase_task(
    "baking", kind="model", key=baking_key, body=_body, section="baking",
    doc="Bake (or reuse) the configured prompts into the previous phase's model.",
)
