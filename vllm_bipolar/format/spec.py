"""The ``quantization_config`` of a bipolar checkpoint: parsing, validation, per-layer lookups.

Pure Python (no torch, no vLLM) so that the converter, the vLLM plugin and the tests share one
definition of what a valid config is. Every rejection raises :class:`BipolarConfigError` whose
message names the key, the value found, what is allowed and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

QUANT_METHOD = "bipolar"
FORMAT_VERSION = 1  # what quant_tools.convert writes unless --format-version says otherwise
# 1: scales/zeros in the model dtype; 2: scales/zeros as 8-bit codes of per-row steps (group_params.py)
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MIN_BITS, MAX_BITS = 1, 8
A16 = 16  # a_bits value meaning "activations stay fp16/bf16" (weight-only quantization)
WORD_BITS = 32  # bits per packed int32 word along K
# Binary tensor-core MMAs consume K in steps of 128 bits (mma.sync m16n8k128 .b1); with quantized
# activations every weight group must cover whole steps so its partial sums can be scaled apart.
BINARY_MMA_K = 128
QUANTIZERS = ("rtn", "mse")  # data-free quantizers of quantize_weight
# Every value the informational key "method" may take: the data-free quantizers and the calibrated
# ones of quant_tools.calibrate ("gptq": bipolar grid, searched scales, act-order; "gptq_int":
# GPTQ as published, on the signed-INT grid with an integer zero point).
METHODS = QUANTIZERS + ("gptq", "gptq_int")
# informational key "rotation": how the residual stream was rotated offline (random orthogonal, or
# randomized Hadamard)
ROTATIONS = ("orthogonal", "hadamard")
DEFAULT_SKIP = ("lm_head",)
# Leaf names of the decoder linears a checkpoint quantizes: q/k/v/o and gate/up/down, or (Phi-3) q/k/v and
# gate/up stored fused. Shared by the converter and the plugin's checkpoint check.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                   "gate_up_proj")

# Fused vLLM modules and the checkpoint modules they are made of.
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


class BipolarConfigError(ValueError):
    """A bipolar ``quantization_config`` (or a converter option that becomes one) is invalid."""


def _check_bits(key: str, value: Any, allow_a16: bool = False) -> int:
    allowed = f"an integer {MIN_BITS}..{MAX_BITS}" + (f" or {A16} (no activation quantization)" if allow_a16 else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BipolarConfigError(f"quantization_config['{key}'] = {value!r}: expected {allowed}.")
    if not (MIN_BITS <= value <= MAX_BITS or (allow_a16 and value == A16)):
        raise BipolarConfigError(
            f"quantization_config['{key}'] = {value}: unsupported bit width; expected {allowed}. "
            "Re-convert the checkpoint with a supported width.")
    return value


def _check_group_size(value: Any, a_bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BipolarConfigError(
            f"quantization_config['group_size'] = {value!r}: expected an integer (-1 or a multiple of 32).")
    if value != -1 and (value <= 0 or value % WORD_BITS):
        raise BipolarConfigError(
            f"quantization_config['group_size'] = {value}: groups must cover whole 32-bit words of the "
            "packed weights; use -1 (one group per row) or a positive multiple of 32 such as 64 or 128.")
    if a_bits != A16 and value != -1 and value % BINARY_MMA_K:
        raise BipolarConfigError(
            f"quantization_config['group_size'] = {value} with a_bits = {a_bits}: the binary tensor-core "
            f"kernels consume K in steps of {BINARY_MMA_K} bits, so with quantized activations the group "
            f"size must be -1 or a multiple of {BINARY_MMA_K}; re-convert with --group-size 128 (or 256, -1), "
            "or use --a-bits 16.")
    return value


def _check_module_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise BipolarConfigError(
            f"quantization_config['modules_to_not_convert'] = {value!r}: expected a list of module names "
            "such as [\"lm_head\"].")
    return tuple(value)


def _check_layer_bits(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise BipolarConfigError(
            f"quantization_config['layer_bits'] = {value!r}: expected an object mapping module names to "
            "bit widths, e.g. {\"model.layers.0.mlp.down_proj\": 4}.")
    out = {}
    for name, bits in value.items():
        if not isinstance(name, str) or not name:
            raise BipolarConfigError(f"quantization_config['layer_bits'] has an invalid module name {name!r}.")
        out[name] = _check_bits(f"layer_bits.{name}", bits)
    return out


@dataclasses.dataclass(frozen=True)
class BipolarQuantSpec:
    """A validated bipolar ``quantization_config`` (checkpoint format version 1 or 2).

    Keys (all documented in README.md):
      w_bits                  weight bits 1..8 (default width of every quantized layer)
      a_bits                  activation bits 1..8, or 16 for weight-only quantization
      group_size              input channels per scale/offset group: -1 (per row) or a multiple of 32
      symmetric               true: w = s*v; false: w = z + s*v with per-group offsets z (`zeros`)
      modules_to_not_convert  module names (prefix match on dotted components) kept in full precision
      layer_bits              {module name: bits} overrides of w_bits for single layers
      format_version          checkpoint layout version: 1 (scales/zeros in the model dtype) or 2
                              (8-bit scale/offset codes and per-row steps, format/group_params.py)
      method                  informational: the quantizer that produced the weights (METHODS)
      online_hadamard         module names (dotted-component match) whose input is multiplied by a
                              block Walsh-Hadamard matrix at run time (format/transforms.py); their
                              stored weights carry the matching rotation
      rotation                informational: offline rotation of the residual stream ("orthogonal")
      avg_bits                informational: parameter-weighted mean weight bits (mixed precision)
      a_clip_ratio            with a_bits < 16: each token's activations are clipped at this fraction
                              (0, 1] of their absolute maximum before the per-token quantization
                              (format/quantize.py clip_activations); absent: no clipping
    """

    w_bits: int
    a_bits: int = A16
    group_size: int = 128
    symmetric: bool = False
    modules_to_not_convert: tuple[str, ...] = DEFAULT_SKIP
    layer_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    method: str | None = None
    online_hadamard: tuple[str, ...] = ()
    rotation: str | None = None
    avg_bits: float | None = None
    a_clip_ratio: float | None = None

    def __post_init__(self):
        # Validate eagerly so a spec built in code is held to the same rules as one read from JSON.
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits, allow_a16=True)
        _check_group_size(self.group_size, self.a_bits)
        if not isinstance(self.symmetric, bool):
            raise BipolarConfigError(
                f"quantization_config['symmetric'] = {self.symmetric!r}: expected true or false.")
        object.__setattr__(self, "modules_to_not_convert", _check_module_list(self.modules_to_not_convert))
        object.__setattr__(self, "layer_bits", _check_layer_bits(self.layer_bits))
        if (isinstance(self.format_version, bool) or not isinstance(self.format_version, int)
                or self.format_version not in SUPPORTED_FORMAT_VERSIONS):
            raise BipolarConfigError(
                f"quantization_config['format_version'] = {self.format_version!r}: this vllm-bipolar reads "
                f"format versions {list(SUPPORTED_FORMAT_VERSIONS)}; upgrade vllm-bipolar or re-convert the "
                "checkpoint with this version's quant_tools.convert.")
        if self.method is not None and self.method not in METHODS:
            raise BipolarConfigError(
                f"quantization_config['method'] = {self.method!r}: expected one of {list(METHODS)}.")
        if not isinstance(self.online_hadamard, (list, tuple)) or not all(
                isinstance(v, str) and v for v in self.online_hadamard):
            raise BipolarConfigError(
                f"quantization_config['online_hadamard'] = {self.online_hadamard!r}: expected a list of module "
                "names such as [\"down_proj\"].")
        object.__setattr__(self, "online_hadamard", tuple(self.online_hadamard))
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise BipolarConfigError(
                f"quantization_config['rotation'] = {self.rotation!r}: expected one of {list(ROTATIONS)} or "
                "no key.")
        if self.avg_bits is not None and (isinstance(self.avg_bits, bool)
                                          or not isinstance(self.avg_bits, (int, float))
                                          or not MIN_BITS <= self.avg_bits <= MAX_BITS):
            raise BipolarConfigError(
                f"quantization_config['avg_bits'] = {self.avg_bits!r}: expected a number {MIN_BITS}..{MAX_BITS}.")
        if self.a_clip_ratio is not None:
            r = self.a_clip_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise BipolarConfigError(
                    f"quantization_config['a_clip_ratio'] = {r!r}: expected a number in (0, 1] (the fraction of "
                    "each token's absolute maximum where activations are clipped), or no key.")
            if self.a_bits == A16:
                raise BipolarConfigError(
                    f"quantization_config['a_clip_ratio'] = {r!r} with a_bits = {A16}: activation clipping applies "
                    "only to quantized activations; remove the key or set a_bits 1..8.")

    # ---- JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Any) -> "BipolarQuantSpec":
        if not isinstance(config, Mapping):
            raise BipolarConfigError(
                f"quantization_config must be a JSON object, got {type(config).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)} | {"quant_method"}
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise BipolarConfigError(
                f"quantization_config has unknown key(s) {unknown}; allowed keys are {sorted(known)}. "
                "Remove them or check their spelling.")
        method = config.get("quant_method", QUANT_METHOD)
        if not isinstance(method, str) or method.lower() != QUANT_METHOD:
            raise BipolarConfigError(
                f"quantization_config['quant_method'] = {method!r}, but this is the '{QUANT_METHOD}' "
                f"loader; load the model with the quantization method it was made for, or convert it "
                "with quant_tools.convert.")
        if "w_bits" not in config:
            raise BipolarConfigError("quantization_config lacks the required key 'w_bits' (1..8).")
        kwargs = {k: v for k, v in config.items() if k != "quant_method"}
        if "format_version" not in kwargs:
            raise BipolarConfigError(
                "quantization_config lacks 'format_version'; checkpoints written by quant_tools.convert "
                f"carry it (current: {FORMAT_VERSION}).")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "layer_bits": dict(self.layer_bits),
        }
        if self.method is not None:
            d["method"] = self.method
        if self.online_hadamard:
            d["online_hadamard"] = list(self.online_hadamard)
        if self.rotation is not None:
            d["rotation"] = self.rotation
        if self.avg_bits is not None:
            d["avg_bits"] = self.avg_bits
        if self.a_clip_ratio is not None:
            d["a_clip_ratio"] = self.a_clip_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---- per-layer lookups ----------------------------------------------------------------------
    def is_skipped(self, prefix: str) -> bool:
        """True when ``prefix`` (a dotted module name) falls under ``modules_to_not_convert``.

        An entry matches a whole dotted component run: "lm_head" skips "lm_head" and
        "model.lm_head"; "model.layers.0" skips everything in layer 0; "mlp" skips every mlp.
        """
        return _matches(prefix, self.modules_to_not_convert)

    def has_online_hadamard(self, prefix: str) -> bool:
        """True when the quantized layer ``prefix`` gets the run-time Hadamard input transform."""
        return _matches(prefix, self.online_hadamard)

    def clips_activations(self) -> bool:
        """True when the run-time activation quantizer clips (a_clip_ratio < 1)."""
        return self.a_bits != A16 and self.a_clip_ratio is not None and self.a_clip_ratio < 1

    def bits_for(self, prefix: str) -> int:
        """Weight bits of the layer ``prefix`` (``layer_bits`` overrides ``w_bits``)."""
        return self.layer_bits.get(prefix, self.w_bits)


def _matches(prefix: str, entries) -> bool:
    parts = prefix.split(".")
    for entry in entries:
        e = entry.split(".")
        if any(parts[i:i + len(e)] == e for i in range(len(parts) - len(e) + 1)):
            return True
    return False


def shard_names(prefix: str, packed_modules: Mapping[str, list[str]] | None = None) -> list[str]:
    """Checkpoint module names that a (possibly fused) vLLM module ``prefix`` is made of."""
    packed = DEFAULT_PACKED_MODULES if packed_modules is None else packed_modules
    head, _, last = prefix.rpartition(".")
    if last in packed:
        return [f"{head}.{s}" if head else s for s in packed[last]]
    return [prefix]
