"""benchmarks/e2e.py on CPU: its bookkeeping (expected weight memory, vLLM log parsing, merging, the
decode-step profile's arithmetic, the deadline) and one small real run on the tiny shape.

The real run starts one vLLM engine (eager, about 30-60 s on 2 CPU cores); deselect it with
``pytest -k "not e2e_tiny_run"`` or ``VLLM_BIPOLAR_SKIP_E2E_TEST=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks import e2e

GIB = 1024 ** 3
ROW_KEYS = {"model", "method", "w_bits", "a_bits", "batch", "phase", "tokens_per_s", "device", "commit", "command"}


def test_expected_weight_memory_llama2_7b():
    fp16, fp16_target = e2e.weight_bytes("llama2-7b", "fp16")
    assert fp16 == fp16_target
    assert round(fp16 / GIB, 2) == 12.55  # what vLLM 0.26 reported for the fp16 model on an H100
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = fp16 - 2 * linears
    assert rest == 2 * (2 * 32000 * 4096 + 65 * 4096 + 4096 * 128)  # embeddings, lm_head, norms, rotary cache
    for bits in (1, 2, 3, 4, 8):
        expected, target = e2e.weight_bytes("llama2-7b", f"W{bits}A16")
        assert target == rest + linears * bits / 8  # the yardstick: bits/16 of fp16, plus the rest
        assert expected == target + 4 * linears / 128  # + scale and offset (fp16) per group of 128 and row
        # format version 2: one byte each per group and row, and two fp16 steps per output row
        rows = 32 * (5 * 4096 + 2 * 11008)  # output rows: q, k, v, o, down 4096; gate, up 11008
        assert e2e.weight_bytes("llama2-7b", f"W{bits}A16v2") == (target + 2 * linears / 128 + 4 * rows, target)
        if bits <= 2:  # version 2 is within 10% of the yardstick at 1 and 2 bits (version 1 at 1 bit is not)
            assert e2e.weight_bytes("llama2-7b", f"W{bits}A16v2")[0] < 1.1 * target
            assert bits == 2 or expected > 1.1 * target
    assert e2e.weight_bytes("llama2-7b", "W2A4") == e2e.weight_bytes("llama2-7b", "W2A16")  # a_bits: no weights
    assert e2e.weight_bytes("llama2-7b", "fp8") == (rest + linears, rest + linears)
    assert e2e.weight_bytes("llama2-7b", "gptq") == e2e.weight_bytes("llama2-7b", "W4A16")
    with pytest.raises(SystemExit):
        e2e.weight_bytes("llama2-7b", "int4")


def test_parse_log_both_vllm_releases():
    v032 = ("(EngineCore_DP0 pid=7) INFO 11-24 09:43:54 [gpu_model_runner.py:5150] Model loading took 3.69 GiB "
            "memory and 12.345678 seconds\n"
            "(EngineCore_DP0 pid=7) INFO [monitor.py:20] torch.compile took 31.52 s in total\n"
            "(EngineCore_DP0 pid=7) INFO [gpu_model_runner.py:6582] Graph capturing finished in 4 secs, took 0.10 GiB\n"
            "(EngineCore_DP0 pid=7) INFO [auto_gptq.py:352] Using MarlinLinearKernel for AutoGPTQLinearMethod\n"
            "INFO [linear_method.py:113] bipolar: model.layers.0.self_attn.qkv_proj runs on kernel backend "
            "'cuda_gemm_a16' (W4A16 g128 offsets N=12288 K=4096 float16)\n")
    got = e2e.parse_log(v032)
    assert got["weight_gib"] == 3.69 and got["compile_s"] == 31.52 and got["graph_capture_s"] == 4.0
    assert got["kernel_log"] == ("Using MarlinLinearKernel for AutoGPTQLinearMethod; bipolar: "
                                 "model.layers.0.self_attn.qkv_proj runs on kernel backend 'cuda_gemm_a16' "
                                 "(W4A16 g128 offsets N=12288 K=4096 float16)")
    v026_v2 = "INFO [model_runner.py:306] Model loading took 12.55 GiB and 20.1 seconds\n"
    assert e2e.parse_log(v026_v2)["weight_gib"] == 12.55
    old = "INFO Loading model weights took 4.00 GB\n"
    assert e2e.parse_log(old)["weight_gib"] == round(4e9 / GIB, 3)
    fp8 = "INFO [__init__.py:671] Selected CutlassFP8ScaledMMLinearKernel for Fp8LinearMethod\n"
    assert e2e.parse_log(fp8)["kernel_log"] == "Selected CutlassFP8ScaledMMLinearKernel for Fp8LinearMethod"
    assert e2e.parse_log("nothing") == {"weight_gib": None, "compile_s": None, "graph_capture_s": None,
                                        "kernel_log": None}


def test_merge_keeps_other_methods_and_replaces_the_ones_run():
    old = [{"model": "m", "method": "fp16", "batch": 1}, {"model": "m", "method": "W4A16", "batch": 1},
           {"model": "other", "method": "W4A16", "batch": 1}]
    new = [{"model": "m", "method": "W4A16", "batch": 16}]
    got = e2e.merge_rows(old, new, {("m", "W4A16")})
    assert got == [old[0], old[2], new[0]]


def test_categories_and_decode_profile_arithmetic():
    cases = {
        "void bipolar::a16::gemm_a16_kernel<__half, 4, bipolar::a16::Cfg>(bipolar::a16::Problem)": "bipolar gemm",
        "void bipolar::a16::gemv_a16_kernel<__half, 2, bipolar::a16::Cfg, true>(...)": "bipolar gemm",
        "void bipolar::(anonymous namespace)::dequantize_a16_kernel<__half>(...)": "dequantize",
        "void bipolar::(anonymous namespace)::quantize_kernel<__half>(...)": "act quantize",
        "bipolar::linear": "bipolar gemm",
        "void vllm::dynamic_scaled_fp8_quant_kernel<c10::Half>(...)": "act quantize",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>": "attention",
        "void vllm::reshape_and_cache_flash_kernel<...>": "attention",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norm/rope/activation",
        "triton_poi_fused_mul_silu_1": "norm/rope/activation",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>": "sampling",
        "nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTN": "cuBLAS/gemm",
        "void marlin::Marlin<...>(...)": "cuBLAS/gemm",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64": "cuBLAS/gemm",
        "aten::mm": "cuBLAS/gemm",
        "Memcpy HtoD (Pageable -> Device)": "memcpy",
        "void at::native::vectorized_elementwise_kernel<4, ...>": "other",
    }
    for name, cat in cases.items():
        assert e2e.categorize(name) == cat, name
    first = {"gemm_a16_kernel": [7, 70.0], "flash_fwd": [2, 10.0], "prefill_only": [1, 5.0]}
    full = {"gemm_a16_kernel": [7 + 4 * 7, 70.0 + 4 * 60.0], "flash_fwd": [2 + 4 * 2, 10.0 + 4 * 10.0],
            "prefill_only": [1, 5.0], "argmax": [4, 4 * 10.0]}
    rows = e2e.decode_profile(first, full, steps=4)
    assert [r["kernel"] for r in rows] == ["gemm_a16_kernel", "flash_fwd", "argmax"]  # prefill-only kernels drop out
    assert [r["per_step_us"] for r in rows] == [60.0, 10.0, 10.0]
    assert [r["calls"] for r in rows] == [28, 8, 4]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    cats = e2e.category_shares(rows)
    assert list(cats) == ["bipolar gemm", "attention", "sampling"] and cats["bipolar gemm"]["share"] == 0.75


def test_deadline_skips_and_the_table_covers_the_file(tmp_path, capsys):
    out = tmp_path / "e2e_x.json"
    old = [{"model": "tiny", "method": m, "w_bits": 16, "a_bits": 16, "batch": 1, "phase": "decode",
            "tokens_per_s": t, "device": "cpu", "commit": "abc", "command": "c", "weight_gib": None,
            "param_gib": 0.003, "expected_gib": 0.003, "target_gib": 0.003, "weight_ratio": r}
           for m, t, r in (("fp16", 100.0, 1.0), ("W4A16", 50.0, 1.5))]
    out.write_text(json.dumps(old))
    assert e2e.main(["--shape", "tiny", "--methods", "W2A16", "--deadline-s", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "W2A16: skipped" in text and "SKIPPED" in text
    assert "0.50x" in text  # W4A16 against fp16, from the rows already in the file
    assert "weight memory not within 10% of expected: tiny/W4A16 (1.50x)" in text
    assert json.loads(out.read_text()) == old


@pytest.mark.skipif(os.environ.get("VLLM_BIPOLAR_SKIP_E2E_TEST") == "1", reason="VLLM_BIPOLAR_SKIP_E2E_TEST=1")
def test_e2e_tiny_run(tmp_path):
    out = tmp_path / "e2e_cpu.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    # W4A16v2: a format version 2 checkpoint (8-bit scale/offset codes) under vLLM's dummy weights
    cmd = [sys.executable, str(REPO / "benchmarks" / "e2e.py"), "--shape", "tiny", "--methods", "W4A16", "W4A16v2",
           "--batches", "1", "--gen", "4", "--prompt", "8", "--prefill", "16", "1", "--eager", "--repeats", "2",
           "--profile", "W4A16", "--profile-steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["method"], r["phase"], r["batch"]) for r in rows] == [
        (m, p, 1) for m in ("W4A16", "W4A16v2") for p in ("decode", "prefill")]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["tokens_per_s"] > 0 and r["engine_start_s"] > 0
        runs = r["tokens_per_s_runs"]  # --repeats 2: the row is their median
        assert len(runs) == 2 and len(r["seconds"]) == 2 and r["tokens_per_s"] == pytest.approx(sum(runs) / 2, rel=1e-3)
        assert "kernel backend 'torch'" in r["kernel_log"]
        # vLLM's CPU runner logs no weight memory: the parameter bytes stand in, and match the shape
        assert r["weight_from"] == "params" and abs(r["weight_ratio"] - 1) <= 0.10
    profile = json.loads((tmp_path / "e2e_profile_cpu.json").read_text())
    (summary,) = profile["steps"]
    assert summary["method"] == "W4A16" and summary["steps"] == 2 and summary["source"] == "cpu"
    assert profile["kernels"] and {"kernel", "category", "calls", "us", "share", "per_step_us"} <= set(profile["kernels"][0])
    assert sum(k["share"] for k in profile["kernels"]) == pytest.approx(1.0, abs=1e-3)


def test_make_shapes_gptq_checkpoint(tmp_path):
    """make_shapes.py --method gptq: GPTQ-layout tensors of the right shapes and dtypes for every linear of
    every layer (random codes, the same per shape but stored separately), and the matching config."""
    import torch
    from safetensors.torch import load_file

    from benchmarks import make_shapes

    assert make_shapes.main([str(tmp_path), "--shape", "tiny", "--method", "gptq"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                          "sym": True, "checkpoint_format": "gptq"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in set(index.values()):
        tensors.update(load_file(str(tmp_path / shard)))
    assert set(tensors) == set(index)
    shapes = make_shapes.linear_shapes(cfg)
    for layer in range(cfg["num_hidden_layers"]):
        for suffix, (n, k) in shapes.items():
            p = f"model.layers.{layer}.{suffix}"
            qw, qz, sc, gi = (tensors[f"{p}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx"))
            assert qw.dtype == torch.int32 and qw.shape == (k // 8, n)
            assert qz.dtype == torch.int32 and qz.shape == (k // 128, n // 8)
            assert sc.dtype == torch.float16 and sc.shape == (k // 128, n) and bool((sc > 0).all())
            assert torch.equal(gi, (torch.arange(k) // 128).to(torch.int32))
            assert qw.unique().numel() > 1, "codes must not be constant"
            assert torch.equal(qw, tensors[f"model.layers.0.{suffix}.qweight"])
    assert tensors["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])


def test_compare_runs_table_and_best_setting(tmp_path, capsys):
    """benchmarks/compare_runs.py: one column per file, '-' where a file lacks a row, the setting with the
    least total time at the chosen M, and files that are not result rows skipped with a message."""
    from benchmarks import compare_runs

    def row(m, n, w, us):
        return {"M": m, "N": n, "K": 4096, "w_bits": w, "a_bits": 16, "group_size": 128, "us": us}

    fast = tmp_path / "pf8.json"
    slow = tmp_path / "pf0.json"
    names = tmp_path / "pf0.kernels.json"
    fast.write_text(json.dumps([row(1, 4096, 2, 5.0), row(1, 11008, 2, 9.0), row(16, 4096, 2, 30.0)]))
    slow.write_text(json.dumps([row(1, 4096, 2, 6.0), row(1, 11008, 2, 9.5), row(16, 4096, 2, 20.0),
                                row(64, 4096, 2, 40.0)]))
    names.write_text(json.dumps({"bipolar": ["gemv_a16_kernel"]}))
    assert compare_runs.main([str(slow), str(fast), str(names), "--best-by", "M=1"]) == 0
    out, err = capsys.readouterr()
    assert "skipping" in err and "pf0.kernels.json" in err
    lines = out.splitlines()
    assert "pf0" in lines[0] and "pf8" in lines[0]
    r64 = next(line for line in lines if line.split()[:2] == ["64", "4096"])
    assert r64.split()[-2:] == ["40.00", "-"]
    assert "pf0 15.5" in out and "pf8 14.0" in out  # M = 1 totals: 6 + 9.5 and 5 + 9
    assert lines[-1] == f"best: {fast}"
    # at M = 16 the other file wins; no rows at an absent M is an error
    assert compare_runs.main([str(slow), str(fast), "--best-by", "M=16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"best: {slow}"
    assert compare_runs.main([str(slow), str(fast), "--best-by", "M=64"]) == 1


def test_torch_path_rows(tmp_path, capsys):
    """benchmarks/torch_path.py: one row per (shape, bits, M) with kernels.py's keys, so compare_runs reads it."""
    from benchmarks import compare_runs, torch_path

    out = tmp_path / "tp.json"
    assert torch_path.main(["--shapes", "40x96", "--m", "1", "3", "--bits", "2", "5", "--iters", "1",
                            "--group-size", "32", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["M"], r["w_bits"]) for r in rows] == [(1, 2), (3, 2), (1, 5), (3, 5)]
    for r in rows:
        assert (r["N"], r["K"], r["a_bits"], r["group_size"]) == (40, 96, 16, 32)
        assert r["us"] > 0 and r["dequantize_us"] > 0 and r["bf16_us"] > 0 and r["commit"] and r["device"]
    capsys.readouterr()
    assert compare_runs.main([str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(rows)
