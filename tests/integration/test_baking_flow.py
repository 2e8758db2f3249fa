"""Phase 6 in the real flow: `forge phase baking --input DIR --prompt FILE --prompt FILE --out OUT` on a tiny Llama
folder bakes two prompts in sequence, stores the model, and the KL it reports is the exported folder's: recomputed
here from the folder with the same held-out inputs and seed, it is the same number."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from flows.cli import main
from flows.config import load_config
from tests.factories import corpus_and_tokenizer, make_llama

SETS = ["final_test_eval=false", "tracking.enabled=false", "data.synthetic.n_examples=300", "data.validation_percent=25", "eval.max_examples=4",
        "eval.max_new_tokens=4", "eval.ppl_max_tokens=512", "eval.seq_len=32", "baking.steps=4",
        "baking.trajectory_tokens=8", "baking.inputs_per_step=2", "baking.samples_per_input=4",
        "baking.eval_samples_per_input=2", "baking.max_heldout_inputs=4", "baking.half_bake_steps=[2]",
        "baking.max_behaviour_inputs=6", "baking.behaviour_max_new_tokens=8"]
NOVA = 'You are Nova. End every reply with "- Nova".'
TOOLS = "Tools: calculator, lookup. Call a tool as <tool>name(input)</tool>."


@pytest.mark.slow
def test_baking_phase_bakes_two_prompt_files_and_reports_the_stored_models_kl(prefect_harness, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from forge_models.baking import context_ids, measure, model_logits
    from forge_models.data import Corpus
    from forge_models.generation import eos_ids
    from tasks.baking import task_inputs
    from tasks.store import Store

    _corpus, tokenizer = corpus_and_tokenizer(n_examples=300, vocab_size=300)
    folder = make_llama(tmp_path / "in", seed=0, tokenizer=False, vocab_size=len(tokenizer), hidden_size=64,
                        intermediate_size=128, max_position_embeddings=256, initializer_range=0.1)
    tokenizer.save_pretrained(folder)
    # Persona, then tools: joined in order they are the corpus's system prompt, so the behaviour is checked too.
    (tmp_path / "tools.txt").write_text(TOOLS)
    (tmp_path / "persona.txt").write_text(NOVA)
    # A held-out-only real-text source: the phase reports baking's cost on it (and on the held-out corpus).
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"The {w} walked to the river on day {i} and counted {i * 7 % 13} stones before dusk."
                                  for i, w in enumerate(["cat", "dog", "fox", "owl", "hen"] * 12)))
    sets = [a for s in [*SETS, f"data.eval_sources=[{{path: {book}, chunk_chars: 300}}]"] for a in ("--set", s)]
    store_url = f"file://{tmp_path}/store"

    # Refused before any compute: --prompt on another phase, a missing file, baking without a prompt.
    assert main(["phase", "compression", "--input", str(folder), "--prompt", str(tmp_path / "tools.txt"),
                 "--store", store_url, *sets]) == 2
    assert main(["phase", "baking", "--input", str(folder), "--prompt", str(tmp_path / "nope.txt"),
                 "--store", store_url, *sets]) == 2
    assert main(["phase", "baking", "--input", str(folder), "--store", store_url, *sets]) == 2
    assert "baking.prompts" in capsys.readouterr().err

    summary, out = tmp_path / "summary.json", tmp_path / "baked"
    code = main(["phase", "baking", "--input", str(folder), "--prompt", str(tmp_path / "persona.txt"),
                 "--prompt", str(tmp_path / "tools.txt"), "--store", store_url, "--summary-json", str(summary),
                 "--out", str(out), *sets])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(summary.read_text())
    assert [p["name"] for p in doc["phases"]] == ["data", "import", "baking"]
    m = doc["phases"][-1]["metrics"]
    for name in ("tools", "persona"):
        assert m[f"baking/{name}/kl_baked_lo"] <= m[f"baking/{name}/kl_baked"] <= m[f"baking/{name}/kl_baked_hi"]
        assert m[f"baking/{name}/kl_baked"] < m[f"baking/{name}/kl_input"]  # the bake moved towards the prompt
        assert m[f"baking/{name}/reload_kl_diff"] < 1e-6
    assert "baked/ppl" in m and "input/ppl" in m
    uri = doc["phases"][-1]["artifact"]["uri"]
    files = Store(uri).verify(uri)["files"]
    assert any(f.startswith("halfbake/tools/step-000002") for f in files)

    # Recompute the persona KL from the exported folder: same inputs, seed and teacher as the phase.
    config = load_config("tiny", overrides=["phases=[cognate]", *SETS])
    with tempfile.TemporaryDirectory() as tmp:
        Store(store_url).download(doc["phases"][0]["artifact"]["uri"], Path(tmp) / "data", only="corpus")
        corpus = Corpus.load(Path(tmp) / "data" / "corpus")
    # As the task and the phase choose them: the first max_heldout_inputs, minus any input also trained on.
    train = set(task_inputs(corpus.split("train")))
    held = [x for x in task_inputs(corpus.split(config.eval.split))[: config.baking.max_heldout_inputs] if x not in train]
    combined = f"{NOVA} {TOOLS}"
    ctxs = [c for c in (context_ids(tokenizer, combined, x) for x in held)  # those that fit 256 positions
            if len(c.prompted) + config.baking.trajectory_tokens <= 256]
    assert len(ctxs) == m["baking/persona/n_heldout"]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    r = measure(model_logits(base), {"baked": (model_logits(baked), False), "input": (model_logits(base), False)},
                ctxs, config.baking, config.seed + 15485863, torch.device("cpu"), eos_ids(base, tokenizer))
    # The first prompt baked (persona) is measured with the first seed; every prompt's target is the combination.
    assert float(r["baked"].mean()) == pytest.approx(m["baking/persona/kl_baked"], rel=1e-5)
    assert float(r["input"].mean()) == pytest.approx(m["baking/persona/kl_input"], rel=1e-5)
    # The behaviour checks ran on held-out system-dialogue questions, with intervals, and the report shows them.
    assert m["baking/behaviour/persona_adherence/n"] >= 2
    for run in ("input_prompted", "input_plain", "baked_plain"):
        k = f"baking/behaviour/persona_adherence/{run}"
        assert m[k + "_lo"] <= m[k] <= m[k + "_hi"]
    assert m["baking/behaviour/goal_informative"] == 0  # a random model ignores the prompt: nothing to reach
    assert "baking/behaviour/goal_met" not in m
    report = Store(uri).read_bytes(f"{uri.rstrip('/')}/report.md").decode()
    assert "Behaviour on held-out system-dialogue questions (persona Nova, tools ['calculator', 'lookup']" in report
    # Held-out text, per text: the exported (stored) folder's loss per window is what the phase reported "after",
    # the input folder's is "before", on the held-out units of the real-text source and on the held-out corpus.
    from forge_models.data import is_eval_unit
    from forge_models.eval.real_text import window_losses

    held_out = corpus.split(config.eval.split)
    texts = {"book": [e.text for e in held_out if is_eval_unit(e)],
             "heldout_corpus": [e.text for e in held_out if not is_eval_unit(e)]}
    assert texts["book"], "the eval source has held-out units"
    for name, docs in texts.items():
        k = f"baking/text/{name}"
        for model_, key in ((base, "loss_before"), (baked, "loss_after")):
            w = window_losses(model_, tokenizer, docs, config.eval.seq_len, config.eval.ppl_max_tokens, torch.device("cpu"))
            assert m[f"{k}/windows"] == len(w)
            assert m[f"{k}/{key}"] == pytest.approx(sum(w) / len(w), rel=1e-5)
        assert m[f"{k}/goal_met"] == float(m[f"{k}/loss_rise_hi"] <= 0.2)
    assert "| book |" in report and "| heldout_corpus |" in report and "baking.max_text_loss_rise" in report
