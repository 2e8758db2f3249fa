"""Cost of the experts phase's default ADAS budget on a trained tiny model (random-z library: cost only).

Usage: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/adas_phase_cost.py MODEL_DIR CORPUS_DIR
"""
import json, sys, tempfile, time

import torch
torch.set_num_threads(1)
import forge_models  # registers Cognate
from pathlib import Path
from forge_models.data import Corpus
from forge_models.experts import load_experts, save_experts
from forge_models.experts.agent import search_agent
from forge_models.experts.config import AgentSearchConfig
from forge_models.experts.svf import decompose, find_targets
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer
from tasks.inputs import load_input_model
folder = Path(sys.argv[1])
model, _ = load_input_model(folder); model.eval()
tok = load_tokenizer(folder)
corpus = Corpus.load(Path(sys.argv[2]))
LIB = tempfile.mkdtemp() + "/lib"
bases = decompose(model, find_targets(model, ["mlp"]))
g = torch.Generator().manual_seed(1)
save_experts(LIB, bases, {k: {n: 0.1 + 0.3*torch.randn(b.rank, generator=g) for n, b in bases.items()} for k in ["arithmetic","tool","persona","narrative"]}, 1.0, {})
t = time.perf_counter()
out = search_agent(model, tok, load_experts(LIB), corpus, AgentSearchConfig(enabled=True), PhaseContext(seed=0))
print(json.dumps({"total_s": time.perf_counter()-t, "search_s": out.search_s, "final_s": out.final_s, "n_val": len(out.validation), "n_test": len(out.test), "dropped": out.dropped_overlap, "chosen": out.chosen.to_json()}))
for r in out.comparison:
    print(r["role"], r["name"], round(r["test_accuracy"],3), round(r["test_low"],3), round(r["test_high"],3), "d", round(r["winner_minus_this"],3), round(r["diff_low"],3), round(r["diff_high"],3), r["verdict"], "calls", r["calls_per_query"], "tok", round(r["prompt_tokens_per_query"]+r["completion_tokens_per_query"],1), "s", round(r["seconds_per_query"],4))
for r in out.result.rows():
    print("archive", r["index"], r["origin"], r["name"], r["fitness"], r["calls_per_query"], r["config_json"])
