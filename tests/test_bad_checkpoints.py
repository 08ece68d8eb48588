"""Bad bipolar checkpoints at engine start: each refused with one message naming the tensor or key.

A tiny random Llama (with a word-level tokenizer) is converted to bipolar W4A16 once; each test
breaks one copy of it the way a user or a failed copy would, then starts vLLM on it:

* ``engine_config``: vLLM's own config step (``EngineArgs.create_engine_config``, what
  ``LLM(...)`` and ``vllm serve`` run first). The plugin's ``maybe_update_config`` checks the
  safetensors headers there, before any engine process starts: truncated or corrupt files,
  missing ``scales``/``zeros``, wrong plane count or dtype, unknown ``format_version``, a
  ``layer_bits`` entry naming no layer, quant_method against ``--quantization``...
* ``engine``: a real ``LLM(...)`` in a subprocess, for what only the weight loader can see (the
  rows of one shard of a fused layer against the model's shape; NaN/inf scales and offsets): the
  engine start fails with the plugin's message and nothing is generated.
* loader level (vLLM's linear layers, in process): a fused layer whose checkpoint lacks one shard
  (the header check skipped, as for a model not in a local directory) is refused after loading
  instead of serving uninitialized memory; dummy weights (nothing loaded) are not refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm")

L0 = "model.layers.0."
FIX = "re-convert it with quant_tools.convert"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from benchmarks.load_test import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def weights_file(d: Path) -> Path:
    return next(d.glob("model-*.safetensors"))


def variant(good: Path, dst: Path, tensors=None, config=None, quant=None) -> Path:
    """A copy of ``good`` with its tensors, config.json or quantization_config edited in place."""
    shutil.copytree(good, dst)
    f = weights_file(dst)
    if tensors:
        t = load_file(f)
        tensors(t)
        save_file({k: v.contiguous() for k, v in t.items()}, f, metadata={"format": "pt"})
        index = dst / "model.safetensors.index.json"
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: f.name for k in t}
        index.write_text(json.dumps(idx))
    if config or quant:
        cfg = json.loads((dst / "config.json").read_text())
        if config:
            config(cfg)
        if quant:
            quant(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def engine_config(model: Path, quantization: str | None = "bipolar"):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), quantization=quantization, max_model_len=256,
                      enforce_eager=True).create_engine_config()


def refused(model: Path, *patterns: str, quantization: str | None = "bipolar") -> str:
    with pytest.raises(Exception) as info:
        engine_config(model, quantization)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, msg
    return msg


def _pop(name):
    return lambda t: t.pop(name)


def _set(name, fn):
    return lambda t: t.__setitem__(name, fn(t[name]))


def test_good_checkpoint_passes(good):
    cfg = engine_config(good)
    assert cfg.quant_config.get_name() == "bipolar"
    engine_config(good, quantization=None)  # the checkpoint's quant_method alone selects the plugin


# ---- refused by the header check (engine config step) ---------------------------------------------
HEADER_CASES = {
    "missing-scales": ({"tensors": _pop(L0 + "mlp.down_proj.scales")},
                       [L0 + "mlp.down_proj.scales is missing", "expected a float tensor [128, 2]", FIX]),
    "missing-scales-of-fused-shard": ({"tensors": _pop(L0 + "self_attn.k_proj.scales")},
                                      [L0 + "self_attn.k_proj.scales is missing"]),
    "missing-zeros": ({"tensors": _pop(L0 + "mlp.up_proj.zeros")}, [L0 + "mlp.up_proj.zeros is missing"]),
    "zeros-but-symmetric": ({"quant": lambda q: q.update(symmetric=True)},
                            ["zeros is present but quantization_config['symmetric'] is true"]),
    "extra-plane": ({"tensors": _set(L0 + "mlp.down_proj.qweight", lambda t: torch.cat([t, t[:1]]))},
                    [L0 + "mlp.down_proj.qweight is I32 [5, 128, 8], expected I32 [4 (w_bits), N, ceil(K/32)]"]),
    "missing-plane": ({"tensors": _set(L0 + "self_attn.o_proj.qweight", lambda t: t[:3])},
                      [L0 + "self_attn.o_proj.qweight is I32 [3, 128, 4], expected I32 [4 (w_bits)"]),
    "qweight-int64": ({"tensors": _set(L0 + "mlp.gate_proj.qweight", lambda t: t.long())},
                      [L0 + "mlp.gate_proj.qweight is I64"]),
    "qweight-float": ({"tensors": _set(L0 + "mlp.gate_proj.qweight", lambda t: t.float())},
                      [L0 + "mlp.gate_proj.qweight is F32"]),
    "scales-int32": ({"tensors": _set(L0 + "self_attn.q_proj.scales", lambda t: t.int())},
                     [L0 + "self_attn.q_proj.scales is I32 [128, 1], expected a float tensor [128, 1]"]),
    "scales-wrong-groups": ({"tensors": _set(L0 + "mlp.down_proj.scales", lambda t: t[:, :1])},
                            [L0 + "mlp.down_proj.scales is BF16 [128, 1], expected a float tensor [128, 2]"]),
    "scales-wrong-rows": ({"tensors": _set(L0 + "mlp.down_proj.zeros", lambda t: t[:100])},
                          [L0 + "mlp.down_proj.zeros is BF16 [100, 2], expected a float tensor [128, 2]"]),
    "layer-bits-naming-no-layer": ({"quant": lambda q: q.update(layer_bits={"model.layers.9.mlp.down_proj": 4})},
                                   ["quantization_config['layer_bits'] names 'model.layers.9.mlp.down_proj'",
                                    "no 'model.layers.9.mlp.down_proj.qweight'"]),
    "layer-bits-disagree-with-planes": ({"quant": lambda q: q.update(layer_bits={L0 + "mlp.down_proj": 8})},
                                        [L0 + "mlp.down_proj.qweight is I32 [4, 128, 8], expected I32 [8 (w_bits)"]),
    "w-bits-disagree-with-planes": ({"quant": lambda q: q.update(w_bits=3)}, ["expected I32 [3 (w_bits)", "(and "]),
    "unquantized-linear": ({"tensors": lambda t: t.update({L0 + "mlp.down_proj.weight": torch.zeros(128, 256)})},
                           [L0 + "mlp.down_proj.weight is unquantized, but quantization_config quantizes"]),
    "quantized-layer-marked-skipped": ({"quant": lambda q: q.update(modules_to_not_convert=["lm_head", "down_proj"])},
                                       [("down_proj.qweight is quantized but quantization_config"
                                        "['modules_to_not_convert'] keeps this layer in full precision")]),
    "format-version-3": ({"quant": lambda q: q.update(format_version=3)},
                         ["quantization_config['format_version'] = 3: this vllm-bipolar reads format versions [1, 2]"]),
    "v1-tensors-labelled-v2": ({"quant": lambda q: q.update(format_version=2)},
                               [L0 + "mlp.down_proj.scales is BF16 [128, 2], expected a U8 tensor of scale codes "
                                "[128, 2]", "scales_step is missing (expected a float tensor [128] (one step per row))"]),
    "format-version-missing": ({"quant": lambda q: q.pop("format_version")}, ["lacks 'format_version'"]),
    "unknown-key": ({"quant": lambda q: q.update(wbits=4)}, ["unknown key(s) ['wbits']"]),
    "w-bits-out-of-range": ({"quant": lambda q: q.update(w_bits=12)}, ["'w_bits'] = 12: unsupported bit width"]),
    "group-size-invalid": ({"quant": lambda q: q.update(group_size=100)}, ["'group_size'] = 100"]),
    "no-bipolar-tensors": ({"tensors": lambda t: [t.pop(k) for k in list(t) if k.endswith(("qweight", "scales",
                                                                                            "zeros"))]},
                           ["no checkpoint tensor is a bipolar layer (no '<layer>.qweight')"]),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_refused_at_engine_config(good, tmp_path, case):
    edits, patterns = HEADER_CASES[case]
    refused(variant(good, tmp_path / case, **edits), *patterns)


@pytest.fixture(scope="module")
def good_v2(tmp_path_factory) -> Path:
    """The tiny model in format version 2 (8-bit scale/offset codes with per-row steps)."""
    from benchmarks.load_test import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny2"), format_version=2)


HEADER_CASES_V2 = {
    "missing-scales-step": ({"tensors": _pop(L0 + "mlp.down_proj.scales_step")},
                            [L0 + "mlp.down_proj.scales_step is missing (expected a float tensor [128] (one step "
                             "per row))", FIX]),
    "missing-zeros-step": ({"tensors": _pop(L0 + "self_attn.k_proj.zeros_step")},
                           [L0 + "self_attn.k_proj.zeros_step is missing"]),
    "float-scales": ({"tensors": _set(L0 + "mlp.up_proj.scales", lambda t: t.to(torch.bfloat16))},
                     [L0 + "mlp.up_proj.scales is BF16 [256, 1], expected a U8 tensor of scale codes [256, 1]"]),
    "uint8-zeros": ({"tensors": _set(L0 + "mlp.up_proj.zeros", lambda t: t.to(torch.uint8))},
                    [L0 + "mlp.up_proj.zeros is U8 [256, 1], expected an I8 tensor of offset codes [256, 1]"]),
    "step-wrong-rows": ({"tensors": _set(L0 + "mlp.down_proj.zeros_step", lambda t: t[:100])},
                        [L0 + "mlp.down_proj.zeros_step is BF16 [100], expected a float tensor [128] (one step"]),
    "step-integer": ({"tensors": _set(L0 + "mlp.down_proj.scales_step", lambda t: t.to(torch.int32))},
                     [L0 + "mlp.down_proj.scales_step is I32 [128], expected a float tensor [128]"]),
    "steps-but-symmetric": ({"quant": lambda q: q.update(symmetric=True)},
                            ["zeros is present but quantization_config['symmetric'] is true",
                             "zeros_step is present but"]),
    "v2-tensors-labelled-v1": ({"quant": lambda q: q.update(format_version=1)},
                               [L0 + "mlp.down_proj.scales is U8 [128, 2], expected a float tensor [128, 2]"]),
}


@pytest.mark.parametrize("case", list(HEADER_CASES_V2))
def test_v2_refused_at_engine_config(good_v2, tmp_path, case):
    edits, patterns = HEADER_CASES_V2[case]
    refused(variant(good_v2, tmp_path / case, **edits), *patterns)


def test_good_v2_checkpoint_passes(good_v2):
    assert engine_config(good_v2).quant_config.spec.format_version == 2


@pytest.mark.parametrize("cut", [4, 50, 1000, -1])
def test_truncated_safetensors(good, tmp_path, cut):
    d = variant(good, tmp_path / "truncated")
    f = weights_file(d)
    data = f.read_bytes()
    f.write_bytes(data[:cut])  # cut < 0: the last bytes are missing
    msg = refused(d, str(f), "the file is truncated or corrupt")
    assert "copy or re-convert it" in msg


def test_corrupt_header(good, tmp_path):
    d = variant(good, tmp_path / "corrupt")
    f = weights_file(d)
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # JSON header starts with garbage
    f.write_bytes(bytes(data))
    refused(d, str(f), "corrupt safetensors header")


def test_shard_file_missing(good, tmp_path):
    d = variant(good, tmp_path / "missing-file")
    f = weights_file(d)
    f.unlink()
    refused(d, f"names shard file(s) ['{f.name}'] that are not in", "the checkpoint is incomplete")


def test_quantization_argument_mismatch(good, unquantized_src):
    # --quantization gptq on a bipolar checkpoint: vLLM's own check names both methods.
    refused(good, "Quantization method specified in the model config (bipolar) does not match the "
                  "quantization method specified in the `quantization` argument (gptq)", quantization="gptq")
    # --quantization bipolar on an unquantized checkpoint: the plugin says to convert it first.
    refused(unquantized_src, "quantization='bipolar' was requested but the checkpoint's config.json has no "
                              "bipolar quantization_config; convert the model first")


def test_quant_method_of_another_plugin(good, tmp_path):
    d = variant(good, tmp_path / "other", quant=lambda q: q.update(quant_method="gptq"))
    msg = refused(d, quantization="bipolar")
    assert "gptq" in msg and "bipolar" in msg, msg


@pytest.fixture
def unquantized_src(good) -> Path:
    """The tiny model's unquantized source (written next to it by build_tiny_model)."""
    return good.parent / "tiny-src"


