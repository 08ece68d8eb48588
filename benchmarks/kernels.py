"""Kernel benchmark: bipolar WpAq / WpA16 layers against cuBLAS fp16, Marlin W4, int8 and fp8 GEMMs.

    python benchmarks/kernels.py                 # the full table of issue 3 (GPU machine, ~5 min)
    python benchmarks/kernels.py --quick         # a few shapes
    python benchmarks/kernels.py --m 1 16 --shapes 11008x4096 --pairs 4,16 2,2

Prints a table and writes benchmarks/results/kernels_<gpu>.json: one row per (M, N, K, w_bits,
a_bits) with the median time of the bipolar layer as vLLM calls it (``us``: the op, activation
quantization included for a_bits < 16) and, for the same M, N, K: ``cublas_fp16_us``
(torch.matmul, fp16), ``marlin_w4_us`` (vLLM's GPTQ-Marlin W4 g128 when vllm imports, else null),
``int8_us`` (torch._int_mm), ``fp8_us`` (torch._scaled_mm, per-tensor scales), ``dequant_cublas_us``
(our dequantize kernel then cuBLAS: the floor no shape may be slower than), ``gbps`` (weight +
scale bytes / time), ``tops`` (2 M N K / time), plus ``device``, ``commit``, ``command``.

Timing: every measured call reads its own copy of the weights (copies rotated so that the working
set exceeds the L2 twice over; weights come from HBM as in a real model), the calls are captured in
one CUDA graph, and the per-call time is the median over replays. Each method's kernels are named
once from a torch.profiler trace (``kernels`` in the JSON), proof that each baseline ran the path it
claims.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vllm_bipolar.format as fmt  # noqa: E402
from vllm_bipolar import ops  # noqa: E402
from vllm_bipolar.kernels import a16_layout  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
MS = [1, 4, 16, 64, 256, 1024, 4096]
PAIRS = [(1, 16), (2, 16), (3, 16), (4, 16), (8, 16), (1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (2, 8), (4, 8)]
GROUP = 128  # bipolar layers' group size (--group-size)
MARLIN_GROUP = 128  # the Marlin W4 baseline is always g128
L2_BYTES = 50 * 2 ** 20
DEV = "cuda"


# ---- timing -----------------------------------------------------------------------------------------
def copies_for(nbytes: int, cap: int = 32) -> int:
    """Weight copies so that one pass over them moves at least twice the L2."""
    return max(2, min(cap, -(-2 * L2_BYTES // max(nbytes, 1))))


def time_calls(fns, replays: int = 7) -> float:
    """Median microseconds per call of fns (each a closure on its own weight copy), in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up (lazy init, cuBLAS heuristics) outside the graph
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    reps = max(1, 24 // len(fns))
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in fns:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / (reps * len(fns)))
    del graph
    return statistics.median(times)


def kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels one call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.name not in names:
            names.append(e.name[:120])
    return names


# ---- layers -----------------------------------------------------------------------------------------
def bipolar_layer(n: int, k: int, w_bits: int, a_bits: int, dtype=torch.float16):
    """(forward(x), weight bytes, alternatives) of a random bipolar layer: for a_bits = 16 the forward of
    dequantize + cuBLAS; for WpAq layers a dict {JSON key: forward} of the paths the plugin can take."""
    w = torch.randn(n, k, device=DEV) * 0.02
    q = fmt.quantize_weight(w, w_bits, group_size=GROUP, symmetric=False, dtype=dtype)
    qweight = fmt.pack_codes(q.codes, w_bits)
    del w, q.codes
    if a_bits == 16:
        qw, sc, shift = a16_layout.repack(qweight, q.scales, q.zeros, k, GROUP)
        nbytes = qw.numel() * 4 + sc.numel() * sc.element_size()
        fwd = lambda x, qw=qw, sc=sc: ops.linear_a16_cuda(x, qw, sc, n, k, shift)  # noqa: E731
        deq = lambda x, qw=qw, sc=sc: torch.nn.functional.linear(  # noqa: E731
            x, torch.ops.bipolar_kernels.dequantize_a16(qw, sc, n, k, shift))
        return fwd, nbytes, deq
    # WpAq: what the plugin runs (cuda_gemm_a16 backend: the weight-only layout; ops.linear_wpaq_cuda picks the
    # int8 kernel from ops.WPAQ_INT8_MIN_M on, else fake-quantized activations through the weight-only
    # kernels), and each of its two paths and the binary kernels alone (PATHS), timed side by side
    from vllm_bipolar.format import fake_quantize_activations
    from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights
    from vllm_bipolar.kernels.cuda_gemm_a16 import int8_col_bias

    qw, sc, shift = a16_layout.repack(qweight, q.scales, q.zeros, k, GROUP)
    cb8 = int8_col_bias(qweight, q.scales, k, GROUP, a_bits)
    nbytes = qw.numel() * 4 + sc.numel() * sc.element_size() + cb8.numel() * 4
    fwd = lambda x: ops.linear_wpaq_cuda(x, fake_quantize_activations(x, a_bits), qw, sc, cb8, n, k, shift,  # noqa: E731
                                         a_bits)
    sz, col_bias = prepare_binary_weights(qweight, q.scales, q.zeros, k, GROUP, a_bits)  # load time
    paths = {
        "wpaq_int8_us": lambda x: ops.wpaq_int8_forward(x, qw, sc, cb8, n, k, shift, a_bits),
        "wpaq_a16_us": lambda x: ops.linear_a16_cuda(fake_quantize_activations(x, a_bits), qw, sc, n, k, shift),
        "wpaq_binary_us": lambda x: ops.linear_binary_cuda(x, qweight, sz, col_bias, k, GROUP, a_bits),
    }
    return fwd, nbytes, paths


