"""Calibrated quantization (GPTQ-style, bipolar and INT grids), mixed precision, rotation, evaluation task."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_rotation_keeps_the_function, make_tiny_llama, make_tiny_model_with_calibration

from quant_tools.calibrate import allocate_bits, average_bits
from quant_tools.convert import main as convert_main
from quant_tools.gptq import gptq_quantize
from quant_tools.lm_eval_tasks.wikitext_local import (
    calibration_text,
    evaluation_articles,
    split_articles,
)
from vllm_bipolar.format import BipolarConfigError, BipolarQuantSpec, unpack_codes
from vllm_bipolar.format.quantize import int_grid_params, quantize_weight
from vllm_bipolar.format.transforms import (
    block_hadamard,
    hadamard_block,
    hadamard_matrix,
)


def _layer(seed=0, n=96, k=256, t=2048):
    """A random layer and calibration inputs with correlated channels and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :4] *= 10
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x


def _values(codes, scales, zeros, bits, group):
    """z + s*(2c - L) in float64, written out independently of the format package."""
    k = codes.shape[1]
    lv = 2 ** bits - 1
    col_group = torch.arange(k) // group
    s = scales.double()[:, col_group]
    z = zeros.double()[:, col_group] if zeros is not None else 0.0
    return z + s * (2 * codes.double() - lv)


def _out_err(w, w_q, x):
    return ((x.double() @ (w.double() - w_q).T) ** 2).sum().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_calibrated_beats_rtn_and_mse_on_calibration_inputs(bits):
    w, x = _layer(bits)
    h = x.T @ x / x.shape[0]
    errs = {}
    for method in ("rtn", "mse"):
        q = quantize_weight(w, bits, 128, method=method, dtype=torch.bfloat16)
        errs[method] = _out_err(w, _values(q.codes, q.scales, q.zeros, bits, 128), x)
    for name, grid, ao in (("gptq", "bipolar", True), ("gptq_noao", "bipolar", False), ("gptq_int", "int", False)):
        r = gptq_quantize(w, h, bits, 128, grid=grid, act_order=ao, dtype=torch.bfloat16)
        q = r.qweight
        errs[name] = _out_err(w, _values(q.codes, q.scales, q.zeros, bits, 128), x)
        # The reported per-row error is the same quantity (tr(dW H dW^T) = ||X dW^T||^2 / T).
        assert r.row_error.sum().item() * x.shape[0] == pytest.approx(errs[name], rel=1e-3)
    assert errs["gptq"] < 0.7 * errs["rtn"], errs
    assert errs["gptq"] < errs["mse"], errs
    assert errs["gptq_int"] < errs["rtn"], errs
    assert errs["gptq"] < errs["gptq_int"], errs


def test_gptq_with_uncorrelated_inputs_is_rounding_to_nearest():
    """With H = I there is no error to compensate: GPTQ on the INT grid must equal plain rounding
    on that grid (GPTQ's min/max grid), code for code."""
    w, _ = _layer(3, n=32, k=256)
    r = gptq_quantize(w, torch.eye(256), 3, 128, grid="int", act_order=False, dtype=torch.float32)
    s, z = int_grid_params(w.view(32, 2, 128), 3, torch.float32)
    codes = torch.clamp(torch.round(((w.view(32, 2, 128) - z) / s + 7) / 2), 0, 7).view(32, 256)
    assert torch.equal(r.qweight.codes, codes.to(torch.uint8))


def test_gptq_int_levels_are_the_int_grid_with_integer_zero_point():
    w, x = _layer(4, n=48, k=256)
    r = gptq_quantize(w, x.T @ x, 3, 128, grid="int", act_order=False, dtype=torch.float32)
    s, z = r.qweight.scales.double(), r.qweight.zeros.double()
    step = 2 * s  # INT step; levels step*(q - q0), so z = step*(L/2 - q0) with q0 an integer
    q0 = 3.5 - z / step
    assert torch.allclose(q0, q0.round(), atol=1e-4)
    # and 0 lies inside the grid's range (GPTQ's min/max includes 0)
    assert ((q0 >= -1e-4) & (q0 <= 7 + 1e-4)).all()


