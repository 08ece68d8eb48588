"""quantization_config validation: every invalid config gets its own clear message."""

import json

import pytest

from vllm_bipolar.format.spec import BipolarConfigError, BipolarQuantSpec, shard_names


def base(**over):
    d = {"quant_method": "bipolar", "format_version": 1, "w_bits": 4, "a_bits": 16, "group_size": 128,
         "symmetric": False, "modules_to_not_convert": ["lm_head"], "layer_bits": {}}
    d.update(over)
    return d


def test_valid_round_trip():
    d = base(layer_bits={"model.layers.0.mlp.down_proj": 8}, method="mse")
    spec = BipolarQuantSpec.from_dict(d)
    assert spec.to_dict() == d
    assert BipolarQuantSpec.from_dict(json.loads(spec.to_json())) == spec
    assert spec.bits_for("model.layers.0.mlp.down_proj") == 8
    assert spec.bits_for("model.layers.1.mlp.down_proj") == 4


@pytest.mark.parametrize("over,pattern", [
    ({"w_bits": 0}, r"'w_bits'\] = 0: unsupported bit width; expected an integer 1\.\.8"),
    ({"w_bits": 9}, r"'w_bits'\] = 9: unsupported bit width"),
    ({"w_bits": "4"}, r"'w_bits'\] = '4': expected an integer 1\.\.8"),
    ({"w_bits": True}, r"'w_bits'\] = True"),
    ({"a_bits": 12}, r"'a_bits'\] = 12: .*or 16 \(no activation quantization\)"),
    ({"a_bits": 0}, r"'a_bits'\] = 0"),
    ({"group_size": 48}, r"'group_size'\] = 48: groups must cover whole 32-bit words"),
    ({"group_size": 0}, r"'group_size'\] = 0"),
    ({"group_size": -2}, r"'group_size'\] = -2"),
    ({"group_size": 12.5}, r"'group_size'\] = 12\.5: expected an integer"),
    ({"a_bits": 4, "group_size": 32}, r"binary tensor-core kernels consume K in steps of 128.*--group-size 128"),
    ({"a_bits": 8, "group_size": 64}, r"a_bits = 8"),
    ({"symmetric": "yes"}, r"'symmetric'\] = 'yes': expected true or false"),
    ({"format_version": 3}, r"'format_version'\] = 3: this vllm-bipolar reads format versions \[1, 2\]"),
    ({"format_version": "1"}, r"'format_version'\] = '1'"),
    ({"modules_to_not_convert": "lm_head"}, r"modules_to_not_convert'\] = 'lm_head': expected a list"),
    ({"layer_bits": {"model.layers.0.mlp.down_proj": 11}}, r"layer_bits\.model\.layers\.0\.mlp\.down_proj'\] = 11"),
    ({"layer_bits": [4]}, r"'layer_bits'\] = \[4\]: expected an object"),
    ({"method": "awq"}, r"'method'\] = 'awq': expected one of"),
    ({"wbits": 4}, r"unknown key\(s\) \['wbits'\]; allowed keys are"),
    ({"quant_method": "gptq"}, r"'quant_method'\] = 'gptq', but this is the 'bipolar' loader"),
])
def test_invalid_configs(over, pattern):
    with pytest.raises(BipolarConfigError, match=pattern):
        BipolarQuantSpec.from_dict(base(**over))


def test_missing_keys():
    d = base()
    del d["w_bits"]
    with pytest.raises(BipolarConfigError, match="lacks the required key 'w_bits'"):
        BipolarQuantSpec.from_dict(d)
    d = base()
    del d["format_version"]
    with pytest.raises(BipolarConfigError, match="lacks 'format_version'"):
        BipolarQuantSpec.from_dict(d)
    with pytest.raises(BipolarConfigError, match="must be a JSON object"):
        BipolarQuantSpec.from_dict([1, 2])


def test_defaults_for_optional_keys():
    spec = BipolarQuantSpec.from_dict({"quant_method": "bipolar", "format_version": 1, "w_bits": 2})
    assert (spec.a_bits, spec.group_size, spec.symmetric, spec.modules_to_not_convert) == (16, 128, False, ("lm_head",))


@pytest.mark.parametrize("gs,a_bits", [(-1, 4), (128, 2), (256, 1), (32, 16), (64, 16), (-1, 16)])
def test_accepted_group_sizes(gs, a_bits):
    assert BipolarQuantSpec.from_dict(base(group_size=gs, a_bits=a_bits)).group_size == gs


def test_skips_match_whole_components():
    spec = BipolarQuantSpec(w_bits=4, modules_to_not_convert=("lm_head", "model.layers.1", "down_proj"))
    assert spec.is_skipped("lm_head") and spec.is_skipped("model.lm_head")
    assert spec.is_skipped("model.layers.1.self_attn.q_proj")
    assert not spec.is_skipped("model.layers.11.self_attn.q_proj")
    assert spec.is_skipped("model.layers.3.mlp.down_proj")
    assert not spec.is_skipped("model.layers.3.mlp.up_proj")


def test_shard_names():
    assert shard_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert shard_names("model.layers.0.mlp.gate_up_proj") == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert shard_names("model.layers.0.mlp.down_proj") == ["model.layers.0.mlp.down_proj"]


def test_kernel_fakes_skip_ops_an_older_extension_lacks(monkeypatch):
    """With a CUDA extension built from older sources (some bipolar_kernels ops missing), importing the
    plugin's ops must not fail: the fakes of missing ops are skipped (the CUDA backends then say "rebuild
    it" in can_implement) and the pure-torch backend keeps working."""
    import torch

    from vllm_bipolar import ops

    names = ("gemm_a16", "dequantize_a16", "quantize_activations", "gemm_binary", "binary_group_sums")
    if any(hasattr(torch.ops.bipolar_kernels, n) for n in names):
        pytest.skip("the CUDA extension is loaded here: its fakes are registered already")
    monkeypatch.setattr(ops, "cuda_extension_available", lambda: True)
    ops._register_kernel_fakes()  # raised "operator ... does not exist" before the fakes were guarded
    x = torch.randn(3, 64)
    from vllm_bipolar.format import pack_codes

    qweight = pack_codes(torch.randint(0, 4, (5, 64), dtype=torch.uint8), 2)
    y = ops.linear(x, qweight, torch.rand(5, 1), None, None, 64, -1, 16)
    assert y.shape == (3, 5) and torch.isfinite(y).all()