# ---- refused by the weight loader, at a real engine start (subprocess) -----------------------------
ENGINE = """
import sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="float32")
    out = llm.generate(["the capital of france is"], SamplingParams(temperature=0, max_tokens=4))
    print("GENERATED", repr(out[0].outputs[0].text))
"""


ENGINE_CASES = {
    # k_proj of the fused qkv_proj with twice its rows: vLLM alone would silently load the first half.
    "fused-shard-extra-rows": (
        lambda t: [t.__setitem__(f"{L0}self_attn.k_proj.{n}", torch.cat([t[f"{L0}self_attn.k_proj.{n}"]] * 2,
                                                                         1 if n == "qweight" else 0))
                   for n in ("qweight", "scales", "zeros")],
        [f"checkpoint tensor {L0}self_attn.k_proj.qweight (shard 'k' of {L0}self_attn.qkv_proj.qweight)",
         "dimension 1 should be 64 (output rows of the layer), got 128"]),
    # up_proj of the fused gate_up_proj with too few rows: vLLM alone fails inside torch.narrow.
    "fused-shard-missing-rows": (
        lambda t: [t.__setitem__(f"{L0}mlp.up_proj.{n}", t[f"{L0}mlp.up_proj.{n}"][:, :10] if n == "qweight"
                                 else t[f"{L0}mlp.up_proj.{n}"][:10]) for n in ("qweight", "scales", "zeros")],
        [f"checkpoint tensor {L0}mlp.up_proj.qweight (shard 1 of {L0}mlp.gate_up_proj.qweight)",
         "dimension 1 should be 256 (output rows of the layer), got 10"]),
    "nan-scale": (
        lambda t: t[f"{L0}self_attn.o_proj.scales"].__setitem__((3, 0), float("nan")),
        [f"checkpoint tensor {L0}self_attn.o_proj.scales has 1 NaN/inf value(s) (first at row 3, group 0)"]),
    "inf-offset-in-fused-layer": (
        lambda t: t[f"{L0}self_attn.v_proj.zeros"].__setitem__((5, 0), float("-inf")),
        [f"checkpoint tensor {L0}self_attn.v_proj.zeros (part of {L0}self_attn.qkv_proj.zeros) has 1 NaN/inf",
         "first at row 5"]),
}


