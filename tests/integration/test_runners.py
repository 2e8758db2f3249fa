"""Scale-out: the mapped evaluation sub-flow on a local Dask cluster of 2 workers gives the same numbers
as the default thread runner, and its tasks really ran on the Dask workers."""

from __future__ import annotations

import pytest

from flows.agent_forge import agent_forge
from flows.config import load_config
from flows.evaluate import run_evaluation
from tests.factories import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_mapped_evaluation_on_local_dask_cluster(tmp_path):
    store = f"file://{tmp_path}/store"
    base = tiny_overrides(**{"final_test_eval": "false", "tracking.enabled": "false", "phases": "[cognate]"})
    cfg = load_config("tiny", overrides=base, store=store)
    result = agent_forge(cfg)
    data, cognate = result.phase("data").artifact, result.phase("cognate").artifact
    assert result.test_metrics == {}

    threads = run_evaluation(cfg, data, cognate, "test")
    dask_cfg = load_config(
        "tiny", overrides=base + ["runner.kind=dask", "runner.n_workers=2", "eval.max_new_tokens=11"], store=store
    )
    on_dask = run_evaluation(dask_cfg, data, cognate, "test")
    assert sorted(e.model for e in on_dask) == ["math", "story", "trunk"]
    assert all(e.executor.startswith("dask:tcp://127.0.0.1:") for e in on_dask), [e.executor for e in on_dask]
    assert not any(e.executor.startswith("dask:") for e in threads)
    by_model = {e.model: e.metrics for e in threads}
    for e in on_dask:  # perplexity does not depend on the generation budget changed above
        assert e.metrics["loss"] == pytest.approx(by_model[e.model]["loss"], rel=1e-6)
        assert e.metrics["ppl_tokens"] == by_model[e.model]["ppl_tokens"]


def test_evomerge_candidates_fan_out_on_dask(tmp_path):
    """Each generation's candidates are mapped tasks on the configured runner: here, 2 Dask workers."""
    import json

    from flows.evomerge import run_evomerge
    from tasks.store import Store

    store = f"file://{tmp_path}/store"
    base = tiny_overrides(**{"final_test_eval": "false", "tracking.enabled": "false", "phases": "[cognate]"})
    cfg = load_config("tiny", overrides=base, store=store)
    result = agent_forge(cfg)
    from tasks.runtime import PhaseResult

    data = PhaseResult(phase="data", key="k", ref=result.phase("data").artifact, executed=False, seconds=0)
    cognate = PhaseResult(phase="cognate", key="k", ref=result.phase("cognate").artifact, executed=False, seconds=0)
    dask_cfg = load_config("tiny", overrides=base + ["phases=[cognate, evomerge]", "runner.kind=dask", "runner.n_workers=2",
                                                    "evomerge.generations=1"], store=store)
    out = run_evomerge(dask_cfg, data, cognate)
    meta = json.loads(Store(store).read_bytes(Store.uri_join(out.ref.uri, "phase.json")))
    executors = meta["details"]["executors"]
    assert executors and all(e.startswith("dask:tcp://127.0.0.1:") for e in executors), executors
    assert len(executors) == 2  # both workers took candidates
