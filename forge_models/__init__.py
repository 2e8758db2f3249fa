"""Agent Forge's ML library: pure torch / transformers / peft, no orchestration imports.

Importing it registers the Cognate architecture with transformers' Auto classes and the compressed-folder
format with its quantizer registry (``from_pretrained`` loads phase 8's output).
"""

from forge_models.cognate import model as _cognate_model  # noqa: F401  (registers "cognate")
from forge_models.compression import hf as _compression_hf  # noqa: F401  (registers "forge_compressed")

__all__ = ["CODE_VERSION"]

CODE_VERSION = "0.1.0"
