"""Agent Forge's ML library: pure torch / transformers / peft, no orchestration imports.

Importing it registers the Cognate architecture with transformers' Auto classes.
"""

from forge_models.cognate import model as _cognate_model  # noqa: F401  (registers "cognate")

__all__ = ["CODE_VERSION"]

CODE_VERSION = "0.1.0"
