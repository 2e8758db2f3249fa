"""Phase 4 — BitNet b1.58: ternary layers, conversion, packed storage, integer inference, the phase.

Library use::

    from forge_models.bitnet import convert_to_bitnet, export_packed, load_packed
    report = convert_to_bitnet(model, keep_patterns=["lm_head", "halt"])   # in place; lambda = 1
    export_packed(model, "out/", tokenizer=tok)          # 2-bit folder, loadable by transformers
    packed = load_packed("out/")                          # int8 x ternary integer inference on CPU
"""

from forge_models.bitnet.config import BitNetConfig
from forge_models.bitnet.convert import (
    Conversion,
    bit_linears,
    calibrate_act_norms,
    convert_to_bitnet,
    matches_any,
    set_quant_strength,
)
from forge_models.bitnet.export import (
    export_packed,
    folder_bytes,
    load_packed,
    packed_linears,
    safetensors_bytes,
    write_bf16_reference,
    LATENT_DIR,
    save_latent,
    load_latent,
)
from forge_models.bitnet.layers import (
    MATMUL_BACKENDS,
    PACKED_BACKENDS,
    ROWWISE_BACKEND,
    ROWWISE_MAX_ROWS,
    KERNEL_BACKEND,
    KERNEL_MAX_ROWS,
    kernel_available,
    BitLinear,
    PackedBitLinear,
    bag_index_bytes,
    default_backend,
    default_packed_backend,
    integer_linear,
    rowwise_available,
)
from forge_models.bitnet.packing import PACKINGS, Packing, pack_2bit, pack_base3, unpack_2bit, unpack_base3
from forge_models.bitnet.phase import BitNetInputs, run
from forge_models.bitnet.quant import (
    ActivationSTE,
    WeightSTE,
    activation_fake_quant,
    activation_quant,
    quant_strength_at,
    weight_fake_quant,
    weight_quant,
)

__all__ = [
    "BitNetConfig",
    "BitNetInputs",
    "run",
    "BitLinear",
    "PackedBitLinear",
    "MATMUL_BACKENDS",
    "PACKED_BACKENDS",
    "ROWWISE_BACKEND",
    "ROWWISE_MAX_ROWS",
    "KERNEL_BACKEND",
    "KERNEL_MAX_ROWS",
    "kernel_available",
    "bag_index_bytes",
    "default_packed_backend",
    "rowwise_available",
    "default_backend",
    "integer_linear",
    "Conversion",
    "convert_to_bitnet",
    "set_quant_strength",
    "calibrate_act_norms",
    "bit_linears",
    "matches_any",
    "export_packed",
    "load_packed",
    "LATENT_DIR",
    "save_latent",
    "load_latent",
    "packed_linears",
    "safetensors_bytes",
    "folder_bytes",
    "write_bf16_reference",
    "PACKINGS",
    "Packing",
    "pack_2bit",
    "unpack_2bit",
    "pack_base3",
    "unpack_base3",
    "weight_quant",
    "activation_quant",
    "weight_fake_quant",
    "activation_fake_quant",
    "WeightSTE",
    "ActivationSTE",
    "quant_strength_at",
]
