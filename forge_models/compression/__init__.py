"""Phase 8, final compression: per-tensor encodings (bf16, RTN int-k, NF4, ternary, SeedLM, VPTQ) under a byte budget."""

from forge_models.compression.encoders import ENCODERS, Encoded, Encoder, make_encoder
from forge_models.compression import seedlm as _seedlm  # noqa: F401  (registers "seedlm")
from forge_models.compression import vptq as _vptq  # noqa: F401  (registers "vptq")
from forge_models.compression import hf as _hf  # noqa: F401  (registers "forge_compressed" with transformers)

__all__ = ["ENCODERS", "Encoded", "Encoder", "make_encoder"]
