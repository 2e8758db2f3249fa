"""Corruption of stored work: a flipped bit in a shard, a truncated file, an extra file, a missing manifest. Every
reader refuses it naming the file, before any compute; a pickle bomb placed where weights belong is never run.

The readers: ``Store.verify`` and ``Store.download`` (what every phase uses to take its input), the runtime's
reuse of a committed output, and each implemented phase task of the phase table that takes a previous output
(so a phase added to the table later is attacked too, as long as it is built on ``phase_task``).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from forge_models.runtime import ArtifactIntegrityError, ConfigError
from tasks.phases import ordered
from tasks.runtime import PhaseResult, PhaseWritten, run_phase
from tasks.store import Store
from tests.factories import make_llama

pytestmark = pytest.mark.fault

SHARD = "model/model.safetensors"


def _committed(tmp_path: Path, store: Store, name: str = "out", kind: str = "model") -> str:
    src = tmp_path / f"src-{name}"
    (src / "model").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(src / SHARD))
    (src / "model" / "config.json").write_text('{"model_type": "llama"}')
    uri = store.uri("phase", name)
    store.write_prefix(src, uri, kind)
    return uri


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped bit in a shard": (lambda root: _flip_bit(root / SHARD), SHARD, "does not match its sha256"),
    "truncated shard": (lambda root: (root / SHARD).write_bytes((root / SHARD).read_bytes()[:-100]), SHARD,
                        "bytes, manifest says"),
    "extra file": (lambda root: (root / "model" / "extra.safetensors").write_bytes(b"x"), "extra.safetensors",
                   "not in the manifest"),
    "missing manifest": (lambda root: (root / "manifest.json").unlink(), "manifest.json", "is missing"),
}


def _readers(store: Store, uri: str, tmp_path: Path):
    body_calls = []

    def body(ctx, inputs, out_dir):
        body_calls.append(1)
        (out_dir / "x").write_text("x")
        return PhaseWritten(metrics={}, report_md="")

    def downstream():
        manifest_digest = "0" * 64  # a reference made before the damage pins the old digest: checked separately
        del manifest_digest
        from tasks.store import ArtifactRef

        ref = ArtifactRef(uri=uri, digest=store.read_manifest(uri)[1] if store.exists(uri + "/manifest.json") else "x",
                          kind="model")
        run_phase(phase="next", kind="model", key="n" * 64, store_url=store.url, config_section={}, inputs=[ref],
                  body=body, tracking=None, parent_run_id=None, device="cpu")

    def reuse():  # a rerun that finds the output at its key
        run_phase(phase="phase", kind="model", key="out", store_url=store.url, config_section={}, inputs=[],
                  body=body, tracking=None, parent_run_id=None, device="cpu")

    return body_calls, {
        "verify": lambda: store.verify(uri),
        "download": lambda: store.download(uri, tmp_path / "dl"),
        "download of one folder": lambda: store.download(uri, tmp_path / "dl1", only="model"),
        "next phase's input": downstream,
        "reuse at its key": reuse,
    }


@pytest.mark.parametrize("fault", list(CORRUPTIONS))
def test_every_reader_refuses_corrupted_output_naming_the_file(tmp_path, fault, fault_row):
    store = Store(f"file://{tmp_path}/store")
    uri = _committed(tmp_path, store)
    damage, named, why = CORRUPTIONS[fault]
    damage(Path(store._path(uri)))
    body_calls, readers = _readers(store, uri, tmp_path)
    for reader, call in readers.items():
        if fault == "missing manifest" and reader == "reuse at its key":
            # no manifest: the output was never committed, so the rerun recomputes it (and replaces the leftovers)
            call()
            assert body_calls == [1]
            store.verify(uri)
            continue
        with pytest.raises(ArtifactIntegrityError) as err:
            call()
        assert named in str(err.value) and why in str(err.value), (reader, str(err.value))
    assert not list((tmp_path / "dl").rglob("*.safetensors")) if fault != "missing manifest" else True
    assert body_calls == ([1] if fault == "missing manifest" else []), "compute ran on corrupted input"
    fault_row(
        fault=f"corruption: {fault}", injected=f"edited the stored file ({named}) after its manifest was written",
        did=f"{len(readers)} readers (verify, download, download of one folder, next phase's input, reuse at its key) "
            f"raised ArtifactIntegrityError naming {named!r} ('{why}'); no compute ran"
            + ("; a rerun recomputed the uncommitted output" if fault == "missing manifest" else ""),
        lost="nothing (the damaged output is refused, never used)",
    )


def test_a_pinned_reference_refuses_a_replaced_output(tmp_path):
    store = Store(f"file://{tmp_path}/store")
    uri = _committed(tmp_path, store)
    digest = store.read_manifest(uri)[1]
    store.delete(uri)
    _committed(tmp_path, store)  # same path, new manifest (created at another time)
    with pytest.raises(ArtifactIntegrityError, match="replaced after it was referenced"):
        store.download(uri, tmp_path / "dl", expected_digest=digest)


@pytest.mark.parametrize("spec", [s for s in ordered() if s.implemented and s.task.startswith("tasks.")
                                  and s.input_kind != "dataset"], ids=lambda s: s.name)
def test_each_phase_task_refuses_a_corrupted_previous_output_before_compute(tmp_path, spec, monkeypatch):
    """Table-driven: every implemented phase task (built on phase_task) that takes a previous output."""
    from flows.config import load_config

    store = Store(f"file://{tmp_path}/store")
    cfg = load_config("tiny", overrides=["tracking.enabled=false", f"store.url=file://{tmp_path}/store"])
    data_uri = _committed(tmp_path, store, "data", "dataset")
    prev_uri = _committed(tmp_path, store, "prev", spec.input_kind)
    from tasks.store import ArtifactRef

    def result(uri: str, kind: str) -> PhaseResult:
        ref = ArtifactRef(uri=uri, digest=store.read_manifest(uri)[1], kind=kind)
        return PhaseResult(phase="x", key="k", ref=ref, executed=True, seconds=0.0)

    dataset, previous = result(data_uri, "dataset"), result(prev_uri, spec.input_kind)
    _flip_bit(Path(store._path(prev_uri)) / SHARD)
    task = spec.load()
    with pytest.raises(ArtifactIntegrityError, match=f"{SHARD} does not match its sha256"):
        task.fn(cfg, dataset=dataset, previous=previous)
    assert [p for p in store.list_files(store.uri(spec.name)) if p.endswith("manifest.json")] == []
    PHASES_REFUSED.append(spec.name)


PHASES_REFUSED: list[str] = []


def test_phase_task_rows(fault_row):
    # Runs after the table-driven test above (file order), so it reports the phases that test walked.
    expected = [s.name for s in ordered() if s.implemented and s.task.startswith("tasks.") and s.input_kind != "dataset"]
    if PHASES_REFUSED != expected:
        pytest.skip("run with test_each_phase_task_refuses_a_corrupted_previous_output_before_compute to record its row")
    fault_row(fault="corruption: a phase's input (every phase task of the table)",
              injected="a flipped bit in the committed previous output each phase task takes",
              did=f"{len(PHASES_REFUSED)} phase tasks ({', '.join(PHASES_REFUSED)}) raised ArtifactIntegrityError "
                  f"naming '{SHARD}' ('does not match its sha256') before compute; no manifest written",
              lost="nothing (the damaged input is refused, never used)")


# ------------------------------------------------------------------------------ pickle bomb


class Bomb:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bomb_folder(tmp_path: Path, marker: Path, keep_safetensors: bool = False) -> Path:
    folder = make_llama(tmp_path / "bomb", seed=0)
    if not keep_safetensors:
        for p in folder.glob("*.safetensors"):
            p.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Bomb(marker)}))
    return folder


def test_the_bomb_is_live(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Bomb(marker)))  # the same payload, unpickled on purpose: it does run code
    assert marker.exists()


@pytest.mark.parametrize("keep_safetensors", [False, True], ids=["bin-only", "bin-beside-safetensors"])
def test_pickle_bomb_where_weights_belong_is_never_executed(tmp_path, keep_safetensors, fault_row):
    from forge_models import importer
    from forge_models.cognate.phase import _load_pretrained
    from forge_models.merge.plan import open_source
    from tasks.inputs import load_input_model
    from tests.factories import save_tokenizer

    marker = tmp_path / "pwned"
    folder = _bomb_folder(tmp_path, marker, keep_safetensors)
    save_tokenizer(tmp_path / "tok", 64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    loaders = {
        "pretrained route (cognate.base_models)": lambda: _load_pretrained(str(folder), tok, torch.device("cpu")),
        "phase input model": lambda: load_input_model(folder),
        "forge import": lambda: importer.import_model(str(folder / "pytorch_model.bin"), tmp_path / "imp"),
        "forge import of the folder": lambda: importer.import_model(str(folder), tmp_path / "imp2"),
        "merge plan": lambda: open_source(str(folder)),
    }
    refused = []
    for name, load in loaders.items():
        try:
            load()
        except (ConfigError, ArtifactIntegrityError, ValueError) as exc:
            refused.append(name)
            assert "pickle" in str(exc).lower() or "pytorch_model.bin" in str(exc), (name, str(exc))
        else:
            if not keep_safetensors or name not in ("forge import of the folder", "merge plan"):
                raise AssertionError(f"{name} accepted a folder with pickled weights")
        assert not marker.exists(), f"{name} unpickled the bomb"
    fault_row(
        fault="pickle bomb where weights belong" + (" (beside safetensors)" if keep_safetensors else ""),
        injected="pytorch_model.bin whose unpickling creates a file, in a Hugging Face model folder",
        did=f"refused by {len(refused)}/{len(loaders)} loaders ({', '.join(refused)}) before from_pretrained; "
            "the rest loaded the safetensors only; the bomb never ran (its marker file was never created)",
    )