def marlin_layer(n: int, k: int):
    """Forward of vLLM's GPTQ-Marlin W4 g128 layer (random weights), or (None, why)."""
    try:
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            apply_gptq_marlin_linear, marlin_make_empty_g_idx, marlin_make_workspace_new)
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
        from vllm.scalar_type import scalar_types
    except Exception as exc:  # noqa: BLE001 - vllm absent or a different version
        return None, f"vllm marlin unavailable: {exc}"
    w = torch.randn(k, n, device=DEV, dtype=torch.float16) * 0.02
    _, q_w, s, g_idx, sort_idx, _ = marlin_quantize(w, scalar_types.uint4b8, MARLIN_GROUP, False)
    ws = marlin_make_workspace_new(torch.device(DEV))
    zp = marlin_make_empty_g_idx(torch.device(DEV))

    def fwd(x):
        return apply_gptq_marlin_linear(input=x, weight=q_w, weight_scale=s, weight_zp=zp, g_idx=g_idx,
                                        g_idx_sort_indices=sort_idx, workspace=ws, wtype=scalar_types.uint4b8,
                                        output_size_per_partition=n, input_size_per_partition=k, is_k_full=True)
    return fwd, None


def baselines(n: int, k: int, m: int, results: dict, names: dict) -> None:
    """cuBLAS fp16, Marlin W4, int8, fp8 for one (M, N, K): microseconds (None where undefined)."""
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    wbytes = n * k * 2
    ws = [torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02 for _ in range(copies_for(wbytes, 4))]
    results["cublas_fp16_us"] = time_calls([lambda w=w: torch.matmul(x, w.T) for w in ws])
    names.setdefault("cublas_fp16", kernel_names(lambda: torch.matmul(x, ws[0].T)))
    # int8: torch._int_mm (needs M > 16 and dims that are multiples of 8)
    try:
        xi = torch.randint(-127, 127, (max(m, 17), k), device=DEV, dtype=torch.int8)
        wi = [w.to(torch.int8).T for w in ws[:2]] + [torch.randint(-127, 127, (n, k), device=DEV, dtype=torch.int8).T
                                                    for _ in range(copies_for(n * k, 8) - 2)]
        if m > 16:
            results["int8_us"] = time_calls([lambda w=w: torch._int_mm(xi, w) for w in wi])
            names.setdefault("int8", kernel_names(lambda: torch._int_mm(xi, wi[0])))
        else:
            results["int8_us"] = None
    except Exception:  # noqa: BLE001
        results["int8_us"] = None
    # fp8: torch._scaled_mm, per-tensor scales (M padded to 16 as fp8 GEMMs require)
    try:
        mp = max(16, -(-m // 16) * 16)
        x8 = torch.randn(mp, k, device=DEV).to(torch.float8_e4m3fn)
        w8 = [torch.randn(n, k, device=DEV).to(torch.float8_e4m3fn) for _ in range(copies_for(n * k, 8))]
        one = torch.ones((), device=DEV)
        results["fp8_us"] = time_calls([lambda w=w: torch._scaled_mm(x8, w.T, scale_a=one, scale_b=one,
                                                                     out_dtype=torch.float16) for w in w8])
        names.setdefault("fp8", kernel_names(lambda: torch._scaled_mm(x8, w8[0].T, scale_a=one, scale_b=one,
                                                                      out_dtype=torch.float16)))
    except Exception:  # noqa: BLE001
        results["fp8_us"] = None
    ws.clear()
    layers = []
    for _ in range(copies_for(n * k // 2, 8)):
        fwd, why = marlin_layer(n, k)
        if fwd is None:
            results["marlin_w4_us"] = None
            names.setdefault("marlin_w4", [why])
            return
        layers.append(fwd)
    results["marlin_w4_us"] = time_calls([lambda f=f: f(x) for f in layers])
    names.setdefault("marlin_w4", kernel_names(lambda: layers[0](x)))


def git_commit() -> str:
    if os.environ.get("BIPOLAR_COMMIT"):  # the GPU machine gets a copy of the tree without a current .git
        return os.environ["BIPOLAR_COMMIT"]
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return os.environ.get("BIPOLAR_COMMIT", "unknown")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=None, help="NxK, e.g. 11008x4096")
    p.add_argument("--m", nargs="+", type=int, default=None, help="token counts")
    p.add_argument("--pairs", nargs="+", default=None, help="w_bits,a_bits, e.g. 4,16 2,2")
    p.add_argument("--quick", action="store_true", help="(11008, 4096) and (4096, 14336), M 1 16 4096")
    p.add_argument("--no-baselines", action="store_true", help="skip cuBLAS/Marlin/int8/fp8")
    p.add_argument("--wpaq-paths", action="store_true",
                   help="for WpAq pairs also time each path alone (int8 kernel, weight-only kernels on fake-quantized "
                        "activations, binary kernels): keys wpaq_int8_us, wpaq_a16_us, wpaq_binary_us")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<gpu>.json)")
    p.add_argument("--group-size", type=int, default=128,
                   help="group size of the bipolar layers: -1 (per row) or a positive size (default 128; the "
                        "binary WpAq kernel needs -1 or a multiple of 128); the Marlin baseline stays g128")
    args = p.parse_args(argv)
    if args.group_size == 0 or args.group_size < -1:
        p.error(f"--group-size must be -1 or positive, got {args.group_size}")
    global GROUP
    GROUP = args.group_size
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if not ops.cuda_extension_available():
        print(ops.CUDA_EXTENSION_ERROR, file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    ms = args.m or MS
    pairs = [tuple(int(v) for v in s.split(",")) for s in args.pairs] if args.pairs else PAIRS
    if args.quick:
        shapes, ms = [(11008, 4096), (14336, 4096)], [1, 16, 4096]
    device = torch.cuda.get_device_name()
    gpu = device.split()[-1].lower() if "H100" not in device else "h100"
    gpu = "h200" if "H200" in device else gpu
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kernels_{gpu}.json")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    commit = git_commit()
    rows, names = [], {}
    hdr = (f"{'M':>5} {'N':>6} {'K':>6} {'W':>2} {'A':>2} {'us':>9} {'fp16':>8} {'marlin':>8} {'fp8':>8} "
           f"{'deq+cub':>8} {'x fp16':>7} {'GB/s':>7} {'TOPS':>7}")
    print(f"# {device}, torch {torch.__version__}, commit {commit}\n{hdr}")
    for n, k in shapes:
        base = {m: {} for m in ms}
        if not args.no_baselines:
            for m in ms:
                baselines(n, k, m, base[m], names)
        xs = {m: torch.randn(m, k, device=DEV, dtype=torch.float16) for m in ms}
        for w_bits, a_bits in pairs:
            fwd0, nbytes, deq0 = bipolar_layer(n, k, w_bits, a_bits)
            layers = [(fwd0, deq0)] + [bipolar_layer(n, k, w_bits, a_bits)[::2] for _ in range(copies_for(nbytes) - 1)]
            for m in ms:
                x = xs[m]
                us = time_calls([lambda f=f: f(x) for f, _ in layers])
                if (n, k) == shapes[0] and m in (ms[0], ms[-1]):
                    names[f"W{w_bits}A{a_bits} M={m}"] = kernel_names(lambda: fwd0(x))
                deq_us = time_calls([lambda d=d: d(x) for _, d in layers]) if a_bits == 16 else None
                alt = {}
                if a_bits != 16 and args.wpaq_paths:
                    for key in layers[0][1]:
                        alt[key] = time_calls([lambda d=d, key=key: d[key](x) for _, d in layers])
                b0 = base[m]
                row = {"M": m, "N": n, "K": k, "w_bits": w_bits, "a_bits": a_bits, "group_size": GROUP, "us": us,
                       "cublas_fp16_us": b0.get("cublas_fp16_us"), "marlin_w4_us": b0.get("marlin_w4_us"),
                       "int8_us": b0.get("int8_us"), "fp8_us": b0.get("fp8_us"), "dequant_cublas_us": deq_us,
                       **alt, "gbps": nbytes / us / 1e3, "tops": 2 * m * n * k / us / 1e6,
                       "device": device, "commit": commit, "command": command}
                rows.append(row)

                def f(v):
                    return f"{v:8.1f}" if v is not None else f"{'-':>8}"
                speed = f"{row['cublas_fp16_us'] / us:6.2f}x" if row["cublas_fp16_us"] else f"{'-':>7}"
                print(f"{m:5d} {n:6d} {k:6d} {w_bits:2d} {a_bits:2d} {us:9.1f} {f(row['cublas_fp16_us'])} "
                      f"{f(row['marlin_w4_us'])} {f(row['fp8_us'])} {f(deq_us)} {speed} {row['gbps']:7.0f} "
                      f"{row['tops']:7.1f}" + "".join(f" {key[5:-3]} {v:.1f}" for key, v in alt.items()), flush=True)
            del layers
            torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    meta = {"device": device, "torch": torch.__version__, "commit": commit, "command": command,
            "python": platform.python_version(), "kernels": names}
    out.with_suffix(".kernels.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} and {out.with_suffix('.kernels.json')} (kernel names per method)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
