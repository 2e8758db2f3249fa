"""Prefect task: build the corpus splits and the tokenizer, stored as a `dataset` artifact.

Output prefix: ``corpus/{train,validation,test}.jsonl``, ``tokenizer/`` (loadable with AutoTokenizer),
``phase.json``, ``report.md``, ``manifest.json`` (last). Its manifest digest is the *data digest* that
enters every later phase's cache key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
from prefect import task

from forge_models.data import build_corpus
from forge_models.runtime import ConfigError, PhaseContext
from forge_models.tokenizer import build_tokenizer
from tasks.cache import folder_digest, phase_key
from tasks.config import ForgeConfig
from tasks.runtime import PhaseResult, PhaseWritten, PHASE_TASK_OPTIONS, run_phase
from tasks.store import is_transient, sha256_file, TransientStorageError
from tasks.tracking import Tracking

DATA_VERSION = "2"  # 2: splits by canonical key


def data_key(config: ForgeConfig) -> str:
    """The dataset's cache key: config, the code (see tasks.cache), and the *content* of every source.

    A local source enters by the sha256 of its bytes, an S3 source by its ETag, so editing a file in place
    (same path) builds a new dataset instead of reusing the stale one.
    """
    extra = []
    if config.data.tokenizer.kind == "pretrained" and config.data.tokenizer.path:
        extra.append(folder_digest(config.data.tokenizer.path))
    for i, src in enumerate(config.data.sources):
        extra.append(f"source-{i}:{source_digest(src.path)}")
    for i, src in enumerate(config.data.eval_sources):
        extra.append(f"eval-source-{i}:{source_digest(src.path, 'data.eval_sources')}")
    return phase_key("data", DATA_VERSION, config.data.model_dump_json(), extra)


def source_digest(url: str, field: str = "data.sources") -> str:
    """Content digest of one data source: ``sha256:<hex>`` of a local file, ``etag:<ETag>`` of an S3 object."""
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise ConfigError(f"{field}: no such file {url!r}")
        return "sha256:" + sha256_file(path)
    try:
        fs, _, (path,) = fsspec.get_fs_token_paths(url)
        info = fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"{field}: {url} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        if is_transient(exc):
            raise TransientStorageError(f"reading the metadata of {url}: {exc}") from exc
        raise
    tag = info.get("ETag") or info.get("etag") or info.get("checksum")
    if not tag:
        raise ConfigError(
            f"{field}: {url} reports no ETag or checksum, so a change to its content could not be detected; "
            f"copy it to a local file or an S3-compatible store"
        )
    return f"etag:{str(tag).strip(chr(34))}"


def _materialize_sources(config: ForgeConfig, dest: Path, field: str = "sources") -> list[Path]:
    """Local copies of remote (s3://) sources of ``data.<field>`` (sources or eval_sources); local ones are
    used in place."""
    paths = []
    for i, src in enumerate(getattr(config.data, field)):
        if src.path.startswith("s3://"):
            local = dest / f"{'eval-' if field == 'eval_sources' else ''}source-{i}-{Path(src.path).name}"
            try:
                with fsspec.open(src.path, "rb") as f_in, open(local, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
            except FileNotFoundError:
                raise ConfigError(f"data.{field}[{i}]: {src.path} does not exist") from None
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc):
                    raise TransientStorageError(f"reading {src.path}: {exc}") from exc
                raise
            paths.append(local)
        else:
            paths.append(Path(src.path.removeprefix("file://")))
    return paths


def _body(config: ForgeConfig):
    def body(ctx: PhaseContext, inputs: list[Path], out_dir: Path) -> PhaseWritten:
        sources = _materialize_sources(config, out_dir.parent)
        eval_sources = _materialize_sources(config, out_dir.parent, "eval_sources")
        corpus = build_corpus(config.data, sources, eval_sources)
        corpus.save(out_dir / "corpus")
        tokenizer = build_tokenizer(config.data.tokenizer, [ex.text for ex in corpus.train])
        tokenizer.save_pretrained(out_dir / "tokenizer")
        n_tokens = sum(len(tokenizer(ex.text)["input_ids"]) for ex in corpus.train)
        counts = {f"n_{split}": float(len(corpus.split(split))) for split in ("train", "validation", "test")}
        metrics = {**counts, "train_tokens": float(n_tokens), "vocab_size": float(len(tokenizer))}
        kinds = {}
        for split in ("train", "validation", "test"):
            for ex in corpus.split(split):
                kinds.setdefault(ex.kind, {"train": 0, "validation": 0, "test": 0})[split] += 1
        rows = "\n".join(f"| {k} | {v['train']} | {v['validation']} | {v['test']} |" for k, v in sorted(kinds.items()))
        report = (
            "# Data\n\n| kind | train | validation | test |\n|---|---|---|---|\n" + rows +
            f"\n\nTraining tokens: {n_tokens:,}; tokenizer: {config.data.tokenizer.kind}, vocabulary {len(tokenizer):,}.\n"
            f"Corpus digest: `{corpus.digest()}`. Splits are assigned by the hash of each example's canonical keys "
            f"(a calculation in any wording, a persona situation, a story), so no key is in two splits.\n"
        )
        units = eval_source_units_by_split(corpus)
        if units:
            report += "\n" + eval_sources_table(units)
            for name, per_split in units.items():
                metrics.update({f"eval_units_{split}_{name}": float(n) for split, n in per_split.items()})
        details = {"kinds": kinds, "corpus_digest": corpus.digest(), **({"eval_sources": units} if units else {})}
        return PhaseWritten(metrics=metrics, report_md=report, details=details)

    return body


def eval_source_units_by_split(corpus) -> dict[str, dict[str, int]]:
    """Units of every eval source per split (train is listed to show it is always 0)."""
    units: dict[str, dict[str, int]] = {}
    for split in ("train", "validation", "test"):
        for ex in corpus.split(split):
            if ex.source:
                units.setdefault(ex.source, {"train": 0, "validation": 0, "test": 0})[split] += 1
    return units


def eval_sources_table(units: dict[str, dict[str, int]]) -> str:
    """Markdown table of eval-source units per split (the data report's held-out-only section)."""
    rows = "\n".join(f"| {name} | {n['train']} | {n['validation']} | {n['test']} |" for name, n in sorted(units.items()))
    return (
        "## Held-out-only eval sources\n\n| source | train | validation | test |\n|---|---|---|---|\n" + rows +
        "\n\nUnits go to validation or test by the hash of (source name, unit index), never to train; they are "
        "scored per source (`ppl_src_<name>`) and left out of the pooled `loss` / `ppl`.\n"
    )


@task(
    name="data",
    **PHASE_TASK_OPTIONS,
    retry_delay_seconds=[1, 5],
    cache_key_fn=lambda ctx, params: "data-" + data_key(params["config"]),
)
def data_task(config: ForgeConfig, parent_run_id: str | None = None) -> PhaseResult:
    """Build (or reuse) the dataset artifact: corpus splits plus tokenizer."""
    return run_phase(
        phase="data",
        kind="dataset",
        key=data_key(config),
        store_url=config.store.url,
        config_section=config.data.model_dump(mode="json"),
        inputs=[],
        body=_body(config),
        tracking=Tracking.from_config(config.tracking, _store(config), config.name),
        parent_run_id=parent_run_id,
        device="cpu",
        seed=config.data.seed,
    )


def _store(config: ForgeConfig):
    from tasks.store import Store

    return Store(config.store.url)
