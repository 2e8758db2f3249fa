"""Prefect task: bring a plain Hugging Face model folder into the store as a `model` artifact.

Used when a pipeline starts after phase 1 (``input: DIR``, e.g. ``forge phase bitnet --input DIR``).
Only safetensors weights, JSON configs and tokenizer files are copied; a folder whose weights are
pickles (pytorch_model.bin) is refused, since models never go through pickle here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from forge_models.runtime import ConfigError, PhaseContext
from tasks.cache import folder_digest, phase_key
from tasks.config import ForgeConfig
from tasks.runtime import PhaseResult, PhaseWritten, PHASE_TASK_OPTIONS, run_phase

IMPORT_VERSION = "2"  # 2: a latent/ sub-folder is imported too
ALLOWED = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken")


def import_key(config: ForgeConfig) -> str:
    return phase_key("import", IMPORT_VERSION, "{}", [folder_digest(config.input)])


def _body(config: ForgeConfig):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        src = Path(config.input)
        if not (src / "config.json").is_file():
            raise ConfigError(f"input {src}: not a Hugging Face model folder (no config.json)")
        files = [p for p in src.iterdir() if p.is_file() and p.suffix in ALLOWED]
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
        return PhaseWritten(metrics={}, report_md=f"# Input\n\nImported `{src}` ({len(files)} files).\n",
                            details={"source": str(src)})

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
