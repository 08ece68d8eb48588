"""Tensor-parallel loading of bipolar checkpoints through vLLM's own linear layers (CPU, no engine).

The real plugin (``vllm_bipolar.register()`` + ``BipolarConfig.from_config``) is given to vLLM's
QKVParallelLinear / MergedColumnParallelLinear / RowParallelLinear, with tensor parallelism
simulated by faking vLLM's TP group (``parallel_state._TP``, restored by monkeypatch). Checkpoint
tensors come from quantizing fresh random float weights with ``vllm_bipolar.format``, one tensor
set per checkpoint module (q/k/v_proj, gate/up_proj, down_proj), and are fed to each parameter's
``weight_loader`` the way vLLM's model loader does it (shard ids "q"/"k"/"v" and 0/1).

Checked, for w_bits 2 and 3, group size 128 and -1, symmetric and with offsets, tp 1 and 2, checkpoint
format versions 1 and 2 (8-bit scale/offset codes with per-row steps):
* every rank holds exactly its slice of qweight / scales / zeros (row-parallel, group -1: the
  per-row scales and offsets are replicated on every rank; version 2's per-row steps are sliced
  with the rows on column-parallel ranks and replicated on row-parallel ones);
* after ``process_weights_after_loading`` each rank's forward equals the float64 product with the
  dequantized weight restricted to that rank (column: its output rows; row: the partial product
  over its K slice), and the row-parallel partials sum to the full product;
* a row-parallel shard that splits a packed 32-bit word or a scale group is refused with an error
  naming the layer;
* a checkpoint tensor with the wrong number of bit planes / words or the wrong dtype is refused
  with an error naming ``<prefix>.qweight``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types

import pytest
import torch

pytest.importorskip("vllm")

import vllm.distributed.parallel_state as parallel_state  # noqa: E402
from vllm.model_executor.layers import linear as vllm_linear  # noqa: E402
from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,  # noqa: E402
                                               RowParallelLinear)

import vllm_bipolar  # noqa: E402
from vllm_bipolar.config import BipolarConfig  # noqa: E402
from vllm_bipolar.format import dequantize, pack_codes, quantize_weight  # noqa: E402
from vllm_bipolar.kernels import FORCE_ENV  # noqa: E402
from vllm_bipolar.linear_method import BipolarLinearMethod  # noqa: E402

# Model shapes (a small GQA Llama-like block).
HIDDEN = 256
HEAD_DIM = 32
NUM_HEADS = 8
INTERMEDIATE = 384  # gate/up output each; down_proj input is 2 * INTERMEDIATE = 768
DOWN_IN = 2 * INTERMEDIATE
TOKENS = 5

QKV_PREFIX = "model.layers.0.self_attn.qkv_proj"
GATE_UP_PREFIX = "model.layers.0.mlp.gate_up_proj"
DOWN_PREFIX = "model.layers.0.mlp.down_proj"

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _registered():
    vllm_bipolar.register()
    assert BipolarLinearMethod.__name__ in vllm_linear.WEIGHT_LOADER_V2_SUPPORTED


@pytest.fixture(autouse=True)
def _torch_kernel(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)  # let the chooser pick (torch backend on CPU)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tensors are tiny: intra-op threads only add overhead (several times the run on a busy box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test; its seed (initial_seed()) is in the assertion messages."""
    seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def set_tp(monkeypatch):
    """set_tp(rank, size): fake vLLM's tensor-parallel group (read by linear.py and parameter.py)."""

    def _set(rank: int, size: int) -> None:
        monkeypatch.setattr(parallel_state, "_TP", types.SimpleNamespace(rank_in_group=rank, world_size=size))
        assert parallel_state.get_tensor_model_parallel_rank() == rank
        assert parallel_state.get_tensor_model_parallel_world_size() == size

    return _set


def make_config(w_bits: int, group_size: int, symmetric: bool, fmt: int = 1) -> BipolarConfig:
    return BipolarConfig.from_config({
        "quant_method": "bipolar", "format_version": fmt, "w_bits": w_bits, "a_bits": 16,
        "group_size": group_size, "symmetric": symmetric,
    })


