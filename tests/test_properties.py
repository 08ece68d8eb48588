"""Property tests (hypothesis): the format over random shapes, bits and group sizes; the parsers
(quantization_config, safetensors headers) over random input never fail with anything but their
own clear error.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vllm_bipolar.format import (
    BipolarConfigError,
    BipolarQuantSpec,
    codes_to_values,
    dequantize,
    dequantize_packed,
    max_level,
    pack_codes,
    quantize_activations,
    quantize_weight,
    unpack_codes,
    values_to_codes,
)

SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

bits_st = st.integers(1, 8)
group_st = st.sampled_from([-1, 32, 64, 96, 128, 256])


@st.composite
def codes_st(draw):
    bits = draw(bits_st)
    n, k = draw(st.integers(1, 6)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return bits, torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)


@st.composite
def weights_st(draw, max_k=300):
    n, k = draw(st.integers(1, 6)), draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-3, 0.05, 1.0, 1e3, 1e6]))
    kind = draw(st.sampled_from(["normal", "constant", "zeros", "outlier", "two-values"]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    if kind == "constant":
        w = torch.full((n, k), draw(st.floats(-1e4, 1e4, allow_nan=False)))
    elif kind == "zeros":
        w = torch.zeros(n, k)
    elif kind == "outlier":
        w[0, draw(st.integers(0, k - 1))] = 1e4 * scale
    elif kind == "two-values":
        w = torch.where(torch.rand(n, k, generator=g) < 0.5, -scale, scale)
    return w


# ---- packing ----------------------------------------------------------------------------------------
@SETTINGS
@given(codes_st())
def test_pack_unpack_round_trip(bc):
    bits, codes = bc
    n, k = codes.shape
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (bits, n, math.ceil(k / 32))
    assert torch.equal(unpack_codes(packed, k), codes)
    if k % 32:  # padding bits past K are zero in every plane
        assert torch.all(((packed[..., -1].to(torch.int64) & 0xFFFFFFFF) >> (k % 32)) == 0)


@SETTINGS
@given(codes_st())
def test_values_are_odd_and_invert(bc):
    bits, codes = bc
    v = codes_to_values(codes, bits)
    assert torch.all(v % 2 != 0) and v.abs().max() <= max_level(bits)
    assert torch.equal(values_to_codes(v, bits), codes)


# ---- weight quantization ----------------------------------------------------------------------------
@SETTINGS
@given(weights_st(), bits_st, group_st, st.booleans())
def test_rtn_error_is_at_most_one_scale(w, bits, group_size, symmetric):
    """Round to nearest on a grid that spans the group's range: every weight is within one scale
    (half a grid step) of its dequantized value; fp32 scales so nothing else rounds."""
    q = quantize_weight(w, bits, group_size, symmetric, "rtn", dtype=torch.float32)
    n, k = w.shape
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    assert q.codes.shape == (n, k) and q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**bits
    assert q.scales.shape == (n, groups) and (q.zeros is None) == symmetric
    assert torch.isfinite(q.scales).all() and (q.scales >= 0).all()
    wd = dequantize(q.codes, q.scales, q.zeros, bits, group_size, torch.float64)
    per_col = q.scales.double().repeat_interleave(k if group_size == -1 else group_size, 1)[:, :k]
    zeros = 0 if q.zeros is None else q.zeros.double().abs().repeat_interleave(
        k if group_size == -1 else group_size, 1)[:, :k]
    slack = 1e-5 * (per_col * max_level(bits) + zeros + w.double().abs()) + 1e-30
    assert torch.all((wd - w.double()).abs() <= per_col + slack)
    # the packed planes dequantize to the same weight
    assert torch.equal(dequantize_packed(pack_codes(q.codes, bits), q.scales, q.zeros, k, group_size, torch.float64), wd)


@FEW
@given(weights_st(max_k=200), bits_st, group_st, st.booleans(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_mse_is_finite_and_within_range(w, bits, group_size, symmetric, dtype):
    """mse (and 16-bit scales): codes in range, finite scales, dequantized weights inside the
    group's range widened by the grid's rounding, or the clear overflow error."""
    try:
        q = quantize_weight(w, bits, group_size, symmetric, "mse", dtype=dtype)
    except ValueError as e:
        assert "overflow" in str(e)
        assume(False)
    assert int(q.codes.max()) < 2**bits and q.scales.dtype == dtype
    assert torch.isfinite(q.scales).all() and (q.zeros is None or torch.isfinite(q.zeros).all())
    wd = dequantize(q.codes, q.scales, q.zeros, bits, group_size, torch.float64)
    assert torch.isfinite(wd).all()
    span = w.double().abs().max().item()
    assert wd.abs().max().item() <= 2.05 * span + 1e-3 * span + 1e-30


@SETTINGS
@given(st.sampled_from([math.nan, math.inf, -math.inf]), bits_st)
def test_non_finite_weights_are_refused(bad, bits):
    w = torch.randn(3, 40)
    w[1, 7] = bad
    with pytest.raises(ValueError, match=r"weight has 1 NaN/inf value"):
        quantize_weight(w, bits, 32)


# ---- activation quantization ------------------------------------------------------------------------
@SETTINGS
@given(st.integers(1, 5), st.integers(1, 200), bits_st, st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4, 3e38]),
       st.sampled_from(["random", "zero-token", "constant-token"]), st.integers(0, 2**31 - 1))
def test_activation_quantizer(m, k, bits, scale, kind, seed):
    x = (torch.rand(m, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale  # finite, |x| <= scale
    if kind == "zero-token":
        x[0] = 0
    elif kind == "constant-token":
        x[0] = scale
    codes, s = quantize_activations(x, bits)
    assert codes.shape == (m, k) and int(codes.max()) < 2**bits and s.shape == (m,)
    assert torch.isfinite(s).all() and (s >= 0).all()
    deq = (codes.double() * 2 - max_level(bits)) * s.double()[:, None]
    assert torch.all((deq - x.double()).abs() <= s.double()[:, None] * (1 + 1e-5) + 1e-30)
    if kind == "zero-token" or scale == 0.0:
        assert s[0] == 0 and torch.all(deq[0] == 0)
    if kind == "constant-token" and scale > 0:  # every value on the top grid point, exactly
        assert torch.all(codes[0] == 2**bits - 1)


# ---- the quantization_config parser -----------------------------------------------------------------
json_st = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
KEYS = ["quant_method", "format_version", "w_bits", "a_bits", "group_size", "symmetric", "modules_to_not_convert",
        "layer_bits", "method"]
plausible = st.one_of(st.integers(-3, 300), st.sampled_from([True, False, None, "bipolar", "rtn", "mse", 1.0, 128.0,
                                                             [], {}, ["lm_head"], {"x": 4}, {"x": 99}, [1]]), json_st)


def _parse(config):
    try:
        spec = BipolarQuantSpec.from_dict(config)
    except BipolarConfigError as e:
        assert str(e).strip()
        return None
    # a config that parses survives a JSON round trip unchanged
    assert BipolarQuantSpec.from_dict(json.loads(spec.to_json())) == spec
    return spec


@SETTINGS
@given(json_st)
def test_config_parser_on_random_json(config):
    _parse(config)


# An independent statement of which scalar values the format allows (DESIGN.md section 4).
SCALAR_RULES = {
    "w_bits": lambda v: 1 <= v <= 8,
    "a_bits": lambda v: 1 <= v <= 8 or v == 16,
    "group_size": lambda v: v == -1 or (v > 0 and v % 32 == 0),
}


# a valid config with one scalar key set to a value near the edges of the rules, other keys plausible
EDGE_VALUES = [-1, 0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 48, 64, 96, 128, 130, 256, True, 4.0, "8"]
near_valid = st.builds(
    lambda over, key, value: {"quant_method": "bipolar", "format_version": 1, "w_bits": 4, **over, key: value},
    st.dictionaries(st.sampled_from(["symmetric", "modules_to_not_convert", "method"]), plausible, max_size=2),
    st.sampled_from(sorted(SCALAR_RULES)), st.sampled_from(EDGE_VALUES))


@pytest.mark.parametrize("key", sorted(SCALAR_RULES))
@pytest.mark.parametrize("value", EDGE_VALUES, ids=repr)
def test_config_parser_scalar_edges(key, value):
    """Every edge value of every scalar key, on an otherwise valid config: accepted exactly when the
    independent rules allow it (a_bits < 16 also needs group_size -1 or a multiple of 128)."""
    config = {"quant_method": "bipolar", "format_version": 1, "w_bits": 4, "group_size": 128, key: value}
    spec = _parse(config)
    a_bits, group = config.get("a_bits", 16), config["group_size"]
    valid = all(type(config[k]) is int and SCALAR_RULES[k](config[k]) for k in SCALAR_RULES if k in config)
    valid = valid and (a_bits == 16 or group == -1 or group % 128 == 0)
    assert (spec is not None) == valid, (key, value)
    if spec is not None:
        assert getattr(spec, key) == value


@SETTINGS
@given(st.one_of(near_valid, st.dictionaries(st.sampled_from(KEYS), plausible, max_size=len(KEYS))))
def test_config_parser_on_plausible_configs(config):
    spec = _parse(config)
    # a present scalar key outside the rules (or not a plain int) must make the parser refuse the config
    broken = [k for k, ok in SCALAR_RULES.items() if k in config and not (type(config[k]) is int and ok(config[k]))]
    if broken:
        assert spec is None, f"parser accepted {broken} = {[config[k] for k in broken]}"
    if spec is not None:  # and what it accepts, it keeps as given
        for key in SCALAR_RULES:
            if key in config:
                assert getattr(spec, key) == config[key]


@SETTINGS
@given(bits_st, st.sampled_from([1, 2, 3, 4, 8, 16]), group_st, st.booleans(),
       st.dictionaries(st.sampled_from(["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]), bits_st))
def test_valid_configs_parse(w_bits, a_bits, group_size, symmetric, layer_bits):
    cfg = {"quant_method": "bipolar", "format_version": 1, "w_bits": w_bits, "a_bits": a_bits,
           "group_size": group_size, "symmetric": symmetric, "layer_bits": layer_bits}
    ok = a_bits == 16 or group_size == -1 or group_size % 128 == 0
    spec = _parse(cfg)
    assert (spec is not None) == ok
    if spec is not None:
        assert spec.w_bits == w_bits and dict(spec.layer_bits) == layer_bits


# ---- the safetensors header readers (plugin and converter) ------------------------------------------
@st.composite
def safetensors_bytes(draw):
    kind = draw(st.sampled_from(["random", "header", "lying-length"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    header = draw(json_st)
    if draw(st.booleans()):
        header = {"model.layers.0.mlp.down_proj.qweight": {"dtype": draw(st.sampled_from(["I32", "F16", "XX", 3])),
                                                            "shape": draw(st.lists(plausible, max_size=3)),
                                                            "data_offsets": draw(st.lists(plausible, max_size=3))}}
    raw = json.dumps(header).encode()
    length = len(raw) if kind == "header" else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + draw(st.binary(max_size=32))


@FEW
@given(safetensors_bytes())
def test_header_readers_on_random_files(tmp_path_factory, data):
    from quant_tools.checkpoint import CheckpointError, HFCheckpoint
    from vllm_bipolar.config import check_checkpoint

    d = tmp_path_factory.mktemp("st")
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "model.safetensors").write_bytes(data)
    spec = BipolarQuantSpec(w_bits=4)
    try:
        check_checkpoint(d, spec)
    except BipolarConfigError as e:
        assert "model.safetensors" in str(e) or "quantization_config" in str(e)
    try:
        HFCheckpoint(d)
    except CheckpointError as e:
        assert "model.safetensors" in str(e)
