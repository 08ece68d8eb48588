"""``BipolarConfig``: vLLM's view of a bipolar checkpoint's ``quantization_config``.

Parsing and validation live in :mod:`vllm_bipolar.format.spec` (shared with the converter);
this class adapts them to vLLM's ``QuantizationConfig`` interface and picks, per layer, the
linear method (bipolar, or unquantized for ``modules_to_not_convert``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .format.safetensors_header import SafetensorsHeaderError, read_safetensors_header
from .format.spec import DECODER_LINEARS, QUANT_METHOD, BipolarConfigError, BipolarQuantSpec, shard_names


class BipolarConfig(QuantizationConfig):
    """Bipolar-INT quantization (w_bits 1..8, a_bits 1..8 or 16), checkpoint format version 1."""

    def __init__(self, spec: BipolarQuantSpec | None = None):
        super().__init__()
        if spec is None:  # vLLM does this for `--quantization bipolar` on a checkpoint without a config
            raise BipolarConfigError(
                "quantization='bipolar' was requested but the checkpoint's config.json has no bipolar "
                "quantization_config; convert the model first: python -m quant_tools.convert SRC DST --w-bits 4")
        self.spec = spec

    def __repr__(self) -> str:
        return f"BipolarConfig({self.spec.to_dict()})"

    # ---- QuantizationConfig interface ---------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The pure-torch backend runs anywhere; CUDA kernels check their own needs in can_implement.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The quantization_config block of config.json is all we read.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BipolarConfig:
        return cls(BipolarQuantSpec.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        # vLLM calls this once with the model path when it builds its config, before any engine
        # process starts: the cheapest place to refuse a broken local checkpoint by its file headers.
        if Path(str(model_name)).is_dir():
            check_checkpoint(Path(str(model_name)), self.spec)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head (ParallelLMHead) and others stay unquantized
        names = shard_names(prefix, self.packed_modules_mapping or None)
        skipped = {n: self.spec.is_skipped(n) for n in names}
        if all(skipped.values()):
            return UnquantizedLinearMethod()
        bits = {n: self.spec.bits_for(n) for n in names}
        if any(skipped.values()) or len(set(bits.values())) > 1:
            raise BipolarConfigError(
                f"{prefix} is one fused layer in vLLM made of {names}, but the checkpoint gives them different "
                f"bits {bits} or skip status {skipped}; re-convert with equal bits for the fused shards.")
        from .linear_method import BipolarLinearMethod

        return BipolarLinearMethod(self, w_bits=next(iter(bits.values())), prefix=prefix)


# ---- checkpoint check at engine start (safetensors headers only: no tensor data is read) ------------
_FLOAT_DTYPES = ("F16", "BF16", "F32")


def _read_header(path: Path) -> dict[str, dict]:
    try:
        return read_safetensors_header(path)
    except SafetensorsHeaderError as e:
        raise BipolarConfigError(f"{e}; copy or re-convert it") from e


def checkpoint_tensors(model_dir: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape"}} over the checkpoint's safetensors files (headers only)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BipolarConfigError(f"{index}: invalid safetensors index ({e!r}); copy or re-convert the "
                                     "checkpoint") from e
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise BipolarConfigError(f"{index} names shard file(s) {missing} that are not in {model_dir}; the "
                                     "checkpoint is incomplete: copy it again or re-convert it")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    out: dict[str, dict] = {}
    for f in files:
        out.update(_read_header(model_dir / f))
    return out


def check_checkpoint(model_dir: Path, spec: BipolarQuantSpec) -> None:
    """Refuse a bipolar checkpoint whose tensors do not match its quantization_config, by name.

    Checked from the safetensors headers: files not truncated; every ``<m>.qweight`` is int32
    [bits_for(m), N, W] with ``<m>.scales`` [N, G] (and ``<m>.zeros``, same shape, exactly when not
    symmetric), G matching ceil(K/group_size) for 32W-31 <= K <= 32W, in a float dtype (format version 1)
    or as U8 / I8 codes with float ``scales_step`` / ``zeros_step`` [N] (version 2); every
    ``layer_bits`` key names a quantized layer; no decoder linear that the config quantizes is stored
    unquantized, and none it skips is stored quantized. Without safetensors files (other formats,
    remote models) nothing is checked here; the loader's per-tensor checks still apply.
    """
    tensors = checkpoint_tensors(model_dir)
    if not tensors:
        return
    fix = "The checkpoint is corrupt or its config.json does not belong to it; re-convert it with quant_tools.convert"
    modules = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    if not modules:
        raise BipolarConfigError(
            f"{model_dir}: config.json has a bipolar quantization_config but no checkpoint tensor is a bipolar "
            f"layer (no '<layer>.qweight'). {fix}")
    problems = []
    for m in modules:
        qw = tensors[f"{m}.qweight"]
        bits = spec.bits_for(m)
        if qw["dtype"] != "I32" or len(qw["shape"]) != 3 or qw["shape"][0] != bits:
            problems.append(f"{m}.qweight is {qw['dtype']} {qw['shape']}, expected I32 [{bits} (w_bits), N, ceil(K/32)]")
            continue
        if spec.is_skipped(m):
            problems.append(f"{m}.qweight is quantized but quantization_config['modules_to_not_convert'] "
                            "keeps this layer in full precision")
        _, n, words = qw["shape"]
        if spec.group_size == -1:
            groups = {1}
        else:
            groups = {math.ceil(k / spec.group_size) for k in (32 * words - 31, 32 * words)}
        want = f"[{n}, {'/'.join(map(str, sorted(groups)))}] (N rows, ceil(K/{spec.group_size}) groups)"
        # (name, group tensor?, allowed dtypes, what) of each (s, z) tensor, per format version
        if spec.format_version == 1:
            kinds = [("scales", True, _FLOAT_DTYPES, "a float tensor"), ("zeros", True, _FLOAT_DTYPES, "a float tensor")]
        else:
            kinds = [("scales", True, ("U8",), "a U8 tensor of scale codes"),
                     ("scales_step", False, _FLOAT_DTYPES, "a float tensor"),
                     ("zeros", True, ("I8",), "an I8 tensor of offset codes"),
                     ("zeros_step", False, _FLOAT_DTYPES, "a float tensor")]
        for name, per_group, dtypes, what in kinds:
            t, needed = tensors.get(f"{m}.{name}"), not (spec.symmetric and name.startswith("zeros"))
            shape_ok = ((lambda sh: len(sh) == 2 and sh[0] == n and min(groups) <= sh[1] <= max(groups)) if per_group
                        else (lambda sh: list(sh) == [n]))
            shape = want if per_group else f"[{n}] (one step per row)"
            if t is None:
                if needed:
                    problems.append(f"{m}.{name} is missing (expected {what} {shape})")
                continue
            if not needed:
                problems.append(f"{m}.{name} is present but quantization_config['symmetric'] is true")
            elif t["dtype"] not in dtypes or not shape_ok(t["shape"]):
                problems.append(f"{m}.{name} is {t['dtype']} {t['shape']}, expected {what} {shape} "
                                f"(format_version {spec.format_version})")
    for name in spec.layer_bits:
        if f"{name}.qweight" not in tensors:
            problems.append(
                f"quantization_config['layer_bits'] names '{name}', but the checkpoint has no quantized layer of "
                f"that name (no '{name}.qweight'); remove the entry or correct it (layers look like '{modules[0]}')")
    for n, t in tensors.items():
        m, _, leaf = n.rpartition(".")
        if leaf == "weight" and m.rpartition(".")[2] in DECODER_LINEARS and len(t["shape"]) == 2 and not spec.is_skipped(m):
            problems.append(f"{n} is unquantized, but quantization_config quantizes {m} (it is not in "
                            "modules_to_not_convert)")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise BipolarConfigError(f"{model_dir}: the checkpoint does not match its quantization_config: "
                                 + "; ".join(problems[:8]) + more + f". {fix}.")