ENGINE_CASES_V2 = {
    "nan-scales-step": (
        lambda t: t[f"{L0}self_attn.o_proj.scales_step"].__setitem__(3, float("nan")),
        [f"checkpoint tensor {L0}self_attn.o_proj.scales_step has 1 NaN/inf value(s) (first at row 3, its step)"]),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES) + list(ENGINE_CASES_V2))
def test_refused_at_engine_start(good, good_v2, tmp_path, case):
    edit, patterns = ENGINE_CASES.get(case) or ENGINE_CASES_V2[case]
    d = variant(good if case in ENGINE_CASES else good_v2, tmp_path / case, tensors=edit)
    engine_config(d)  # the header check cannot see these: the layer shapes come from the model
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(d)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "GENERATED" not in out, out[-3000:]
    for p in patterns:
        assert p in out, out[-5000:]
    assert "re-convert it" in out


# ---- the weight loader in process (vLLM's layers, as in test_tp_loading) ----------------------------
@pytest.fixture
def tp1(monkeypatch):
    from vllm.distributed import parallel_state

    import vllm_bipolar

    vllm_bipolar.register()
    monkeypatch.setattr(parallel_state, "_TP", types.SimpleNamespace(rank_in_group=0, world_size=1))


def _qkv_layer():
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from vllm_bipolar.config import BipolarConfig

    cfg = BipolarConfig.from_config({"quant_method": "bipolar", "format_version": 1, "w_bits": 2})
    return QKVParallelLinear(128, 32, 4, 2, bias=False, params_dtype=torch.float32, quant_config=cfg,
                             prefix="model.layers.3.self_attn.qkv_proj")


