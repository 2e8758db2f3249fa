"""The `forge` command.

    forge run [--preset tiny|small|full] [--config FILE] [--set section.field=value]... [--store URL]
              [--summary-json PATH]
    forge phase NAME [--input X]... [--out DIR] [--preset P] [--config F] [--set k=v]... [--store URL]
    forge phase evomerge --input A --input B [--input C]... [--base BASE] [--out DIR] ...
    forge phase baking --input HF_DIR --prompt FILE [--prompt FILE]... [--out DIR] ...
    forge phase --help                                        # every phase of the table with its state
    forge inspect URI
    forge import SOURCE --out DIR                             # GGUF / HF folder / smollm2-135m -> verified folder
    forge config [--preset P] [--config F] [--set k=v]...     # print the resolved config as YAML
    forge merge --config recipe.yaml --out DIR                # mergekit-format recipe, streamed
    forge ui [--s3]                                           # local Prefect + MLflow (+ S3) servers
    forge deploy [--pool P] [--presets tiny,small] [--cron C] # deployments on a work pool
    forge serve [--presets tiny] [--cron C]                   # serve the deployments from this process
    forge agent serve|chat|stats|register ...                 # the served agent (docs/serving.md)
    forge promote RUN_OR_VERSION --alias champion [--force]   # move a registry alias, refusing a worse version

Exit codes: 0 success, 1 a phase failed, 2 invalid configuration or arguments (every problem listed).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from flows.config import PRESETS, ConfigProblems, ForgeConfig, load_config
from tasks.runtime import HEADLINE_METRICS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="Config preset (default: tiny).")
    p.add_argument("--config", dest="config_file", help="YAML file merged over the preset.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one field, e.g. --set cognate.trunk.steps=200 (repeatable).")
    p.add_argument("--store", help="Store root URL (default: $FORGE_STORE or file://./forge-store).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forge", description="Agent Forge: the eight-phase model pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Run the pipeline flow.")
    _common(run)
    run.add_argument("--summary-json", help="Write the run summary (phases, artifacts, metrics) here.")
    from tasks.phases import phase_help

    phase = sub.add_parser("phase", help="Run one phase alone.", epilog=phase_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    phase.add_argument("name", help="Phase name, e.g. cognate (the list below).")
    phase.add_argument("--input", dest="inputs", action="append", default=[],
                       help="Artifact URI or Hugging Face model folder (repeatable).")
    phase.add_argument("--base", help="evomerge: the common base model folder or artifact URI that task vectors are "
                       "taken against (every searchable method but linear needs one); without it only linear merges are searched.")
    phase.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="FILE",
                       help="baking: a text file holding a prompt to bake (repeatable; baked in the order given, "
                       "named after the file).")
    phase.add_argument("--out", help="Also write the result as Hugging Face model folder(s) here.")
    phase.add_argument("--summary-json", help="Write the run summary here.")
    _common(phase)
    inspect = sub.add_parser("inspect", help="Verify an artifact and print its manifest, config and metrics.")
    inspect.add_argument("uri")
    imp = sub.add_parser("import", help="Import a base model (a .gguf file, a safetensors Hugging Face folder, or "
                         "a named source such as smollm2-135m) into a verified Hugging Face folder.")
    imp.add_argument("source", help="Path to a .gguf file or a Hugging Face folder, or a named source: smollm2-135m.")
    imp.add_argument("--out", required=True, help="Folder to write (must not exist or be empty).")
    sub.add_parser("merge", help="Run a mergekit-format recipe: forge merge --config recipe.yaml --out DIR.")
    sub.add_parser("ui", help="Start the local stack (Prefect + MLflow servers, optional S3); see forge ui --help.")
    sub.add_parser("deploy", help="Register deployments per preset on a work pool; see forge deploy --help.")
    sub.add_parser("serve", help="Serve the deployments from this process; see forge serve --help.")
    sub.add_parser("agent", help="The served agent: forge agent serve|chat|stats|register; see forge agent --help.")
    sub.add_parser("promote", help="Move a registry alias to a version; see forge promote --help.")
    cfg = sub.add_parser("config", help="Print the resolved configuration.")
    _common(cfg)
    return parser


def _load(args) -> ForgeConfig:
    return load_config(preset=args.preset, config_file=args.config_file, overrides=args.overrides, store=args.store)


def _model_folders(inputs: list[str], flag: str = "--input") -> list[str]:
    """Local model folders of plain Hugging Face folders or artifact URIs (verified against the manifest, then
    copied to ``./forge-inputs/<digest>/``)."""
    folders: list[str] = []
    for x in inputs:
        path = Path(x.removeprefix("file://"))
        if path.is_dir() and (path / "config.json").is_file():
            folders.append(str(path.resolve()))
        elif "://" in x or (path / "manifest.json").is_file():
            folders += _artifact_models(x)
        else:
            raise ConfigProblems([f"{flag} {x!r}: not a Hugging Face model folder (no config.json) nor an artifact URI"])
    return folders


SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
"""config.json entries that decide the tensor shapes a merge lines up."""


def _same_architecture(folders: list[str]) -> None:
    """Refuse, before any compute, models whose tensors cannot be merged elementwise."""
    configs = {f: json.loads((Path(f) / "config.json").read_text()) for f in folders}
    first = folders[0]
    problems = [
        f"{f}: {k} = {configs[f].get(k)!r}, but {first} has {configs[first].get(k)!r}"
        for f in folders[1:] for k in SHAPE_KEYS if configs[f].get(k) != configs[first].get(k)
    ]
    if problems:
        raise ConfigProblems(["forge phase evomerge: the models must share one architecture to be merged"] + problems)


def _phase_overrides(name: str, inputs: list[str], store_url: str | None, base: str | None = None) -> list[str]:
    """Translate `forge phase` inputs into config overrides, as the phase table declares them.

    An input is a plain Hugging Face model folder, or an artifact URI whose model folders are used. A phase
    that takes the dataset runs with optional input models; one that takes a model set needs at least two
    models of one architecture (and may get a common --base); one that takes a model needs exactly one.
    """
    from tasks import phases

    spec = phases.PHASES.get(name)
    if spec is None:
        raise ConfigProblems([f"phase {name!r}: unknown; known: {[s.name for s in phases.ordered()]}"])
    if not spec.implemented or spec.standalone is None:
        raise ConfigProblems([f"phase {name!r}: not implemented in this version (implemented: {phases.implemented()})"])
    if base is not None and spec.input_kind != "model-set":
        mergers = " or ".join(s.name for s in phases.ordered() if s.implemented and s.input_kind == "model-set")
        raise ConfigProblems([f"--base is only used by forge phase {mergers}, not {name!r}"])
    folders = _model_folders(inputs)
    base_folders: list[str] = []
    if spec.input_kind == "model-set":
        if len(folders) < 2:
            raise ConfigProblems([f"forge phase {name}: give at least two --input models to merge (got {len(folders)})"])
        base_folders = _model_folders([base], "--base") if base is not None else []
        if len(base_folders) > 1:
            raise ConfigProblems([f"--base {base!r}: holds {len(base_folders)} models; give exactly one"])
        _same_architecture(folders + base_folders)
    elif spec.input_kind == "model" and len(folders) != 1:
        raise ConfigProblems([f"forge phase {name}: give exactly one --input model (got {len(folders)})"])
    return spec.standalone(folders, base_folders)


def _prompt_overrides(name: str, files: list[str]) -> list[str]:
    """``--prompt FILE`` (repeatable) as ``baking.prompts``, each named after its file, checked before any compute."""
    import re

    if not files:
        return []
    if name != "baking":
        raise ConfigProblems([f"--prompt is only used by forge phase baking, not {name!r}"])
    prompts, problems = [], []
    for f in files:
        path = Path(f)
        if not path.is_file():
            problems.append(f"--prompt {f!r}: no such file")
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem)[:36] or "prompt"
        taken = {p["name"] for p in prompts}
        label = stem if stem not in taken else f"{stem}-{len(prompts)}"
        prompts.append({"name": label, "file": str(path.resolve())})
    if problems:
        raise ConfigProblems(problems)
    return ["baking.prompts=" + json.dumps(prompts)]


def _artifact_models(uri: str) -> list[str]:
    """Verified local copies of the model folders of a stored artifact."""
    from tasks.store import Store

    store = Store(uri)
    manifest, digest = store.read_manifest(store.url)
    dest = Path("forge-inputs") / digest[:16]
    if not (dest / "manifest.json").is_file():
        store.download(store.url, dest, expected_digest=digest)
    models = sorted(str(c.parent.resolve()) for c in dest.glob("*/config.json"))
    if not models:
        raise ConfigProblems([f"--input {uri!r}: a {manifest['kind']!r} artifact holds no model folders"])
    return models


MODEL_COLUMNS = ("ppl", "unigram_gain", *HEADLINE_METRICS[2:], "refine_steps", "params")


def _print_summary(result, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    table = Table(title=f"Agent Forge run ({seconds:.0f} s)")
    for col in ("phase", "status", "cached", "seconds", "artifact"):
        table.add_column(col, overflow="fold")
    for p in result.phases:
        table.add_row(p.name, p.status, "yes" if p.cached else "no", f"{p.seconds:.1f}",
                      p.artifact.uri if p.artifact else "-")
    console.print(table)
    for p in result.phases:
        models = sorted({k.split("/", 1)[0] for k in p.metrics if "/" in k and k.endswith("/ppl")})
        if not models:
            continue
        mt = Table(title=f"{p.name}: held-out metrics per model")
        mt.add_column("model")
        for col in MODEL_COLUMNS:
            mt.add_column(col, justify="right")
        for m in models:
            cells = [p.metrics.get(f"{m}/{c}") for c in MODEL_COLUMNS]
            mt.add_row(m, *("-" if v is None else (f"{v:,.0f}" if c == "params" else f"{v:.4g}")
                            for c, v in zip(MODEL_COLUMNS, cells)))
        console.print(mt)
    for p in result.phases:
        fits = {k: v for k, v in p.metrics.items() if k.endswith("/fitness") and k.count("/") == 2}
        if not fits:
            continue
        et = Table(title=f"{p.name}: fitness of the winner, each parent and the plain average")
        et.add_column("model")
        splits = sorted({k.split("/")[0] for k in fits}, key=lambda x: x == "test")
        for sp in splits:
            et.add_column(sp, justify="right")
        for m in dict.fromkeys(k.split("/")[1] for k in fits):
            et.add_row(m, *(f"{fits[f'{sp}/{m}/fitness']:.4f}" if f"{sp}/{m}/fitness" in fits else "-" for sp in splits))
        console.print(et)
    thinking = [(p, pre) for p in result.phases for pre in ("quietstar", "thoughts")
                if f"{pre}/nll_without" in p.metrics]
    if thinking:
        # Quiet-STaR's own measurement, then each later phase's re-measurement on the model it stored.
        qt = Table(title="with vs without thoughts (held-out; after each phase that carried Quiet-STaR's files)")
        cols = ("nll_without", "nll_with", "nll_gain", "answer_prob_without", "answer_prob_with", "gen_em_without",
                "gen_em_with")
        qt.add_column("phase")
        for c in cols:
            qt.add_column(c, justify="right")
        for p, pre in thinking:
            ms = p.metrics
            qt.add_row(p.name, *("-" if ms.get(f"{pre}/{c}") is None else f"{ms[f'{pre}/{c}']:.4f}" for c in cols))
        console.print(qt)
    if result.test_metrics:
        tt = Table(title="test split (never seen by training or selection)")
        tt.add_column("model")
        cols = HEADLINE_METRICS
        for c in cols:
            tt.add_column(c, justify="right")
        for m, ms in result.test_metrics.items():
            tt.add_row(m, *("-" if ms.get(c) is None else f"{ms[c]:.4g}" for c in cols))
        console.print(tt)
    console.print(f"store: {result.store}")
    if result.registered:
        r = result.registered
        console.print(f"registered: {r['model_uri']} (version {r['version']}); promote with `forge promote "
                      f"{r['version']} --alias champion`, serve with `forge agent serve -m {r['model_uri']}`")
    if result.mlflow_ui:
        console.print(f"MLflow UI:  {result.mlflow_ui}   (parent run {result.mlflow_run_id})")
    if result.prefect_ui:
        console.print(f"Prefect UI: {result.prefect_ui}")
    else:
        # The run lives in this project's Prefect home and the store's MLflow database: open both UIs on them.
        import os

        console.print(f"Both UIs on this run: forge ui --runs --prefect-home {os.environ.get('PREFECT_HOME', '.prefect')} "
                      f"--store {result.store}")


def cmd_run(args, config: ForgeConfig) -> int:
    from flows.agent_forge import agent_forge, result_json

    t0 = time.monotonic()
    result = agent_forge(config)
    _print_summary(result, time.monotonic() - t0)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(result_json(result), indent=2))
    if getattr(args, "out", None):
        _export(result.phases[-1].artifact.uri, Path(args.out))
    return 0


def _export(uri: str, out: Path) -> None:
    """Write every model of an output prefix as a plain Hugging Face folder under ``out``."""
    from tasks.store import Store

    store = Store(uri)
    with tempfile.TemporaryDirectory() as tmp:
        store.download(uri, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        models = sorted(Path(tmp).glob("*/config.json"))
        for cfg in models:
            # One model: DIR is the model folder itself; several: DIR/<name>/.
            dest = out if len(models) == 1 else out / cfg.parent.name
            if dest.exists() and dest != out:
                shutil.rmtree(dest)
            shutil.copytree(cfg.parent, dest, dirs_exist_ok=True)
            print(f"wrote {dest}")
        recipe = Path(tmp) / "recipe.yaml"  # EvoMerge: the winner's mergekit recipe travels with it
        if recipe.is_file():
            shutil.copy2(recipe, out / "recipe.yaml")
            print(f"wrote {out / 'recipe.yaml'}")
        experts = Path(tmp) / "experts"  # Experts: the SVF library travels with its model
        if (experts / "manifest.json").is_file():
            shutil.copytree(experts, out / "experts", dirs_exist_ok=True)
            print(f"wrote {out / 'experts'}")
        agent = Path(tmp) / "agent.json"  # Experts + ADAS: the chosen agent configuration
        if agent.is_file():
            shutil.copy2(agent, out / "agent.json")
            print(f"wrote {out / 'agent.json'}")


def cmd_inspect(args) -> int:
    from tasks.store import Store

    store = Store(args.uri)
    manifest = store.verify(store.url)
    print(f"verified {store.url}: {len(manifest['files'])} files, kind {manifest['kind']}, digest {manifest['digest']}")
    for rel, meta in sorted(manifest["files"].items()):
        print(f"  {meta['size']:>12,}  {meta['sha256'][:16]}  {rel}")
    if "phase.json" in manifest["files"]:
        meta = json.loads(store.read_bytes(store.uri_join(store.url, "phase.json")))
        print("config:")
        print(json.dumps(meta.get("config"), indent=2))
        print("metrics:")
        for k, v in sorted(meta.get("metrics", {}).items()):
            print(f"  {k}: {v}")
    return 0


def cmd_import(args) -> int:
    from forge_models.importer import import_model

    r = import_model(args.source, args.out)
    print(f"imported {r.source} ({r.source_kind}, {r.params:,} parameters) into {r.out} in {r.seconds:.0f} s: "
          f"reloaded logits equal the source's (max abs diff {r.max_abs_logit_diff}), "
          f"chat template {'kept' if r.chat_template else 'absent'}")
    return 0


def resolve_recipe_uris(recipe_path: Path, work: Path) -> Path:
    """A copy of a mergekit recipe whose store URIs (file://, s3://) point at verified local downloads.

    EvoMerge writes its winner's recipe with the parents' store URIs (``<artifact>/<model>``); each one is
    downloaded once (checked against its artifact's manifest) and replaced by the local folder.
    """
    import yaml

    from tasks.store import Store

    data = yaml.safe_load(recipe_path.read_text())
    local: dict[str, str] = {}

    def fetch(ref: str) -> str:
        if "://" not in ref:
            return ref
        if ref not in local:
            artifact, name = ref.rstrip("/").rsplit("/", 1)
            dest = work / f"model-{len(local)}"
            Store(artifact).download(artifact, dest, only=name)
            local[ref] = str(dest / name)
        return local[ref]

    def walk(node):
        if isinstance(node, dict):
            return {k: (fetch(v) if k in ("model", "base_model", "tokenizer_source") and isinstance(v, str) else walk(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(x) for x in node]
        return node

    resolved = walk(data)
    if not local:
        return recipe_path
    out = work / "recipe.yaml"
    out.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return out


def cmd_merge(argv: list[str]) -> int:
    """``forge merge``: the library's merge CLI, plus store URIs as model paths."""
    from forge_models.merge.__main__ import main as merge_main

    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        i = argv.index("--config") + 1
        path = Path(argv[i])
        if path.is_file() and "://" in path.read_text():
            with tempfile.TemporaryDirectory(prefix="forge-merge-") as tmp:
                try:
                    argv = [*argv[:i], str(resolve_recipe_uris(path, Path(tmp))), *argv[i + 1:]]
                except Exception as exc:  # noqa: BLE001
                    print(f"forge merge: cannot fetch a model of the recipe: {exc}", file=sys.stderr)
                    return 2
                return merge_main(argv)
    return merge_main(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "aiobotocore", "s3fs", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return cmd_merge(argv[1:])
    if argv and argv[0] in ("agent", "promote"):
        from flows.serving import main as serving_main

        return serving_main(argv[0], argv[1:])
    if argv and argv[0] in ("ui", "deploy", "serve"):
        try:
            if argv[0] == "ui":
                from flows.stack import main as ui_main

                return ui_main(argv[1:])
            from flows.deploy import main as deploy_main

            return deploy_main(argv[0], argv[1:])
        except ConfigProblems as exc:
            print(f"forge: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "import":
            return cmd_import(args)
        if args.command == "phase":
            args.overrides = args.overrides + _phase_overrides(args.name, args.inputs, args.store, args.base)
            args.overrides += _prompt_overrides(args.name, args.prompts)
        config = _load(args)
        if args.command == "config":
            import yaml

            from tasks.phases import PHASES

            states = ", ".join(f"{s.order}. {s.name}" + ("" if s.implemented else " (not implemented)")
                               for s in sorted(PHASES.values(), key=lambda s: s.order))
            print(f"# pipeline: {' -> '.join(config.phases)}\n# phases: {states}")
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            return 0
        return cmd_run(args, config)
    except ConfigProblems as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        from forge_models.runtime import ForgeError

        kind = "error" if isinstance(exc, ForgeError) else f"{type(exc).__name__}"
        print(f"forge: {kind}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