def _naive_obs(w, h, bits, group, damp=0.01):
    """Reference: act-order OBS one column at a time with the explicit inverse Hessian (float64),
    downdated after each column, INT grid fitted when a group's first column comes up."""
    W = w.double().clone()
    k = W.shape[1]
    H = h.double() + damp * torch.diagonal(h.double()).mean() * torch.eye(k, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist()
    hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    grids = {}
    for j in order:
        g = j // group
        if g not in grids:
            grids[g] = int_grid_params(W[:, g * group:(g + 1) * group].float(), bits, torch.float32)
        s, z = (t[:, 0].double() for t in grids[g])
        c = torch.clamp(torch.round(((W[:, j] - z) / s + 2 ** bits - 1) / 2), 0, 2 ** bits - 1)
        q = z + s * (2 * c - (2 ** bits - 1))
        codes[:, j] = c
        err = (W[:, j] - q) / hinv[j, j]
        W -= err[:, None] * hinv[j][None, :]
        W[:, j] = q
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


def test_blocked_act_order_gptq_matches_naive_obs():
    """The blocked, lazily updated implementation (blocks of 32 inside groups of 64, so groups are
    fitted from deferred updates) against the textbook column-by-column OBS recursion."""
    w, x = _layer(5, n=24, k=192, t=1024)
    x[:, 150:] *= 5  # the last group's columns come first in act-order
    h = x.T @ x / x.shape[0]
    r = gptq_quantize(w, h, 3, 64, grid="int", act_order=True, block=32, dtype=torch.float32)
    ref = _naive_obs(w, h, 3, 64)
    same = (r.qweight.codes.double() == ref).double().mean().item()
    assert same > 0.99, same


def test_allocate_bits_meets_average_and_is_optimal():
    g = torch.Generator().manual_seed(0)
    bit_set = (2, 3, 4, 8)
    units = {}
    for i, p in enumerate((5, 3, 16, 8, 5)):
        base = float(torch.rand(1, generator=g)) * 10
        units[f"u{i}"] = {"modules": [f"m{i}"], "params": p * 1000, "module_params": [p * 1000],
                          "loss": {str(b): base * 4.0 ** -b for b in bit_set}}
    for avg in (2.0, 2.5, 3.0, 3.5, 5.0):
        bits = allocate_bits(units, avg, bit_set)
        params = {u["modules"][0]: u["params"] for u in units.values()}
        assert average_bits(bits, params) <= avg + 1e-9
        got = sum(units[f"u{i}"]["loss"][str(bits[f"m{i}"])] for i in range(5))
        best = min(sum(units[f"u{i}"]["loss"][str(b)] for i, b in enumerate(combo))
                   for combo in itertools.product(bit_set, repeat=5)
                   if sum(units[f"u{i}"]["params"] * b for i, b in enumerate(combo))
                   <= avg * sum(u["params"] for u in units.values()))
        assert got == pytest.approx(best)


def test_block_hadamard_matches_matrix():
    x = torch.randn(7, 3 * 64, dtype=torch.float64)
    h = hadamard_matrix(64)
    ref = (x.view(7, 3, 64) @ h).view(7, -1)
    assert torch.allclose(block_hadamard(x, 64), ref, atol=1e-12)
    assert torch.allclose(h @ h, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert hadamard_block(1536) == 512 and hadamard_block(576) == 64 and hadamard_block(96) == 32


@pytest.mark.parametrize("tied, kind, hidden", [(False, "orthogonal", 64), (True, "orthogonal", 64),
                                                (False, "hadamard", 64), (True, "hadamard", 96)])
def test_rotation_leaves_the_function_unchanged(tmp_path, tied, kind, hidden):
    # hidden 96 = 8 x 12: a Sylvester x Paley Hadamard matrix (3 heads of 32, like SmolLM2's 576 = 8 x 72)
    heads = {64: (4, 2), 96: (3, 1)}[hidden]
    src = make_tiny_llama(tmp_path / "m", hidden=hidden, heads=heads[0], kv_heads=heads[1], dtype=torch.float32,
                          tie_word_embeddings=tied)
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] == tied
    assert_rotation_keeps_the_function(src, kind)


def test_online_hadamard_config_key():
    spec = BipolarQuantSpec.from_dict({"w_bits": 4, "format_version": 1, "online_hadamard": ["down_proj"],
                                       "rotation": "orthogonal", "method": "gptq", "avg_bits": 3.5})
    assert spec.has_online_hadamard("model.layers.3.mlp.down_proj")
    assert not spec.has_online_hadamard("model.layers.3.mlp.up_proj")
    assert BipolarQuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(BipolarConfigError, match="online_hadamard"):
        BipolarQuantSpec.from_dict({"w_bits": 4, "format_version": 1, "online_hadamard": "down_proj"})
    with pytest.raises(BipolarConfigError, match="rotation"):
        BipolarQuantSpec.from_dict({"w_bits": 4, "format_version": 1, "rotation": "givens"})


def test_calibration_and_evaluation_parts_are_disjoint(tmp_path):
    text = "".join(f" = Article {i} = \n \n word{i} text {i} .\n" for i in range(10))
    arts = split_articles(text)
    assert len(arts) == 10
    cal, ev = calibration_text(text), "".join(evaluation_articles(text))
    assert "word4 " in cal and "word5 " not in cal
    assert "word5 " in ev and "word4 " not in ev


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2_dir):
    return make_tiny_model_with_calibration(tmp_path_factory.mktemp("tok") / "tiny", smollm2_dir)


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_convert_avg_bits_meets_the_average(tiny_with_tokenizer, tmp_path):
    src, calib = tiny_with_tokenizer
    dst = tmp_path / "out"
    rc = convert_main([str(src), str(dst), "--w-bits", "2", "--method", "gptq", "--calib", str(calib),
                       "--calib-samples", "4", "--calib-seqlen", "32", "--avg-bits", "3", "--rotate",
                       "--no-progress"])
    assert rc == 0
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    tensors = _load_dir(dst)
    names = [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]
    shapes = {n: tensors[f"{n}.qweight"].shape for n in names}
    numel = {n: s[1] * s[2] * 32 for n, s in shapes.items()}  # tiny K are multiples of 32
    bits = {n: qc["layer_bits"].get(n, qc["w_bits"]) for n in names}
    assert {shapes[n][0] for n in names} <= {2, 3, 4, 8}
    assert all(shapes[n][0] == bits[n] for n in names)  # planes in the file = recorded bits
    avg = sum(numel[n] * bits[n] for n in names) / sum(numel.values())
    assert avg <= 3.0 + 1e-9 and avg == pytest.approx(qc["avg_bits"], abs=1e-4)
    assert len(set(bits.values())) > 1  # mixed
    assert qc["online_hadamard"] == ["down_proj"] and qc["method"] == "gptq"


