"""The Agent Forge flow, the `forge` CLI and the config presets."""

from tasks.env import configure as _configure

_configure()
