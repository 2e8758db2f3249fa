"""Test-split harness metrics of the BitNet input and the compressed artifact, paired, reloaded from the store.

Usage: python bench/compression_tiny_paired.py STORE_DIR  (a store holding one data, bitnet and compression
artifact; see docs/phases/compression.md, "Tiny pipeline")."""
import glob
import json
import sys
from pathlib import Path
import torch
from flows.config import load_config
from forge_models.data import Corpus
from forge_models.eval import evaluate, paired_metrics
from forge_models.runtime import PhaseContext
from forge_models.tokenizer import load_tokenizer
from tasks.evaluate import load_model
from tasks.store import Store

store_dir = sys.argv[1]
cfg = load_config("tiny", overrides=["seed=0"])
store = Store(f"file://{store_dir}")
(data,) = glob.glob(f"{store_dir}/data/*/")
(bit,) = glob.glob(f"{store_dir}/bitnet/*/")
(comp,) = glob.glob(f"{store_dir}/compression/*/")
corpus = Corpus.load(Path(data) / "corpus")
test = corpus.split("test")
ecfg = cfg.eval.for_split("test")
out, res = {}, {}
for name, root in (("input", bit), ("compressed", comp)):
    folder = Path(root) / "model"
    net = load_model(folder, torch.device("cpu"))
    o = {}
    res[name] = evaluate(net, load_tokenizer(folder), test, ecfg, PhaseContext(seed=0), o)
    out[name] = o
res["compressed"].update(paired_metrics(out["compressed"], out["input"], ecfg.bootstrap_samples, ecfg.bootstrap_seed))
print(json.dumps(res, indent=1))