def _module(n, k=128, bits=2):
    from vllm_bipolar.format import pack_codes, quantize_weight

    q = quantize_weight(torch.randn(n, k), bits, group_size=128, dtype=torch.float32)
    return {"qweight": pack_codes(q.codes, bits), "scales": q.scales, "zeros": q.zeros}


def test_missing_fused_shard_refused_after_loading(tp1):
    layer = _qkv_layer()
    params = dict(layer.named_parameters())
    for shard, n in (("q", 128), ("k", 64), ("v", 64)):
        for name, t in _module(n).items():
            if shard == "k" and name == "scales":
                continue  # the checkpoint lacks model.layers.3.self_attn.k_proj.scales
            params[name].weight_loader(params[name], t, shard)
    with pytest.raises(ValueError, match=re.escape("lacks tensor(s) ['model.layers.3.self_attn.k_proj.scales']")):
        layer.quant_method.process_weights_after_loading(layer)


def test_dummy_weights_are_not_refused(tp1, monkeypatch):
    import vllm_bipolar.linear_method as lm

    monkeypatch.setattr(lm, "_CHECKPOINT_LOADED", False)  # load_format="dummy": no loader ever ran
    layer = _qkv_layer()
    layer.scales.data.fill_(0.01)
    layer.zeros.data.zero_()
    layer.quant_method.process_weights_after_loading(layer)
    out, _ = layer(torch.randn(3, 128))
    assert out.shape == (3, 256) and torch.isfinite(out).all()


def test_fused_shard_rows_checked_on_every_rank(monkeypatch):
    """tp=2, rank 1: a k_proj with extra rows is refused before vLLM narrows it to the rank's slice."""
    from vllm.distributed import parallel_state

    import vllm_bipolar

    vllm_bipolar.register()
    monkeypatch.setattr(parallel_state, "_TP", types.SimpleNamespace(rank_in_group=1, world_size=2))
    layer = _qkv_layer()
    t = _module(96)["qweight"]  # the checkpoint k_proj has 2 kv heads * 32 = 64 rows
    with pytest.raises(ValueError, match=r"k_proj\.qweight .*dimension 1 should be 64 .*got 96"):
        layer.qweight.weight_loader(layer.qweight, t, "k")
    layer.qweight.weight_loader(layer.qweight, _module(64)["qweight"], "k")  # the right size loads
