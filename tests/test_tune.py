"""quant_tools.tune: end-to-end tuning of a bipolar checkpoint's scales and offsets (CPU).

The reference for every claim is computed here independently: the full-precision Hugging Face model
and the tuned checkpoint dequantized by fake_eval.load_model (the same dequantization the accuracy
screening uses), their next-token KL in float64."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_model_with_calibration
from quant_tools.calibrate import CalibOptions, calibration_windows
from quant_tools.convert import main as convert_main
from quant_tools.fake_eval import install_runtime_hooks, load_model, read_tensors
from quant_tools.tune import main as tune_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    return make_tiny_model_with_calibration(tmp_path_factory.mktemp("tune") / "tiny", smollm2_dir, hidden=96,
                                            heads=3, kv_heads=1, intermediate=192, dtype=torch.float32)


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def _kl(src: Path, ckpt: Path, ids: torch.Tensor) -> float:
    """Mean KL(p_src || p_ckpt) over every position of ``ids``, in float64."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant_tools.calibrate import attention_implementation

    attn = attention_implementation(AutoConfig.from_pretrained(str(src)))  # Gemma 2's soft-cap: eager
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation=attn).eval()
    model, spec, _ = load_model(ckpt)
    hooks = install_runtime_hooks(model, spec)
    with torch.no_grad():
        lp = torch.log_softmax(ref(ids).logits.double(), -1)
        lq = torch.log_softmax(model(ids).logits.double(), -1)
    for h in hooks:
        h.remove()
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _tune(src, ckpt, dst, calib, *extra):
    return tune_main([str(src), str(ckpt), str(dst), "--calib", str(calib), "--samples", "6", "--seqlen", "40",
                      "--batch", "2", "--epochs", "3", "--lr", "1e-2", "--val-samples", "2", "--compute", "float32",
                      "--no-progress", *extra])


@pytest.mark.parametrize("convert_args", [
    ("--w-bits", "2", "--group-size", "32"),
    # rotated (online Hadamard on down_proj) with 8-bit activations: the straight-through path
    ("--w-bits", "3", "--group-size", "-1", "--a-bits", "8", "--rotate"),
    # format version 2: the tuned values go back onto CKPT's row steps (codes change, steps do not)
    ("--w-bits", "2", "--group-size", "32", "--format-version", "2"),
], ids=["w2a16", "w3a8-rotated", "w2a16-format-v2"])
def test_tune_lowers_the_kl_and_changes_only_scales_and_offsets(tiny, tmp_path, convert_args):
    src, calib = tiny
    ckpt, dst = tmp_path / "ckpt", tmp_path / "tuned"
    assert convert_main([str(src), str(ckpt), "--method", "rtn", "--no-progress", *convert_args]) == 0
    before = _digest(ckpt), _digest(src)
    assert _tune(src, ckpt, dst, calib) == 0
    assert (_digest(ckpt), _digest(src)) == before  # inputs untouched

    train = calibration_windows(src, CalibOptions(text=calib, samples=6, seqlen=40, seed=0))
    val = calibration_windows(src, CalibOptions(text=calib, samples=2, seqlen=40, seed=1))
    kl_before, kl_after = _kl(src, ckpt, train), _kl(src, dst, train)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    rec = json.loads((dst / "tuning.json").read_text())
    assert rec["steps"] == 9 and rec["compute"] == "float32"
    assert rec["val_kl_before"] == pytest.approx(_kl(src, ckpt, val), rel=1e-3)
    assert rec["val_kl_after"] == pytest.approx(_kl(src, dst, val), rel=1e-3)

    a, b = read_tensors(ckpt), read_tensors(dst)
    assert a.keys() == b.keys()
    changed = set()
    for name, t in a.items():
        assert b[name].dtype == t.dtype and b[name].shape == t.shape, name
        if not torch.equal(b[name], t):
            changed.add(name.rpartition(".")[2])
            assert name.endswith((".scales", ".zeros")), f"{name} changed"
    assert changed == {"scales", "zeros"}
    assert json.loads((dst / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    assert (dst / "tokenizer.json").is_file()


@pytest.mark.parametrize("model_type,extra", [("gemma2", {"head_dim": 32, "tie_word_embeddings": True}),
                                              ("phi3", {})])
def test_tune_other_architectures(model_type, extra, tmp_path, smollm2_dir):
    """The tuning runs the model's own forward: a Gemma 2 (soft-caps, post-norms, tied head) and a Phi-3
    (fused qkv_proj / gate_up_proj) tune like the Llama above (KL down, only scales and offsets change)."""
    src, calib = make_tiny_model_with_calibration(tmp_path / "src", smollm2_dir, model_type=model_type, hidden=64,
                                                  heads=2, kv_heads=1, intermediate=128, dtype=torch.float32,
                                                  **extra)
    ckpt, dst = tmp_path / "ckpt", tmp_path / "tuned"
    assert convert_main([str(src), str(ckpt), "--method", "rtn", "--w-bits", "2", "--group-size", "32",
                         "--no-progress"]) == 0
    assert _tune(src, ckpt, dst, calib) == 0
    train = calibration_windows(src, CalibOptions(text=calib, samples=6, seqlen=40, seed=0))
    kl_before, kl_after = _kl(src, ckpt, train), _kl(src, dst, train)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    a, b = read_tensors(ckpt), read_tensors(dst)
    assert {n.rpartition(".")[2] for n in a if not torch.equal(a[n], b[n])} == {"scales", "zeros"}


def test_tune_refuses_bad_inputs_and_writes_nothing(tiny, tmp_path, capsys):
    src, calib = tiny
    ckpt = tmp_path / "ckpt"
    assert convert_main([str(src), str(ckpt), "--w-bits", "2", "--group-size", "32", "--no-progress"]) == 0
    other = make_tiny_llama(tmp_path / "other", hidden=96, heads=3, kv_heads=1, intermediate=192, layers=3, vocab=49152)
    cases = [
        ((src, src, tmp_path / "d1"), "not a bipolar checkpoint"),
        ((ckpt, ckpt, tmp_path / "d2"), "is quantized"),
        ((other, ckpt, tmp_path / "d3"), "num_hidden_layers"),
        ((src, ckpt, ckpt / "inside"), "must not be"),
        ((src, ckpt, tmp_path / "d4", "--lr", "0"), "--lr 0.0"),
        ((src, ckpt, tmp_path / "d5", "--calib", str(tmp_path / "missing.txt")), "no such file"),
    ]
    for args, message in cases:
        args = [str(a) for a in args]
        rc = tune_main(args[:3] + ["--calib", str(calib), "--samples", "2", "--seqlen", "40", "--no-progress"]
                       + args[3:])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err)
        assert not Path(args[2]).exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    assert _tune(src, ckpt, existing, calib) == 2
    assert "already exists" in capsys.readouterr().err and (existing / "keep").read_text() == "x"
