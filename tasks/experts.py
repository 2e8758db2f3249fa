"""Prefect task for phase 7, experts: SVF expert vectors per skill on the previous phase's model.

Input: the one model of the previous phase's artifact (a BitNet folder is rebuilt from its latent weights,
so its BitLinear targets get the ternary side-term form; see forge_models/experts/svf.py).

Output prefix: ``model/`` — the input model folder, copied byte for byte (SVF never changes base weights);
``experts/`` — the expert library (``basis.safetensors``, ``experts.safetensors``, ``experts.json``, its own
``manifest.json`` last; load with ``forge_models.experts.load_experts``); with ``experts.adas.enabled`` (default),
``agent.json`` — the chosen ADAS ``AgentConfig`` (what the served agent runs); ``phase.json``, ``report.md`` and
``manifest.json`` (last).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from forge_models.runtime import PhaseContext
from tasks.cache import phase_key
from tasks.config import ForgeConfig
from tasks import thoughts
from tasks.inputs import input_model_folder, load_input_model
from tasks.runtime import HEADLINE_METRICS, PhaseWritten, metrics_table, phase_task, prefect_artifact
from tasks.store import ArtifactRef

EXPERTS_VERSION = "4"  # 2: optional ADAS search, agent.json; 3: thought budgets searched with Quiet-STaR;
# 4: dispatch designs (and the expert-dispatch seed) in the search, the archive in the report


def experts_key(config: ForgeConfig, dataset: ArtifactRef, previous: ArtifactRef) -> str:
    section = json.dumps({"experts": config.experts.model_dump(mode="json"),
                          "eval": config.eval.model_dump(mode="json"), "seed": config.seed,
                          "precision": config.device.precision}, sort_keys=True)
    return phase_key("experts", EXPERTS_VERSION, section, [previous.digest], dataset.digest)


def _cell(m: dict, key: str) -> str:
    if f"{key}_lo" in m:
        return f"{m[key]:.3f} [{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]"
    return f"{m[key]:.3f}"


def _verdict(m: dict, key: str) -> str:
    lo, hi = m[f"{key}_lo"], m[f"{key}_hi"]
    return "within noise" if lo <= 0 <= hi else ("better" if m[key] > 0 else "worse")


def _fewshot_lines(m: dict, alphas: dict | None, c) -> list[str]:
    """The few-shot mixing table (experts.fewshot_shots > 0), or nothing."""
    if not alphas:
        return []
    rows = [f"| {k} | {m[f'{k}/fewshot_score']:.3f} | "
            + ", ".join(f"{e} {a:.2f}" for e, a in alpha.items()) + f" | {_cell(m, f'{k}/mixture')} | "
            f"{_cell(m, f'{k}/mixture_minus_base')} ({_verdict(m, f'{k}/mixture_minus_base')}) | "
            f"{_cell(m, f'{k}/mixture_minus_expert')} ({_verdict(m, f'{k}/mixture_minus_expert')}) |"
            for k, alpha in alphas.items()]
    return ["", f"Few-shot mixing: alpha by CEM (population {c.cem_population}, elite {c.cem_elite}, "
                f"{c.cem_iterations} iterations) on {c.fewshot_shots} train examples per skill, ties broken by the "
                "log-likelihood of the correct answers; the mixture on the same held-out examples (paired):", "",
            "| skill | few-shot score | alpha | mixture | mixture - base | mixture - own expert |",
            "|---|---|---|---|---|---|", *rows]


def _flat(rows: list[dict]) -> list[dict]:
    """Rows with nested values as JSON text (tables take scalars)."""
    return [{k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v) for k, v in r.items()}
            for r in rows]


def _adas_report(found) -> list[str]:
    r = found.result
    lines = ["", "## Agent configuration search (ADAS)", "",
             f"{len(r.archive)} designs (seeds + {r.config.generations} x {r.config.population} proposals; "
             f"{len(r.rejected)} rejected) scored on {len(found.validation)} **validation** questions "
             f"({found.search_s:.1f} s); the test split ({len(found.test)} questions, {found.dropped_overlap} dropped "
             f"for sharing a prompt with validation) read once afterwards ({found.final_s:.1f} s). Chosen and stored "
             f"as `agent.json`: `{found.chosen.to_json()}`.", "",
             "| role | agent | test acc [95%] | winner - agent [95%] | verdict | calls/q | tokens/q | s/q |",
             "|---|---|---|---|---|---|---|---|"]
    for row in found.comparison:
        lines.append(
            f"| {row['role']} | {row['name']} | {row['test_accuracy']:.3f} [{row['test_low']:.3f}, {row['test_high']:.3f}] "
            f"| {row['winner_minus_this']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}] | {row['verdict']} "
            f"| {row['calls_per_query']:.2f} | {row['prompt_tokens_per_query'] + row['completion_tokens_per_query']:.0f} "
            f"| {row['seconds_per_query']:.4f} |")
    lines += ["", "The archive (every design, never pruned; ranked by the bootstrap median on validation):", "",
              "| # | generation | origin | design | validation fitness | calls/q | tokens/q |", "|---|---|---|---|---|---|---|"]
    for row in r.rows():
        lines.append(f"| {row['index']} | {row['generation']} | {row['origin']} | `{row['config_json'] or row['name']}` | "
                     f"{row['fitness']} | {row['calls_per_query']:.2f} | "
                     f"{row['prompt_tokens_per_query'] + row['completion_tokens_per_query']:.0f} |")
    return lines


def _body(config: ForgeConfig, previous: ArtifactRef):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        import forge_models  # noqa: F401  (registers Cognate)

        from forge_models.data import Corpus
        from forge_models.eval import evaluate
        from forge_models.experts import ExpertsInputs, run
        from forge_models.tokenizer import load_tokenizer

        dataset_dir, model_root = inputs
        name, folder = input_model_folder(model_root, config.experts.input_model, previous.uri,
                                          "experts.input_model")
        model, latent_meta = load_input_model(folder)
        model.to(ctx.device)
        tokenizer = load_tokenizer(folder)
        thought_meta = thoughts.input_thoughts(folder, tokenizer, model)  # refused here, before any compute
        corpus = Corpus.load(dataset_dir / "corpus")
        shutil.copytree(folder, out_dir / "model")  # the base weights are the input's, byte for byte
        out = run(ExpertsInputs(model, tokenizer, corpus, config.eval, out_dir / "experts"), config.experts, ctx)

        # ---- ADAS HOOK: the agent-configuration search over the stored library (forge_models/experts/agent.py).
        adas_lines, adas_metrics, tables = ["", "Agent configuration search (ADAS): off (`experts.adas.enabled=false`)."], {}, {}
        adas_details: dict = {}
        if config.experts.adas.enabled:
            from forge_models.experts import load_experts
            from forge_models.experts.agent import search_agent

            thinker = None
            if thought_meta is not None:  # Quiet-STaR: thought budgets are searched
                from forge_models.experts.agent import QuietStarThinker
                from forge_models.quietstar import attach_thoughts

                thinker = QuietStarThinker(attach_thoughts(model, folder, tokenizer))
            from forge_models.adas import AgentConfig

            mixtures = [AgentConfig(name=f"cem-{k}", experts=alpha)  # the phase's few-shot mixtures, as seeds
                        for k, alpha in out.details.get("fewshot_alpha", {}).items() if sum(alpha.values()) > 0]
            found = search_agent(model, tokenizer, load_experts(out_dir / "experts"), corpus, config.experts.adas, ctx,
                                 thinker=thinker, max_thought_budget=config.experts.adas.max_thought_budget,
                                 extra_seeds=mixtures)
            # Written before the manifest (phase_task writes it last), so agent.json is covered by it.
            (out_dir / "agent.json").write_text(found.chosen.to_json() + "\n")
            adas_metrics = found.metrics()
            tables = {"adas_archive.json": found.result.rows(), "adas_final.json": _flat(found.comparison)}
            prefect_artifact("create_table_artifact", key="experts-adas-archive", table=_flat(found.result.rows()),
                             description="ADAS archive: every design evaluated on the validation split")
            prefect_artifact("create_table_artifact", key="experts-adas-final", table=_flat(found.comparison),
                             description="ADAS final comparison on the test split (read once)")
            adas_lines = _adas_report(found)
            adas_details = {"agent": found.chosen.model_dump(mode="json"), "touched_by_search": found.touched_by_search,
                            "test_touched": sorted(found.splits.touched["test"]), "rejected": found.result.rejected}
        # ------------------------------------------------------------------------------------------------

        held_out = corpus.split(config.eval.split)
        base_eval = evaluate(model, tokenizer, held_out, config.eval, ctx)
        m, c = out.metrics, config.experts
        skills = c.skills
        lines = [
            "# Phase 7: SVF experts", "",
            f"Input: `{previous.uri}/{name}`" + (" (BitNet: BitLinear targets use the ternary side-term form)"
                                                  if latent_meta else "")
            + f". Trained on the train split only; measured on **{config.eval.split}** with the stored, reloaded "
            f"library. Targets: layers matching {c.targets} ({out.details['targets']} matrices, "
            f"{out.details['ternary_targets']} ternary); {int(m['z_per_expert']):,} z entries per expert = "
            f"{m['overhead_per_expert']:.3%} of {out.details['base_params']:,} base parameters "
            f"({m['overhead_all_experts']:.3%} for all {len(skills)}). {c.steps} steps per expert.", "",
            "The model's weights are unchanged (its folder is the input's, copied):", "",
            metrics_table({"after": {"model (unchanged)": base_eval}}, list(HEADLINE_METRICS)), "",
            "Each expert on its own skill vs the base, same examples (95% bootstrap; d = paired difference):", "",
            "| skill | metric | objective | n | base | expert | d = expert - base | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        from forge_models.experts import skill_with

        for k in skills:
            sk = skill_with(k, c.objectives.get(k))
            lines.append(f"| {k} | {sk.metric} | {sk.objective} | {int(m[f'{k}/n'])} | {_cell(m, f'{k}/base')} | "
                         f"{_cell(m, f'{k}/expert')} | {_cell(m, f'{k}/d')} | {_verdict(m, f'{k}/d')} |")
        lines += [
            "", f"Mixed set ({int(m['mixed/n'])} examples, every skill; each scored by its own metric). Dispatch "
            f"'{c.dispatch}': the model classifies each prompt (first pass), then answers with that expert (second "
            f"pass; unknown -> base). Classification accuracy {m['dispatch/accuracy']:.3f}, unknown "
            f"{m['dispatch/unknown_share']:.3f}; best single expert: {out.details['best_single']} (chosen on "
            "this same set, which favours it).", "",
            "| model | mixed accuracy |", "|---|---|",
            f"| base | {_cell(m, 'mixed/base')} |", f"| best single expert | {_cell(m, 'mixed/best_single')} |",
            f"| two-pass dispatch | {_cell(m, 'mixed/dispatch')} |", "",
            f"- dispatch - base: {_cell(m, 'mixed/dispatch_minus_base')} ({_verdict(m, 'mixed/dispatch_minus_base')})",
            f"- dispatch - best single: {_cell(m, 'mixed/dispatch_minus_best_single')} "
            f"({_verdict(m, 'mixed/dispatch_minus_best_single')})", "",
            "Expert x skill accuracy (rows: expert applied; columns: skill): ", "",
            "| expert | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills),
            *[f"| {e} | " + " | ".join(f"{out.details['cross'][e][k]:.3f}" for k in skills) + " |"
              for e in ["base", *skills]],
            *_fewshot_lines(m, out.details.get("fewshot_alpha"), c),
            *adas_lines,
        ]
        metrics = {f"experts/{k}": float(v) for k, v in m.items()}
        metrics.update({f"model/{k}": float(v) for k, v in base_eval.items()})
        metrics.update({f"experts/{k}": float(v) for k, v in adas_metrics.items()})
        return PhaseWritten(metrics=metrics, report_md="\n".join(lines) + "\n", params=out.details["base_params"],
                            steps_run=c.steps * len(skills), curves=out.curves, details={**out.details, "adas": adas_details},
                            tables=tables)

    return body


experts_task = phase_task(
    "experts", kind="model", key=experts_key, body=_body, section="experts",
    doc="Train (or reuse) SVF experts per skill on the previous phase's model.",
)
