"""``BipolarLinearMethod``: declares a bipolar layer's parameters and hands compute to a kernel backend.

Parameters, in checkpoint format version 1 (DESIGN.md section 4), on one tensor-parallel rank:
  qweight  int32 [w_bits, N, ceil(K/32)]   PackedvLLMParameter: output_dim 1, input_dim/packed_dim 2
  scales   [N, G] act dtype                GroupQuantScaleParameter (ChannelQuantScale... if group -1)
  zeros    [N, G] act dtype                same class as scales; only when symmetric is false
Format version 2 (format/group_params.py) stores ``scales`` as uint8 and ``zeros`` as int8 codes (same
classes and shapes) plus ``scales_step`` / ``zeros_step`` [N] act dtype (ChannelQuantScaleParameter);
they are decoded to the version 1 tensors once loaded, before a kernel backend repacks them.
vLLM's parameter classes narrow N for column-parallel and fused (QKV, gate_up) layers and K for
row-parallel layers. K is packed 32 per word and grouped, so a row-parallel shard must start on a
word and group boundary: checked here with an error that says which tensor-parallel sizes work.
"""

from __future__ import annotations

import math

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from .format.group_params import GROUP_TENSORS, decode_tensors
from .format.packing import WORD_BITS, num_words
from .format.quantize import clip_activations, num_groups
from .format.spec import shard_names
from .format.transforms import block_hadamard, hadamard_block
from .kernels import BipolarLayerConfig, choose_kernel
from .kernels.base import replace_parameter

logger = init_logger("vllm.bipolar")  # under "vllm" so vLLM's logging config prints it
_LOGGED_KERNELS: set[str] = set()  # log each backend's first use once per process
# Set once any bipolar checkpoint tensor went through a loader in this process. A layer that got no
# tensor at all is then a checkpoint without that layer (an error); when nothing was ever loaded the
# weights are vLLM's dummy weights (load_format="dummy", benchmarks) and nothing is checked.
_CHECKPOINT_LOADED = False


class BipolarShardError(ValueError):
    """A tensor-parallel shard of a bipolar layer would split a packed word or a scale group."""