# ---- checkpoint construction ---------------------------------------------------------------------
@dataclasses.dataclass
class CkptModule:
    """The tensors of one checkpoint module, as quant_tools.convert would write them."""

    qweight: torch.Tensor  # int32 [w_bits, N, ceil(K/32)]
    scales: torch.Tensor  # [N, G] (format version 2: uint8 codes)
    zeros: torch.Tensor | None  # [N, G] or None (symmetric) (format version 2: int8 codes)
    dense: torch.Tensor  # float64 [N, K]: the dequantized weight (the reference)
    scales_step: torch.Tensor | None = None  # [N], format version 2
    zeros_step: torch.Tensor | None = None  # [N], format version 2 with offsets

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name in ("qweight", "scales", "zeros", "scales_step", "zeros_step")
                if (t := getattr(self, name)) is not None}


def make_module(n: int, k: int, w_bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                gen: torch.Generator, fmt: int = 1) -> CkptModule:
    w = torch.randn(n, k, generator=gen) * 0.05 + torch.randn(n, 1, generator=gen) * 0.02
    q = quantize_weight(w, w_bits, group_size=group_size, symmetric=symmetric, dtype=dtype, format_version=fmt)
    assert q.scales.dtype == dtype
    dense = dequantize(q.codes, q.scales, q.zeros, w_bits, group_size, torch.float64)
    stored = q.stored()
    assert stored["scales"].dtype == (torch.uint8 if fmt == 2 else dtype)
    return CkptModule(pack_codes(q.codes, w_bits), stored["scales"], stored.get("zeros"), dense,
                      stored.get("scales_step"), stored.get("zeros_step"))


def fuse(*modules: CkptModule) -> CkptModule:
    """One checkpoint module made of ``modules`` stacked along N, as Phi-3 stores qkv_proj / gate_up_proj."""
    def cat(name, dim=0):
        return None if getattr(modules[0], name) is None else torch.cat([getattr(m, name) for m in modules], dim)

    return CkptModule(cat("qweight", 1), cat("scales"), cat("zeros"), cat("dense"), cat("scales_step"),
                      cat("zeros_step"))


def load_shards(layer: torch.nn.Module, shards: list[tuple[CkptModule, object]], on_disk: str) -> None:
    """Load (module, shard id) pairs one by one ("split", as Llama stores them) or stacked into one
    checkpoint module loaded without a shard id ("fused", as Phi-3 stores them: vLLM splits it)."""
    if on_disk == "fused":
        load_module(layer, fuse(*(m for m, _ in shards)))
    else:
        for module, shard_id in shards:
            load_module(layer, module, shard_id)


def load_module(layer: torch.nn.Module, module: CkptModule, *shard_id) -> None:
    """What vLLM's model loader does for one checkpoint module: param.weight_loader(param, t[, shard_id])."""
    params = dict(layer.named_parameters())
    for name, tensor in module.tensors().items():
        param = params[name]
        param.weight_loader(param, tensor, *shard_id)
    if module.zeros is None:
        assert "zeros" not in params and "zeros_step" not in params and layer.zeros is None


def _msg(gen: torch.Generator, what: str) -> str:
    return f"{what} (seed {gen.initial_seed()})"


def assert_params_equal(layer, expected: dict[str, torch.Tensor], gen, where: str) -> None:
    for name, exp in expected.items():
        got = getattr(layer, name).data
        assert got.dtype == exp.dtype, _msg(gen, f"{where}: {name} dtype {got.dtype} != {exp.dtype}")
        assert got.shape == exp.shape, _msg(gen, f"{where}: {name} shape {tuple(got.shape)} != {tuple(exp.shape)}")
        assert torch.equal(got, exp), _msg(gen, f"{where}: {name} differs from the expected checkpoint slice")


