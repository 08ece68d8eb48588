"""The converter: round trip on tiny random Llamas, atomic output, clear errors on bad input."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REPO, make_tiny_llama
from quant_tools.checkpoint import HFCheckpoint
from quant_tools.convert import main as convert_main
from vllm_bipolar.format import BipolarQuantSpec, dequantize_packed

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def load_all(path: Path) -> dict[str, torch.Tensor]:
    ck = HFCheckpoint(path)
    return {name: ck.get(name) for name in ck.names()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("w_bits,group_size,symmetric,method", [
    (3, 32, False, "rtn"), (2, 128, False, "mse"), (8, -1, True, "rtn"), (1, 64, True, "mse")])
def test_round_trip(tmp_path, capsys, w_bits, group_size, symmetric, method):
    src = make_tiny_llama(tmp_path / "src", hidden=96, intermediate=200)  # K=96, 200: partial words and groups
    before = tree_digest(src)
    dst = tmp_path / "dst"
    args = [str(src), str(dst), "--w-bits", str(w_bits), "--group-size", str(group_size), "--method", method,
            "--no-progress"] + (["--symmetric"] if symmetric else [])
    assert convert_main(args) == 0
    out = capsys.readouterr().out
    assert "converted 14 linear layers" in out and "MiB ->" in out and "time:" in out
    bpw = float(re.search(r"([\d.]+) bits per weight with scales and offsets \(format version 1\)", out).group(1))
    assert tree_digest(src) == before  # SRC untouched

    cfg = json.loads((dst / "config.json").read_text())
    spec = BipolarQuantSpec.from_dict(cfg["quantization_config"])
    assert (spec.w_bits, spec.group_size, spec.symmetric, spec.method) == (w_bits, group_size, symmetric, method)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= {p.name for p in dst.glob("*.safetensors")}

    orig, conv = load_all(src), load_all(dst)
    # the summary's bits per weight: every quantized tensor's bytes over the quantized weights
    qbytes = sum(t.numel() * t.element_size() for n, t in conv.items() if n.endswith((".qweight", ".scales", ".zeros")))
    qparams = sum(t.numel() for n, t in orig.items() if n.rsplit(".", 1)[0].rsplit(".", 1)[-1] in LINEARS)
    assert bpw == pytest.approx(8 * qbytes / qparams, abs=1e-3)
    for name, t in orig.items():
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in LINEARS:
            assert name not in conv
            qw, scales = conv[f"{module}.qweight"], conv[f"{module}.scales"]
            n, k = t.shape
            ng = 1 if group_size == -1 else -(-k // group_size)
            assert qw.dtype == torch.int32 and qw.shape == (w_bits, n, -(-k // 32))
            assert scales.dtype == t.dtype and scales.shape == (n, ng)
            assert (f"{module}.zeros" in conv) == (not symmetric)
            zeros = conv.get(f"{module}.zeros")
            wd = dequantize_packed(qw, scales, zeros, k, group_size, torch.float64)
            rel = ((wd - t.double()).norm() / t.double().norm()).item()
            assert rel < {1: 0.9, 2: 0.6, 3: 0.3, 8: 0.02}[w_bits], (name, rel)
            if k % 32:  # padding bits are zero
                last = qw[..., -1].to(torch.int64) & 0xFFFFFFFF
                assert torch.all(last >> (k % 32) == 0)
        else:
            assert torch.equal(conv[name], t), name  # embeddings, norms, lm_head copied as is
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("w_bits,group_size,symmetric,method", [
    (2, 128, False, "mse"), (3, 32, True, "rtn"), (1, -1, False, "mse"), (8, 64, False, "rtn")])
def test_round_trip_format_version_2(tmp_path, capsys, w_bits, group_size, symmetric, method):
    """--format-version 2: scale/offset codes and row steps that decode to the quantizer's own fit."""
    from vllm_bipolar.config import check_checkpoint
    from vllm_bipolar.format import quantize_weight, unpack_codes
    from vllm_bipolar.format.group_params import decode_tensors, module_tensors

    src = make_tiny_llama(tmp_path / "src", hidden=96, intermediate=200)
    before = tree_digest(src)
    dst = tmp_path / "dst"
    args = [str(src), str(dst), "--w-bits", str(w_bits), "--group-size", str(group_size), "--method", method,
            "--format-version", "2", "--no-progress"] + (["--symmetric"] if symmetric else [])
    assert convert_main(args) == 0
    assert tree_digest(src) == before
    spec = BipolarQuantSpec.from_dict(json.loads((dst / "config.json").read_text())["quantization_config"])
    assert spec.format_version == 2
    check_checkpoint(dst, spec)  # the plugin's header check accepts it
    orig, conv = load_all(src), load_all(dst)
    for name, t in orig.items():
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] not in LINEARS:
            continue
        n, k = t.shape
        ng = 1 if group_size == -1 else -(-k // group_size)
        group = module_tensors(conv, module)
        assert group["scales"].dtype == torch.uint8 and group["scales"].shape == (n, ng)
        assert group["scales_step"].dtype == t.dtype and group["scales_step"].shape == (n,)
        assert set(group) == ({"scales", "scales_step"} | (set() if symmetric else {"zeros", "zeros_step"}))
        if not symmetric:
            assert group["zeros"].dtype == torch.int8 and group["zeros"].shape == (n, ng)
        scales, zeros = decode_tensors(group)
        # the same fit, made again in process: the stored codes decode to exactly its (s, z) and codes
        q = quantize_weight(t.float(), w_bits, group_size, symmetric, method, dtype=t.dtype, format_version=2)
        assert torch.equal(scales, q.scales) and (symmetric or torch.equal(zeros, q.zeros))
        assert torch.equal(unpack_codes(conv[f"{module}.qweight"], k), q.codes)
        wd = dequantize_packed(conv[f"{module}.qweight"], scales, zeros, k, group_size, torch.float64)
        rel = ((wd - t.double()).norm() / t.double().norm()).item()
        assert rel < {1: 0.9, 2: 0.6, 3: 0.3, 8: 0.02}[w_bits], (name, rel)
    assert leftovers(tmp_path) == []


def test_sharded_source_and_output(tmp_path):
    src = make_tiny_llama(tmp_path / "src", hidden=128, intermediate=256, layers=3, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    dst = tmp_path / "dst"
    assert convert_main([str(src), str(dst), "--w-bits", "4", "--max-shard-size", "60KB", "--no-progress",
                         "--layer-bits", "model.layers.0.mlp.down_proj=8", "--skip", "model.layers.2.self_attn"]) == 0
    shards = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["layer_bits"] == {"model.layers.0.mlp.down_proj": 8}
    assert "model.layers.2.self_attn" in cfg["modules_to_not_convert"]
    conv = load_all(dst)
    assert conv["model.layers.0.mlp.down_proj.qweight"].shape[0] == 8
    assert conv["model.layers.1.mlp.down_proj.qweight"].shape[0] == 4
    assert "model.layers.2.self_attn.q_proj.weight" in conv and "model.layers.2.mlp.up_proj.qweight" in conv


def test_existing_dst_refused_then_overwritten(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert convert_main([str(src), str(dst), "--w-bits", "4", "--no-progress"]) == 2
    assert "already exists; choose another destination or pass --overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "precious"
    assert convert_main([str(src), str(dst), "--w-bits", "4", "--no-progress", "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert leftovers(tmp_path) == []


def _sigint_default() -> None:
    # A runner started in the background by a shell (`cmd &`, nohup) hands SIG_IGN for SIGINT down to its
    # children, and Python then installs no KeyboardInterrupt handler: the child gets the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _convert_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quant_tools.convert", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_leaves_no_dst(tmp_path, sig):
    src = make_tiny_llama(tmp_path / "src", hidden=512, intermediate=1536, layers=6, dtype=torch.float32)
    before = tree_digest(src)
    dst = tmp_path / "dst"
    proc = _convert_cli(str(src), str(dst), "--w-bits", "3", "--method", "mse", "--no-progress")
    deadline = time.time() + 60
    while not leftovers(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let it get into the quantization loop
    assert proc.poll() is None, "conversion finished before it could be interrupted; make the model larger"
    proc.send_signal(sig)
    # a hang guard, not a timing: on a loaded 2-core CI machine a SIGINT'd conversion took over 60 s
    proc.wait(timeout=300)
    assert proc.returncode != 0
    assert not dst.exists()
    assert tree_digest(src) == before
    if sig != signal.SIGKILL:  # a catchable signal cleans up its temporary directory itself
        assert leftovers(tmp_path) == []
        assert "nothing was written" in proc.stderr.read()
    # Re-running after the interruption succeeds and clears what a killed run left behind.
    rerun = _convert_cli(str(src), str(dst), "--w-bits", "3", "--no-progress")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert (dst / "config.json").is_file() and leftovers(tmp_path) == []


def _expect_error(tmp_path, capsys, src, pattern, *extra):
    dst = tmp_path / "dst"
    code = convert_main([str(src), str(dst), "--w-bits", "4", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and pattern in err, err
    assert not dst.exists() and leftovers(tmp_path) == []
    return err


def test_missing_source(tmp_path, capsys):
    _expect_error(tmp_path, capsys, tmp_path / "nope", "no such directory")


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path, capsys, tmp_path / "empty", "no config.json; not a Hugging Face checkpoint")
    f = tmp_path / "file.txt"
    f.write_text("x")
    _expect_error(tmp_path, capsys, f, "not a directory")


def test_missing_weights(tmp_path, capsys, tiny_llama):
    for p in tiny_llama.glob("*.safetensors"):
        p.rename(p.with_suffix(".bin"))
    _expect_error(tmp_path, capsys, tiny_llama, "no *.safetensors weights")


@pytest.mark.parametrize("cut", [4, 200, -100])
def test_truncated_safetensors(tmp_path, capsys, tiny_llama, cut):
    f = tiny_llama / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    _expect_error(tmp_path, capsys, tiny_llama, "truncated")


def test_nan_weights(tmp_path, capsys, tiny_llama):
    f = tiny_llama / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    _expect_error(tmp_path, capsys, tiny_llama, "model.layers.1.mlp.up_proj.weight: weight has 1 NaN/inf value")


def test_unsupported_architecture(tmp_path, capsys, tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp_path, capsys, tiny_llama, "architecture ['MambaForCausalLM'] is not supported")


@pytest.mark.parametrize("extra,pattern", [
    (["--group-size", "48"], "groups must cover whole 32-bit words"),
    (["--a-bits", "4", "--group-size", "64"], "binary tensor-core kernels"),
    (["--layer-bits", "model.layers.9.mlp.up_proj=4"], "--layer-bits names module(s) not in the model"),
    (["--layer-bits", "model.layers.0.self_attn.q_proj=8"], "one fused layer"),
    (["--layer-bits", "model.layers.0.mlp.up_proj"], "expected NAME=BITS"),
])
def test_bad_options(tmp_path, capsys, tiny_llama, extra, pattern):
    _expect_error(tmp_path, capsys, tiny_llama, pattern, *extra)


@pytest.mark.parametrize("bits", ["0", "9"])
def test_bad_bits(tmp_path, capsys, tiny_llama, bits):
    dst = tmp_path / "dst"
    assert convert_main([str(tiny_llama), str(dst), "--w-bits", bits, "--no-progress"]) == 2
    assert f"'w_bits'] = {bits}: unsupported bit width" in capsys.readouterr().err
    assert not dst.exists()


def test_already_quantized_source(tmp_path, capsys, tiny_llama):
    dst = tmp_path / "q"
    assert convert_main([str(tiny_llama), str(dst), "--w-bits", "4", "--no-progress"]) == 0
    _expect_error(tmp_path, capsys, dst, "is already quantized (bipolar)")


def test_read_only_destination(tmp_path, capsys, tiny_llama, monkeypatch):
    import quant_tools.checkpoint as ckpt_mod

    def read_only(*a, **k):  # simulated: the tests may run as root, which ignores permissions
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ckpt_mod.tempfile, "mkdtemp", read_only)
    code = convert_main([str(tiny_llama), str(tmp_path / "dst"), "--w-bits", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the output" in err and "Read-only file system" in err
    assert not (tmp_path / "dst").exists()


def test_disk_full_while_writing(tmp_path, capsys, tiny_llama, monkeypatch):
    import quant_tools.checkpoint as ckpt_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    dst = tmp_path / "dst"
    assert convert_main([str(tiny_llama), str(dst), "--w-bits", "4", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was written" in err
    assert not dst.exists() and leftovers(tmp_path) == []


def test_real_model_sizes(smollm2_dir, tmp_path, capsys):
    """SmolLM2-135M at W4: every decoder linear quantized, the rest untouched, size as expected."""
    dst = tmp_path / "w4"
    assert convert_main([str(smollm2_dir), str(dst), "--w-bits", "4", "--no-progress"]) == 0
    assert "converted 210 linear layers (210 x 4-bit; 0 kept in full precision)" in capsys.readouterr().out
    with safe_open(next(dst.glob("model-*.safetensors")), "pt") as f:
        assert any(n.endswith(".qweight") for n in f.keys())
    total = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    # 106.2M linear weights at 4 bits + bf16 scale/offset per 128 + the bf16 embedding (28.3M).
    expected = 106_168_320 * (4 / 8 + 4 / 128) + 28_311_552 * 2
    assert abs(total - expected) / expected < 0.01
    # Format version 2: one byte per scale and per offset, two bf16 steps per output row (155,520 rows).
    dst2 = tmp_path / "w4-v2"
    assert convert_main([str(smollm2_dir), str(dst2), "--w-bits", "4", "--format-version", "2", "--no-progress"]) == 0
    total2 = sum(p.stat().st_size for p in dst2.glob("*.safetensors"))
    expected2 = 106_168_320 * (4 / 8 + 2 / 128) + 155_520 * 4 + 28_311_552 * 2
    assert abs(total2 - expected2) / expected2 < 0.01