def test_calibrated_checkpoint_unpacks_to_gptq_result(tiny_with_tokenizer, tmp_path):
    """The written codes are the quantizer's: unpacked planes give values on each group's grid."""
    src, calib = tiny_with_tokenizer
    dst = tmp_path / "out"
    assert convert_main([str(src), str(dst), "--w-bits", "3", "--method", "gptq_int", "--calib", str(calib),
                         "--calib-samples", "4", "--calib-seqlen", "32", "--group-size", "32",
                         "--no-progress"]) == 0
    tensors = _load_dir(dst)
    qw, s, z = (tensors[f"model.layers.1.mlp.down_proj.{t}"] for t in ("qweight", "scales", "zeros"))
    codes = unpack_codes(qw, 160)
    q0 = 3.5 - z.double() / (2 * s.double())
    assert torch.allclose(q0, q0.round(), atol=0.02)  # bf16 scales: integer zero point up to rounding
    assert codes.max() <= 7


@pytest.mark.parametrize("args, message", [
    (["--method", "gptq", "--calib", "/nonexistent/calib.txt"], "--calib /nonexistent/calib.txt: no such file"),
    (["--method", "gptq", "--avg-bits", "9"], r"--avg-bits 9.0: .* must lie in \[2, 8\]"),
    (["--method", "rtn", "--avg-bits", "3"], "--avg-bits needs calibration data"),
    (["--method", "gptq_int", "--symmetric", "--calib", "{calib}"], "drop --symmetric"),
    (["--method", "gptq", "--avg-bits", "3", "--bit-set", "2", "9"], "--bit-set"),
    (["--method", "gptq", "--calib-samples", "0", "--calib", "{calib}"], "--calib-samples 0"),
])
def test_calibration_option_errors(tiny_with_tokenizer, tmp_path, capsys, args, message):
    src, calib = tiny_with_tokenizer
    # an existing --calib file where the case is about another option: the default calibration text
    # (../shared/data/...) is not next to every checkout (CI clones elsewhere)
    args = [str(calib) if a == "{calib}" else a for a in args]
    rc = convert_main([str(src), str(tmp_path / "out"), "--w-bits", "2", "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_local_task_files_are_shipped():
    tasks = Path(__file__).resolve().parents[1] / "quant_tools" / "lm_eval_tasks"
    for name in ("wikitext2_local.yaml", "wikitext2_local_small.yaml"):
        body = (tasks / name).read_text()
        assert "loglikelihood_rolling" in body and "word_perplexity" in body and "hub" not in body