def _check_row_shard(prefix: str, k_part: int, k_full: int, group_size: int) -> None:
    if k_part == k_full:
        return
    tp = k_full // k_part if k_part else 0
    unit = WORD_BITS if group_size == -1 else math.lcm(WORD_BITS, group_size)
    if k_part % unit:
        what = "32-bit word" if k_part % WORD_BITS else f"scale group of {group_size}"
        ok = [t for t in range(1, 65) if k_full % t == 0 and (t == 1 or (k_full // t) % unit == 0)]
        hint = (" or re-convert with a group size that divides the shard" if k_part % WORD_BITS == 0
                else f" (K/tp must be a multiple of {WORD_BITS})")
        raise BipolarShardError(
            f"{prefix}: tensor parallelism splits the input dimension K={k_full} into shards of {k_part} "
            f"(tp={tp}), so a shard edge falls inside a {what}; bipolar row-parallel shards must be "
            f"multiples of {unit}. Use a tensor-parallel size in {ok[:8]}{hint}.")


class BipolarLinearMethod(LinearMethodBase):
    def __init__(self, quant_config, w_bits: int, prefix: str = ""):
        self.quant_config = quant_config
        self.spec = quant_config.spec
        self.w_bits = w_bits
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        spec, bits = self.spec, self.w_bits
        n, k = sum(output_partition_sizes), input_size_per_partition
        _check_row_shard(self.prefix, k, input_size, spec.group_size)
        loader = extra_weight_attrs["weight_loader"]
        layer.bipolar_loaded = {}  # parameter name -> shard ids loaded (checked after loading)
        planes = {0: (bits, "bit planes = w_bits"), 2: (num_words(input_size), "32-bit words = ceil(K/32)")}
        qweight = PackedvLLMParameter(
            data=torch.zeros(bits, n, num_words(k), dtype=torch.int32),  # zeros: dummy loads leave ints as is
            output_dim=1, input_dim=2, packed_dim=2, packed_factor=WORD_BITS,
            weight_loader=_checked_loader(loader, self.prefix, "qweight", planes, torch.int32, layer=layer,
                                          row_dim=1))
        layer.register_parameter("qweight", qweight)
        groups = {1: (num_groups(input_size, spec.group_size), "groups = ceil(K/group_size)")}
        g = num_groups(k, spec.group_size)
        coded = spec.format_version == 2
        for name in group_tensor_names(spec):
            if name.endswith("_step"):  # version 2: one step per output row, replicated across row shards
                param = ChannelQuantScaleParameter(
                    data=torch.empty(n, dtype=params_dtype), output_dim=0,
                    weight_loader=_checked_loader(loader, self.prefix, name, {}, None, layer=layer, row_dim=0))
                layer.register_parameter(name, param)
                continue
            if coded:  # 8-bit codes; dummy loads leave ints as they are: scale code 1 (a nonzero scale), offset 0
                data = (torch.ones if name == "scales" else torch.zeros)(
                    n, g, dtype=torch.uint8 if name == "scales" else torch.int8)
            else:
                data = torch.empty(n, g, dtype=params_dtype)
            weight_loader = _checked_loader(loader, self.prefix, name, groups, data.dtype if coded else None,
                                            layer=layer, row_dim=0)
            if spec.group_size == -1:  # one value per row: replicated across row-parallel ranks
                param = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=weight_loader)
            else:
                param = GroupQuantScaleParameter(data=data, output_dim=0, input_dim=1, weight_loader=weight_loader)
            layer.register_parameter(name, param)
        if spec.symmetric:
            layer.zeros = None
        # Run-time input transform (online_hadamard): blocks of the full K; a row-parallel shard must
        # hold whole blocks (the converter rotated the weights block by block over the full K).
        layer.bipolar_hadamard_block = 0
        if spec.has_online_hadamard(self.prefix):
            block = hadamard_block(input_size)
            if k % block:
                raise BipolarShardError(
                    f"{self.prefix}: the online Hadamard transform works on blocks of {block} input channels, "
                    f"but this tensor-parallel shard has K={k} of {input_size}; use a tensor-parallel size "
                    f"that divides {input_size // block}.")
            layer.bipolar_hadamard_block = block
        # Run-time activation clipping (a_clip_ratio): each token clamped at a fraction of its absmax
        # before the backend's per-token quantizer, which then takes its scale from the clipped range.
        layer.bipolar_a_clip_ratio = spec.a_clip_ratio if spec.clips_activations() else None
        cfg = BipolarLayerConfig(n=n, k=k, w_bits=bits, a_bits=spec.a_bits, group_size=spec.group_size,
                                 symmetric=spec.symmetric, act_dtype=params_dtype)
        layer.bipolar_config = cfg

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _check_complete(self.prefix, layer, group_tensor_names(self.spec))
        _check_finite(self.prefix, layer)
        if self.spec.format_version == 2:
            _decode_group_params(layer)
        kernel_cls = choose_kernel(layer.bipolar_config, layer.qweight.device)
        if kernel_cls.name not in _LOGGED_KERNELS:
            _LOGGED_KERNELS.add(kernel_cls.name)
            logger.info("bipolar: %s runs on kernel backend '%s' (%s)", self.prefix, kernel_cls.name,
                        layer.bipolar_config.describe())
        layer.bipolar_kernel = kernel_cls(layer.bipolar_config)
        layer.bipolar_kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.bipolar_hadamard_block:
            x = block_hadamard(x, layer.bipolar_hadamard_block)
        if layer.bipolar_a_clip_ratio is not None:
            x = clip_activations(x, layer.bipolar_a_clip_ratio)
        return layer.bipolar_kernel.apply_weights(layer, x, bias)


def group_tensor_names(spec) -> tuple[str, ...]:
    """A layer's scale/offset tensors besides qweight, in the checkpoint's format version."""
    names = GROUP_TENSORS[spec.format_version]
    return tuple(n for n in names if not (spec.symmetric and n.startswith("zeros")))


def _decode_group_params(layer: torch.nn.Module) -> None:
    """Format version 2: replace the codes and steps by the (s, z) they stand for (version 1 tensors)."""
    tensors = {name: getattr(layer, name).data for name in GROUP_TENSORS[2] if getattr(layer, name, None) is not None}
    scales, zeros = decode_tensors(tensors, layer.bipolar_config.act_dtype)
    for name, data in (("scales", scales), ("zeros", zeros), ("scales_step", None), ("zeros_step", None)):
        if name in layer._parameters:
            replace_parameter(layer, name, data)


def _check_finite(prefix: str, layer: torch.nn.Module) -> None:
    """NaN/inf scales, offsets or steps would turn every output of the layer into NaN: refuse them by name."""
    for name in ("scales", "zeros", "scales_step", "zeros_step"):
        t = getattr(layer, name, None)
        if t is None or not t.is_floating_point() or torch.isfinite(t).all():
            continue
        bad = (~torch.isfinite(t)).nonzero()
        row = int(bad[0, 0])
        where = f"{prefix}.{name}"
        sizes = list(getattr(layer, "output_partition_sizes", None) or [])
        names = shard_names(prefix)
        if len(sizes) == len(names) > 1:  # fused layer: name the checkpoint tensor the row came from
            idx = next(i for i in range(len(sizes)) if row < sum(sizes[:i + 1]))
            row -= sum(sizes[:idx])
            where = f"{names[idx]}.{name} (part of {prefix}.{name})"
        raise ValueError(f"checkpoint tensor {where} has {len(bad)} NaN/inf value(s) (first at row {row}, "
                         f"{'group ' + str(int(bad[0, 1])) if t.dim() > 1 else 'its step'}); every scale, offset "
                         "and step must be finite. The checkpoint is "
                         "corrupt: re-convert it from the original model with quant_tools.convert.")


def _shard_ids(layer: torch.nn.Module) -> list:
    """The shard ids vLLM loads a layer's checkpoint tensors with (None: one unfused tensor)."""
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
        return ["q", "k", "v"]
    sizes = getattr(layer, "output_sizes", None)  # MergedColumnParallelLinear
    return list(range(len(sizes))) if sizes else [None]


def _checkpoint_name(prefix: str, shard_id, layer: torch.nn.Module | None, tensor: str) -> str:
    """The checkpoint tensor a (possibly fused) layer's shard comes from, e.g. ...k_proj.scales."""
    ids = _shard_ids(layer) if layer is not None else [None]
    names = shard_names(prefix)
    if shard_id in ids and shard_id is not None and len(names) == len(ids):
        return f"{names[ids.index(shard_id)]}.{tensor} (shard {shard_id!r} of {prefix}.{tensor})"
    return f"{prefix}.{tensor}"


def _checkpoint_rows(layer: torch.nn.Module, shard_id) -> int | None:
    """Output rows the checkpoint tensor of ``shard_id`` has before tensor-parallel slicing (None: unknown)."""
    if isinstance(shard_id, tuple):
        rows = [_checkpoint_rows(layer, s) for s in shard_id]
        return None if None in rows else sum(rows)
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear: kv heads may be replicated across ranks
        head, kv = layer.head_size, layer.total_num_kv_heads
        sizes = {"q": layer.total_num_heads * head, "k": kv * head, "v": kv * getattr(layer, "v_head_size", head)}
        return sum(sizes.values()) if shard_id is None else sizes.get(shard_id)
    sizes = getattr(layer, "output_sizes", None)
    if isinstance(shard_id, int) and sizes and 0 <= shard_id < len(sizes):
        return sizes[shard_id]
    if shard_id is None:
        return sum(sizes) if sizes else getattr(layer, "output_size", None)
    return None


def _checked_loader(weight_loader, prefix: str, tensor: str, dims: dict[int, tuple[int, str]],
                    dtype: torch.dtype | None,
                    layer: torch.nn.Module | None = None, row_dim: int | None = None):
    """Wrap vLLM's loader so a checkpoint tensor of the wrong shape or dtype fails with its name.

    ``dims`` maps a dimension of the checkpoint tensor to its expected size and meaning. The output
    dimension ``row_dim`` is checked against the rows of the checkpoint module the shard comes from
    (fused layers load one shard at a time, sliced by vLLM): vLLM itself would silently take the
    first rows of a tensor that has too many, or fail inside torch on one that has too few.
    ``dtype`` is the dtype the checkpoint tensor must have (None: any floating-point dtype).
    Loaded shards are recorded on ``layer.bipolar_loaded`` for the completeness check.
    """

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        global _CHECKPOINT_LOADED
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        name = _checkpoint_name(prefix, shard_id, layer, tensor)
        problems = []
        if loaded_weight.dim() != param.dim():
            problems.append(f"expected {param.dim()} dimensions, got shape {tuple(loaded_weight.shape)}")
        else:
            problems += [f"dimension {d} should be {size} ({what}), got {loaded_weight.shape[d]}"
                         for d, (size, what) in dims.items() if loaded_weight.shape[d] != size]
            rows = _checkpoint_rows(layer, shard_id) if layer is not None and row_dim is not None else None
            if rows is not None and loaded_weight.shape[row_dim] != rows:
                problems.append(f"dimension {row_dim} should be {rows} (output rows of the layer), "
                                f"got {loaded_weight.shape[row_dim]}")
        if dtype is not None and loaded_weight.dtype != dtype:
            problems.append(f"dtype should be {dtype}, got {loaded_weight.dtype}")
        if dtype is None and not loaded_weight.is_floating_point():
            problems.append(f"dtype should be floating point, got {loaded_weight.dtype}")
        if problems:
            raise ValueError(f"checkpoint tensor {name} does not match its quantization_config: "
                             + "; ".join(problems) + ". The checkpoint is corrupt or its config.json does not "
                             "belong to it; re-convert it with quant_tools.convert.")
        result = weight_loader(param, loaded_weight, *args, **kwargs)
        _CHECKPOINT_LOADED = True
        if layer is not None:
            loaded = layer.bipolar_loaded.setdefault(tensor, set())
            loaded.update(shard_id if isinstance(shard_id, tuple) else (shard_id,))
        return result

    return load


def _check_complete(prefix: str, layer: torch.nn.Module, group_tensors: tuple[str, ...]) -> None:
    """Every bipolar tensor of the layer (every shard of a fused layer) came from the checkpoint.

    vLLM leaves a parameter whose tensor is missing from the checkpoint uninitialized (torch.empty)
    without a word, which would serve garbage. Skipped when no checkpoint tensor was loaded in this
    process at all (dummy weights).
    """
    loaded = getattr(layer, "bipolar_loaded", None)
    if loaded is None or not _CHECKPOINT_LOADED:
        return
    wanted = ["qweight", *group_tensors]
    missing = []
    for tensor in wanted:
        got = loaded.get(tensor, set())
        if None in got:  # one unfused (or already fused) checkpoint tensor covers every shard
            continue
        missing += [_checkpoint_name(prefix, s, layer, tensor).split(" ")[0]
                    for s in _shard_ids(layer) if s not in got]
    if missing:
        raise ValueError(f"{prefix}: the checkpoint lacks tensor(s) {missing}, so this layer's weights would be "
                         "uninitialized memory. The checkpoint is incomplete or corrupt (an interrupted copy?); "
                         "re-convert it with quant_tools.convert or copy it again.")
