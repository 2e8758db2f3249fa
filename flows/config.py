"""Loading `ForgeConfig` (defined in `tasks.config`, its phase sections from the phase table): presets and
command-line overrides.

The same frozen pydantic class is the `forge` CLI schema, the Prefect UI form (the flow's single
parameter) and, section by section, part of every phase's cache key. Presets are YAML files shipped in
`flows/presets/`; `--config FILE` and repeated `--set section.field=value` override them.

    from flows.config import load_config
    cfg = load_config(preset="tiny", overrides=["cognate.trunk.steps=50"])
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tasks.config import ForgeConfig

__all__ = ["DEPLOYED_PRESETS", "PRESETS", "ConfigProblems", "ForgeConfig", "deep_merge", "format_validation_error", "load_config",
           "parse_set", "preset_dict"]

PRESETS = ("tiny", "small", "full", "smollm2")
# Registered as Prefect deployments (smollm2 needs the optional model group and an imported model folder on
# the worker, so it is run by hand or from Python, not deployed).
DEPLOYED_PRESETS = ("tiny", "small", "full")


class ConfigProblems(Exception):
    """Every problem of a config at once, each naming its field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        if "input" in e and e["type"] not in ("extra_forbidden", "missing") and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        out.append(f"{loc}: {msg}")
    return out


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset."""
    if name not in PRESETS:
        raise ConfigProblems([f"preset: unknown preset {name!r}; choose from {list(PRESETS)}"])
    text = resources.files("flows").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``a.b.c=value`` strings into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    problems = []
    for item in items:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected section.field=value")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(f"--set {item!r}: empty key")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"--set {key}: cannot parse value {raw!r}: {exc}")
            continue
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"--set {key}: {p} is set both as a value and as a section")
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def load_config(
    preset: str | None = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    store: str | None = None,
) -> ForgeConfig:
    """Preset, then config file, then ``--set`` overrides, then ``--store``; every problem reported at once.

    Raises:
        ConfigProblems: listing each bad field (unknown key, wrong type, out of range, contradiction).
    """
    problems: list[str] = []
    raw: dict[str, Any] = preset_dict(preset) if preset else {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigProblems([f"--config: no such file {str(path)!r}"])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigProblems([f"--config {path}: not valid YAML: {exc}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigProblems([f"--config {path}: the top level must be a mapping"])
        raw = deep_merge(raw, loaded)
    tree, set_problems = parse_set(overrides or [])
    problems += set_problems
    raw = deep_merge(raw, tree)
    if store:
        raw = deep_merge(raw, {"store": {"url": store}})
    try:
        cfg = ForgeConfig.model_validate(raw)
    except ValidationError as err:
        problems += format_validation_error(err)
        cfg = None
    if problems:
        raise ConfigProblems(problems)
    return cfg
