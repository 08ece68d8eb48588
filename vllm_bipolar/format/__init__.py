"""The bipolar-INT format in pure torch: one definition shared by the converter, the plugin's
CPU path, the kernels' tests and the tools.

spec       the checkpoint's ``quantization_config`` (validation, per-layer bits, skips)
packing    codes <-> odd values, bit-plane packing of format version 1
quantize   weight quantization (rtn / mse), dequantization, per-token activation quantization
reference  the AND-popcount bit-plane matmul and the pure-torch runtime linear
"""

from .packing import (codes_to_values, max_level, num_words, pack_codes, popcount32, unpack_bits,
                      unpack_codes, values_to_codes)
from .quantize import (QuantizedWeight, dequantize, expand_groups, fake_quantize_activations,
                       num_groups, quantize_activations, quantize_weight)
from .reference import (bipolar_linear, bitplane_integer_products, bitplane_matmul,
                        bitplane_value_sums, dequantize_packed, group_lengths)
from .spec import (A16, FORMAT_VERSION, QUANT_METHOD, BipolarConfigError, BipolarQuantSpec,
                   shard_names)

__all__ = [
    "A16", "FORMAT_VERSION", "QUANT_METHOD", "BipolarConfigError", "BipolarQuantSpec", "QuantizedWeight",
    "bipolar_linear", "bitplane_integer_products", "bitplane_matmul", "bitplane_value_sums",
    "codes_to_values", "dequantize", "dequantize_packed", "expand_groups", "fake_quantize_activations",
    "group_lengths", "max_level", "num_groups", "num_words", "pack_codes", "popcount32",
    "quantize_activations", "quantize_weight", "shard_names", "unpack_bits", "unpack_codes",
    "values_to_codes",
]
