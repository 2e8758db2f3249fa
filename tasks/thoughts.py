"""Quiet-STaR's thought machinery through the later model phases (BitNet, the Forge loop, baking, compression).

Phase 3 stores a plain Hugging Face folder plus ``quietstar.json`` (thought token ids, its config) and
``quietstar_head.safetensors`` (the float32 mixing head). A later phase whose input model folder carries both:

1. refuses before any compute when the stored ids are not its tokenizer's ``<|startthought|>`` /
   ``<|endthought|>`` or the model has no such rows (:func:`input_thoughts`);
2. copies both files, byte for byte, into its output model folder (the head is never quantised), so they
   travel to the end of the pipeline and are listed in each manifest;
3. rebuilds the thinking model around the model **it stored** (reloaded from its output folder) with
   :func:`forge_models.quietstar.attach_thoughts` and measures with vs without thoughts on the held-out split
   (:func:`remeasure`): ``thoughts/...`` metrics and a table in its report.

The phases do not keep training the Quiet-STaR objective: the trunk changes under the head; the head and the
thought embedding rows stay as phase 3 left them, except where the phase's own training moved those rows.
A folder without the two files is a plain model: nothing here runs and nothing changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from forge_models.runtime import PhaseContext

MEASURE_FIELDS = ("eval_examples", "gen_examples")
"""The fields of ``config.quietstar`` the re-measurement takes (how many held-out examples); everything else
(thought count, sampling temperature, sequence length) is the stored config the model was trained with."""


def key_section(config: Any) -> dict[str, int]:
    """What a later phase's cache key adds for the re-measurement (its output's metrics depend on it)."""
    return {f: getattr(config.quietstar, f) for f in MEASURE_FIELDS}


def input_thoughts(folder: Path, tokenizer: Any, model: Any) -> dict[str, Any] | None:
    """``quietstar.json`` of the input model folder, checked against the tokenizer and the model's embedding
    rows (ArtifactIntegrityError on a mismatch); None for a plain model folder."""
    from forge_models.quietstar import check_thought_ids, read_thoughts

    meta = read_thoughts(folder)
    if meta is not None:
        check_thought_ids(meta, tokenizer, model.get_input_embeddings().weight.shape[0],
                          str(Path(folder) / "quietstar.json"))
    return meta


def reload_stored(folder: Path, device: torch.device) -> Any:
    """The model a phase stored in ``folder``: a packed BitNet folder with the integer-inference loader (what
    runs), anything else with ``from_pretrained`` (float32)."""
    import forge_models  # noqa: F401  (registers Cognate)
    from transformers import AutoModelForCausalLM

    from forge_models import bitnet
    from tasks.runtime import MODEL_LOAD_LOCK

    if (Path(folder) / "bitnet.json").is_file():
        return bitnet.load_packed(folder, device=device)
    with MODEL_LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    return model.to(device).eval()


def remeasure(folder: Path, model: Any, tokenizer: Any, held: Sequence[Any], config: Any, ctx: PhaseContext,
              phase: str) -> tuple[dict[str, float], list[str]]:
    """With vs without thoughts on ``model`` (the one stored in ``folder``, which carries the Quiet-STaR files):
    ``thoughts/...`` metrics and the report section."""
    from forge_models.quietstar import attach_thoughts, measure_thoughts

    qs = attach_thoughts(model, folder, tokenizer)
    cfg = qs.cfg.model_copy(update=key_section(config))
    m = measure_thoughts(qs, tokenizer, held, cfg, ctx, config.eval)
    metrics = {f"thoughts/{k}": float(v) for k, v in m.items()}
    lines = [
        "", "## With vs without thoughts after this phase", "",
        f"The input carried Quiet-STaR's `quietstar.json` and `quietstar_head.safetensors` (float32 mixing head); "
        f"both are copied into `model/`. The thinking model is rebuilt around the {phase} model as stored (reloaded "
        f"from `model/`; its own thought rows, ids {qs.start_id}/{qs.end_id} checked against the tokenizer) and "
        f"thinks {cfg.thought_tokens} tokens. Not trained further here: the mixing head is phase 3's. Held-out "
        f"**{config.eval.split}**, paired bootstrap 95%:", "",
        *thought_table(metrics, "thoughts"),
        "", f"Mean |w| of the mixing head on held-out text: {fmt_value(metrics.get('thoughts/w_abs_heldout'))}.",
    ]
    return metrics, lines


def fmt_value(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def thought_table(m: dict[str, float], prefix: str) -> list[str]:
    """The with-vs-without table of :func:`forge_models.quietstar.measure_thoughts` metrics under ``prefix/``."""
    g = lambda k: m.get(f"{prefix}/{k}")  # noqa: E731
    rows = ["| measure | without | with | gain [95% interval] |", "|---|---|---|---|"]
    if g("nll_without") is not None:
        rows.append(f"| next-token NLL, text ({int(g('n_text') or 0)} ex.; gain = without - with) | "
                    f"{fmt_value(g('nll_without'))} | {fmt_value(g('nll_with'))} | {fmt_value(g('nll_gain'))} "
                    f"[{fmt_value(g('nll_gain_lo'))}, {fmt_value(g('nll_gain_hi'))}] |")
    if g("answer_prob_without") is not None:
        rows.append(f"| teacher-forced answer probability, arithmetic ({int(g('n_arith') or 0)} ex.; not generation "
                    f"accuracy) | {fmt_value(g('answer_prob_without'))} | {fmt_value(g('answer_prob_with'))} | "
                    f"{fmt_value(g('answer_prob_gain'))} [{fmt_value(g('answer_prob_gain_lo'))}, {fmt_value(g('answer_prob_gain_hi'))}] |")
    if g("gen_em_without") is not None:
        rows += [f"| generated exact match, arithmetic ({int(g('n_gen') or 0)} ex.; greedy, thoughts before every "
                 f"token) | {fmt_value(g('gen_em_without'))} | {fmt_value(g('gen_em_with'))} | {fmt_value(g('gen_em_gain'))} "
                 f"[{fmt_value(g('gen_em_gain_lo'))}, {fmt_value(g('gen_em_gain_hi'))}] |",
                 f"| generation speed, tokens/s (same loop) | {fmt_value(g('gen_tokens_per_s_without'))} | "
                 f"{fmt_value(g('gen_tokens_per_s_with'))} | {fmt_value(g('gen_slowdown'))}x slower with thoughts |"]
    return rows
