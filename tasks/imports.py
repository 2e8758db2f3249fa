"""Prefect task: bring a plain Hugging Face model folder into the store as a `model` artifact.

Used when a pipeline starts after phase 1 (``input: DIR``, e.g. ``forge phase bitnet --input DIR``).
Only safetensors weights, JSON configs and tokenizer files are copied; a folder whose weights are
pickles (pytorch_model.bin) is refused, since models never go through pickle here.

What phase 7 attached to the model (``agent.json``, the ``experts/`` library) is imported with it, to the
artifact's root (phase 7's layout, where the compression phase and the served agent look): found in the folder
itself (a ``forge phase experts --out DIR`` export) or beside it in a stored artifact the CLI copied for
``--input URI`` (``forge-inputs/<digest>/{model/, agent.json, experts/, manifest.json}``). Both count in the key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from forge_models.runtime import ConfigError, PhaseContext
from tasks.cache import folder_digest, phase_key
from tasks.config import ForgeConfig
from tasks.runtime import PhaseResult, PhaseWritten, PHASE_TASK_OPTIONS, run_phase

IMPORT_VERSION = "3"  # 2: a latent/ sub-folder is imported too; 3: phase 7's agent.json and experts/ too
ALLOWED = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")
AGENT_FILE, EXPERTS_DIR = "agent.json", "experts"


def attachments_place(src: Path) -> Path | None:
    """The folder holding phase 7's ``agent.json`` / ``experts/`` for the model folder ``src``, or None: ``src``
    itself (an export), else its parent when that is a stored artifact (has ``manifest.json``)."""
    for place in (src, src.parent):
        if place is src.parent and not (place / "manifest.json").is_file():
            continue
        if (place / AGENT_FILE).is_file() or (place / EXPERTS_DIR / "manifest.json").is_file():
            return place
    return None


def import_key(config: ForgeConfig) -> str:
    src = Path(config.input)
    digests = [folder_digest(config.input)]
    place = attachments_place(src) if src.is_dir() else None
    if place is not None and place != src:  # beside the folder: not covered by its digest
        from tasks.store import sha256_file

        agent = place / AGENT_FILE
        digests.append("agent:" + (sha256_file(agent) if agent.is_file() else "-"))
        if (place / EXPERTS_DIR / "manifest.json").is_file():
            digests.append("experts:" + folder_digest(str(place / EXPERTS_DIR)))
    return phase_key("import", IMPORT_VERSION, "{}", digests)


def _body(config: ForgeConfig):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        src = Path(config.input)
        if not (src / "config.json").is_file():
            raise ConfigError(f"input {src}: not a Hugging Face model folder (no config.json)")
        files = [p for p in src.iterdir() if p.is_file() and p.suffix in ALLOWED and p.name != AGENT_FILE]
        if not any(p.suffix == ".safetensors" for p in files):
            raise ConfigError(f"input {src}: no .safetensors weights (pickled weights are not loaded; convert them first)")
        (out_dir / "model").mkdir()
        for p in files:
            shutil.copy2(p, out_dir / "model" / p.name)
        latent = src / "latent"  # a packed BitNet folder's latent weights: what the training phase continues from
        if latent.is_dir():
            (out_dir / "model" / "latent").mkdir()
            for p in latent.iterdir():
                if p.is_file() and p.suffix in ALLOWED:
                    shutil.copy2(p, out_dir / "model" / "latent" / p.name)
        place, carried = attachments_place(src), []
        if place is not None and (place / AGENT_FILE).is_file():
            shutil.copy2(place / AGENT_FILE, out_dir / AGENT_FILE)
            carried.append(AGENT_FILE)
        if place is not None and (place / EXPERTS_DIR / "manifest.json").is_file():
            shutil.copytree(place / EXPERTS_DIR, out_dir / EXPERTS_DIR)  # load_experts verifies its own manifest
            carried.append(EXPERTS_DIR + "/")
        note = f" With phase 7's {', '.join(carried)} from `{place}`." if carried else ""
        return PhaseWritten(metrics={}, report_md=f"# Input\n\nImported `{src}` ({len(files)} files).{note}\n",
                            details={"source": str(src), "carried": carried})

    return body


@task(
    name="import",
    **PHASE_TASK_OPTIONS,
    retry_delay_seconds=[1, 5],
    cache_key_fn=lambda ctx, params: "import-" + import_key(params["config"]),
)
def import_task(config: ForgeConfig, parent_run_id: str | None = None) -> PhaseResult:
    return run_phase(
        phase="import", kind="model", key=import_key(config), store_url=config.store.url,
        config_section={"input": config.input}, inputs=[], body=_body(config), tracking=None,
        parent_run_id=parent_run_id, device="cpu", seed=config.seed,
    )
