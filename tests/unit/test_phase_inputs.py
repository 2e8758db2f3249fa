"""A one-model phase picks its input model from the previous output before any compute, or says what to set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge_models.runtime import ArtifactIntegrityError
from tasks.inputs import input_model_folder


def _folders(root: Path, names: list[str]) -> Path:
    for n in names:
        (root / n).mkdir(parents=True)
        (root / n / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "not-a-model").mkdir()  # no config.json: never offered
    return root


def test_the_only_model_is_taken(tmp_path):
    root = _folders(tmp_path, ["merged"])
    assert input_model_folder(root, None, "s3://b/evomerge/k", None) == ("merged", root / "merged")


def test_a_named_model_is_taken(tmp_path):
    root = _folders(tmp_path, ["trunk", "math"])
    assert input_model_folder(root, "math", "s3://b/cognate/k", "bitnet.input_model") == ("math", root / "math")


def test_an_unknown_name_is_refused_naming_the_field_and_what_is_there(tmp_path):
    root = _folders(tmp_path, ["trunk", "math"])
    with pytest.raises(ArtifactIntegrityError, match=r"quietstar\.input_model 'story' is not in s3://b/c .*\['math', 'trunk'\]"):
        input_model_folder(root, "story", "s3://b/c", "quietstar.input_model")


def test_an_ambiguous_input_is_refused(tmp_path):
    root = _folders(tmp_path, ["trunk", "math"])
    with pytest.raises(ArtifactIntegrityError, match=r"set bitnet\.input_model to the one to use"):
        input_model_folder(root, None, "s3://b/c", "bitnet.input_model")
    with pytest.raises(ArtifactIntegrityError, match="this phase takes exactly one model"):
        input_model_folder(root, None, "s3://b/c", None)