def run_forward(layer, x: torch.Tensor) -> torch.Tensor:
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.bipolar_kernel.name == "torch"
    out, bias = layer(x)
    assert bias is None
    assert out.dtype == x.dtype
    return out


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, gen, where: str) -> None:
    assert out.shape == ref.shape, _msg(gen, f"{where}: output shape {tuple(out.shape)} != {tuple(ref.shape)}")
    err = ((out.to(torch.float64) - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], _msg(gen, f"{where}: relative error {err:.3g} >= {TOLERANCE[dtype]}")


def _rows(t: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    return t.narrow(dim, start, size)


def expected_column(parts: list[tuple[CkptModule, int, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Expected params and dense weight of a column-parallel rank made of (module, row start, rows)."""
    exp = {"qweight": torch.cat([_rows(m.qweight, 1, s, n) for m, s, n in parts], 1)}
    for name in parts[0][0].tensors():
        if name != "qweight":
            exp[name] = torch.cat([_rows(getattr(m, name), 0, s, n) for m, s, n in parts], 0)
    dense = torch.cat([_rows(m.dense, 0, s, n) for m, s, n in parts], 0)
    return exp, dense


# Every quantization case in float32 (exact up to float32 rounding); bfloat16 (the usual model
# dtype) for a few of them, which is enough to cover its dtype handling and keeps the run short.
QUANT_CASES = [pytest.param(b, g, s, torch.float32, 1, id=f"w{b}-g{g}-{'sym' if s else 'asym'}-fp32")
               for b in (2, 3) for g in (128, -1) for s in (True, False)]
QUANT_CASES += [pytest.param(b, g, s, torch.bfloat16, 1, id=f"w{b}-g{g}-{'sym' if s else 'asym'}-bf16")
                for b, g, s in ((3, 128, False), (2, -1, True))]
# Format version 2 (8-bit scale/offset codes, per-row steps): offsets and symmetric, both dtypes.
QUANT_CASES += [pytest.param(b, g, s, d, 2, id=f"w{b}-g{g}-{'sym' if s else 'asym'}-{n}-v2")
                for b, g, s, d, n in ((2, 128, False, torch.float32, "fp32"), (3, -1, True, torch.bfloat16, "bf16"),
                                      (3, 128, False, torch.bfloat16, "bf16"))]
TP_SIZES = [pytest.param(1, id="tp1"), pytest.param(2, id="tp2")]


# ---- 1 + 2: sharded loading and per-rank forward -------------------------------------------------
@pytest.mark.parametrize("on_disk", ["split", "fused"])
@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv2", "kv1"])
@pytest.mark.parametrize("w_bits,group_size,symmetric,dtype,fmt", QUANT_CASES)
def test_qkv_parallel(w_bits, group_size, symmetric, dtype, fmt, num_kv_heads, tp, on_disk, gen, set_tp):
    cfg = make_config(w_bits, group_size, symmetric, fmt)
    q = make_module(NUM_HEADS * HEAD_DIM, HIDDEN, w_bits, group_size, symmetric, dtype, gen, fmt)
    k = make_module(num_kv_heads * HEAD_DIM, HIDDEN, w_bits, group_size, symmetric, dtype, gen, fmt)
    v = make_module(num_kv_heads * HEAD_DIM, HIDDEN, w_bits, group_size, symmetric, dtype, gen, fmt)
    x = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
    q_rows = NUM_HEADS // tp * HEAD_DIM
    kv_heads_per_rank = max(num_kv_heads // tp, 1)  # fewer kv heads than ranks: each rank gets one, replicated
    kv_rows = kv_heads_per_rank * HEAD_DIM
    outs = []
    for rank in range(tp):
        set_tp(rank, tp)
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, bias=False, params_dtype=dtype,
                                  quant_config=cfg, prefix=QKV_PREFIX)
        assert isinstance(layer.quant_method, BipolarLinearMethod)
        assert layer.quant_method.prefix == QKV_PREFIX and layer.quant_method.w_bits == w_bits
        load_shards(layer, [(q, "q"), (k, "k"), (v, "v")], on_disk)
        kv_src = rank if num_kv_heads >= tp else rank // (tp // num_kv_heads)  # index in units of kv_rows
        exp, dense = expected_column([(q, rank * q_rows, q_rows), (k, kv_src * kv_rows, kv_rows),
                                      (v, kv_src * kv_rows, kv_rows)])
        assert_params_equal(layer, exp, gen, f"qkv tp={tp} rank={rank}")
        out = run_forward(layer, x)
        assert_close(out, x.to(torch.float64) @ dense.T, dtype, gen, f"qkv tp={tp} rank={rank}")
        outs.append(out)
    if tp > 1 and num_kv_heads < tp:  # replicated kv heads: every rank computes the same k and v
        assert torch.equal(outs[0][:, q_rows:], outs[1][:, q_rows:])


@pytest.mark.parametrize("on_disk", ["split", "fused"])
@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("w_bits,group_size,symmetric,dtype,fmt", QUANT_CASES)
def test_merged_column_parallel(w_bits, group_size, symmetric, dtype, fmt, tp, on_disk, gen, set_tp):
    cfg = make_config(w_bits, group_size, symmetric, fmt)
    gate = make_module(INTERMEDIATE, HIDDEN, w_bits, group_size, symmetric, dtype, gen, fmt)
    up = make_module(INTERMEDIATE, HIDDEN, w_bits, group_size, symmetric, dtype, gen, fmt)
    x = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
    rows = INTERMEDIATE // tp
    for rank in range(tp):
        set_tp(rank, tp)
        layer = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], bias=False, params_dtype=dtype,
                                           quant_config=cfg, prefix=GATE_UP_PREFIX)
        assert isinstance(layer.quant_method, BipolarLinearMethod)
        load_shards(layer, [(gate, 0), (up, 1)], on_disk)
        exp, dense = expected_column([(gate, rank * rows, rows), (up, rank * rows, rows)])
        assert_params_equal(layer, exp, gen, f"gate_up tp={tp} rank={rank}")
        out = run_forward(layer, x)
        assert_close(out, x.to(torch.float64) @ dense.T, dtype, gen, f"gate_up tp={tp} rank={rank}")


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("w_bits,group_size,symmetric,dtype,fmt", QUANT_CASES)
def test_row_parallel(w_bits, group_size, symmetric, dtype, fmt, tp, gen, set_tp):
    cfg = make_config(w_bits, group_size, symmetric, fmt)
    down = make_module(HIDDEN, DOWN_IN, w_bits, group_size, symmetric, dtype, gen, fmt)
    x = torch.randn(TOKENS, DOWN_IN, generator=gen).to(dtype)
    k_part = DOWN_IN // tp
    words = k_part // 32
    total = torch.zeros(TOKENS, HIDDEN, dtype=torch.float64)
    for rank in range(tp):
        set_tp(rank, tp)
        layer = RowParallelLinear(DOWN_IN, HIDDEN, bias=False, params_dtype=dtype, reduce_results=False,
                                  quant_config=cfg, prefix=DOWN_PREFIX)
        assert isinstance(layer.quant_method, BipolarLinearMethod)
        assert layer.input_size_per_partition == k_part
        load_module(layer, down)
        exp = {"qweight": down.qweight[:, :, rank * words:(rank + 1) * words]}
        for name, t in down.tensors().items():
            if name == "qweight":
                continue
            if name.endswith("_step"):  # format version 2: one step per output row, replicated
                exp[name] = t
            elif group_size == -1:  # one scale/offset per row, for the whole K: replicated, [N, 1]
                assert t.shape == (HIDDEN, 1)
                exp[name] = t
            else:  # K is sliced on group boundaries: this rank's groups
                groups = k_part // group_size
                exp[name] = t[:, rank * groups:(rank + 1) * groups]
        assert_params_equal(layer, exp, gen, f"down tp={tp} rank={rank}")
        x_part = x[:, rank * k_part:(rank + 1) * k_part]
        out = run_forward(layer, x_part)
        partial = x_part.to(torch.float64) @ down.dense[:, rank * k_part:(rank + 1) * k_part].T
        assert_close(out, partial, dtype, gen, f"down tp={tp} rank={rank} (partial product)")
        total += out.to(torch.float64)
    assert_close(total, x.to(torch.float64) @ down.dense.T, dtype, gen, f"down tp={tp} (sum over ranks)")


# ---- 3: row-parallel shards that split a word or a scale group ------------------------------------
@pytest.mark.parametrize("k_full,group_size,what", [
    pytest.param(2 * 96, 128, "scale group of 128", id="K192-g128-splits-group"),
    pytest.param(2 * 48, -1, "32-bit word", id="K96-gper-row-splits-word"),
    pytest.param(2 * 112, 128, "32-bit word", id="K224-g128-splits-word"),
])
@pytest.mark.parametrize("rank", [0, 1])
def test_misaligned_row_shard_is_refused(k_full, group_size, what, rank, set_tp):
    prefix = "model.layers.7.mlp.down_proj"
    cfg = make_config(2, group_size, False)
    set_tp(rank, 2)
    with pytest.raises(ValueError, match=r"shard edge falls inside a " + re.escape(what)) as info:
        RowParallelLinear(k_full, 64, bias=False, reduce_results=False, quant_config=cfg, prefix=prefix)
    msg = str(info.value)
    assert prefix in msg
    assert f"K={k_full}" in msg and f"shards of {k_full // 2}" in msg and "tp=2" in msg
    # The same layer is fine without tensor parallelism.
    set_tp(0, 1)
    RowParallelLinear(k_full, 64, bias=False, reduce_results=False, quant_config=cfg, prefix=prefix)


# ---- 4: checkpoint tensors of the wrong layout ---------------------------------------------------
def _corrupt(qweight: torch.Tensor, how: str) -> torch.Tensor:
    if how == "extra-plane":
        return torch.cat([qweight, qweight[:1]], 0)
    if how == "missing-plane":
        return qweight[:-1]
    if how == "extra-word":
        return torch.cat([qweight, qweight[:, :, :1]], 2)
    if how == "int64":
        return qweight.to(torch.int64)
    if how == "float32":
        return qweight.to(torch.float32)
    raise AssertionError(how)


PROBLEM_WORDS = {"extra-plane": "bit planes", "missing-plane": "bit planes", "extra-word": "32-bit words",
                 "int64": "dtype should be torch.int32", "float32": "dtype should be torch.int32"}


@pytest.mark.parametrize("how", list(PROBLEM_WORDS))
@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("tp,rank", [(1, 0), (2, 1)], ids=["tp1", "tp2-rank1"])
def test_wrong_qweight_layout_is_refused(kind, how, tp, rank, gen, set_tp):
    w_bits, group_size = 3, 128
    cfg = make_config(w_bits, group_size, False)
    set_tp(rank, tp)
    if kind == "qkv":
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, 2, bias=False, params_dtype=torch.float32,
                                  quant_config=cfg, prefix=QKV_PREFIX)
        prefix, n, k, shard_id = QKV_PREFIX, 2 * HEAD_DIM, HIDDEN, ("k",)
    elif kind == "gate_up":
        layer = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE] * 2, bias=False, params_dtype=torch.float32,
                                           quant_config=cfg, prefix=GATE_UP_PREFIX)
        prefix, n, k, shard_id = GATE_UP_PREFIX, INTERMEDIATE, HIDDEN, (1,)
    else:
        layer = RowParallelLinear(DOWN_IN, HIDDEN, bias=False, params_dtype=torch.float32, reduce_results=False,
                                  quant_config=cfg, prefix=DOWN_PREFIX)
        prefix, n, k, shard_id = DOWN_PREFIX, HIDDEN, DOWN_IN, ()
    # Any int32 words are valid bit planes; this one has the checkpoint shape of the module.
    good = torch.randint(-2**31, 2**31, (w_bits, n, k // 32), dtype=torch.int32, generator=gen)
    param = layer.qweight
    before = param.data.clone()
    bad = _corrupt(good, how)
    with pytest.raises(ValueError, match=re.escape(f"{prefix}.qweight")) as info:
        param.weight_loader(param, bad, *shard_id)
    assert PROBLEM_WORDS[how] in str(info.value)
    assert torch.equal(param.data, before), "a rejected tensor must not be copied into the parameter"
    # The intact tensor loads (the checks do not reject a valid shard).
    param.weight_loader(param, good, *shard_id)


@pytest.mark.parametrize("tensor", ["scales", "zeros"])
def test_wrong_scale_dtype_is_refused(tensor, gen, set_tp):
    set_tp(0, 1)
    cfg = make_config(2, 128, False)
    layer = RowParallelLinear(DOWN_IN, HIDDEN, bias=False, params_dtype=torch.float32, reduce_results=False,
                              quant_config=cfg, prefix=DOWN_PREFIX)
    good = make_module(HIDDEN, DOWN_IN, 2, 128, False, torch.float32, gen)
    param = getattr(layer, tensor)
    with pytest.raises(ValueError, match=re.escape(f"{DOWN_PREFIX}.{tensor}") + ".*floating point"):
        param.weight_loader(param, getattr(good, tensor).to(torch.int32))
    with pytest.raises(ValueError, match=re.escape(f"{DOWN_PREFIX}.{tensor}") + ".*groups"):
        param.weight_loader(param, getattr(good, tensor)[:, :-1])


@pytest.mark.parametrize("tensor", ["scales", "zeros", "scales_step", "zeros_step"])
def test_wrong_v2_tensor_is_refused(tensor, gen, set_tp):
    """Format version 2: codes must be uint8 / int8 (a version 1 float tensor is refused), steps float [N]."""
    set_tp(0, 1)
    layer = RowParallelLinear(DOWN_IN, HIDDEN, bias=False, params_dtype=torch.bfloat16, reduce_results=False,
                              quant_config=make_config(2, 128, False, fmt=2), prefix=DOWN_PREFIX)
    good = make_module(HIDDEN, DOWN_IN, 2, 128, False, torch.bfloat16, gen, fmt=2)
    param, t = getattr(layer, tensor), getattr(good, tensor)
    if tensor.endswith("_step"):
        bad, why = t.to(torch.int8), "floating point"
    else:
        bad, why = t.to(torch.bfloat16), f"dtype should be {t.dtype}"
    with pytest.raises(ValueError, match=re.escape(f"{DOWN_PREFIX}.{tensor}") + ".*" + re.escape(why)):
        param.weight_loader(param, bad)
    with pytest.raises(ValueError, match=re.escape(f"{DOWN_PREFIX}.{tensor}") + ".*output rows"):
        param.weight_loader(param, t[:-1])
    param.weight_loader(param, t)  # the intact tensor loads


# ---- per-layer method selection -------------------------------------------------------------------
def _layers(set_tp, quant_config):
    set_tp(0, 1)
    up = MergedColumnParallelLinear(64, [96, 96], bias=False, quant_config=quant_config,
                                    prefix="model.layers.1.mlp.gate_up_proj", params_dtype=torch.float32)
    down = RowParallelLinear(96, 64, bias=False, quant_config=quant_config, reduce_results=False,
                             prefix="model.layers.1.mlp.down_proj", params_dtype=torch.float32)
    return up, down


def test_skipped_and_per_layer_bits(set_tp):
    cfg = BipolarConfig.from_config({
        "quant_method": "bipolar", "format_version": 1, "w_bits": 3,
        "modules_to_not_convert": ["lm_head", "down_proj"],
        "layer_bits": {"model.layers.1.mlp.gate_proj": 5, "model.layers.1.mlp.up_proj": 5}})
    up, down = _layers(set_tp, cfg)
    assert isinstance(down.quant_method, vllm_linear.UnquantizedLinearMethod) and down.weight.shape == (64, 96)
    assert isinstance(up.quant_method, BipolarLinearMethod) and up.qweight.shape == (5, 192, 2)


def test_fused_shards_with_different_bits_are_refused(set_tp):
    cfg = BipolarConfig.from_config({"quant_method": "bipolar", "format_version": 1, "w_bits": 3,
                                     "layer_bits": {"model.layers.1.mlp.up_proj": 4}})
    with pytest.raises(ValueError, match=r"gate_up_proj is one fused layer .* different bits"):
        _layers(set_tp, cfg)


def test_bipolar_requested_without_a_config():
    with pytest.raises(ValueError, match="has no bipolar quantization_config; convert the model first"):
        BipolarConfig()
    with pytest.raises(ValueError, match=r"'w_bits'\] = 9"):
        BipolarConfig.from_config({"quant_method": "bipolar", "format_version": 1, "w_bits": 9})
