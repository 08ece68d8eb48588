"""Quick timing of bipolar_kernels::gemm_a16 against torch's fp16 matmul (cuBLAS).

    python3 csrc/tests/bench_gemm_a16.py [--n 11008] [--k 4096]     # the built vllm_bipolar._C
    python3 csrc/tests/bench_gemm_a16.py --variant NAME --defines=-DBIPOLAR_A16_ROWS_SMALL_M=4
        # JIT-builds csrc/ with the given tuning -D flags (sm_90a) into /tmp/bipolar_NAME and times it
    python3 csrc/tests/bench_gemm_a16.py --ncu     # a few eager calls, for `ncu --kernel-name regex:gemm_a16`

Method (DESIGN.md section 5): each measurement is a CUDA graph of calls that rotate over enough
weight copies that the weights come from HBM, not L2; every replay is timed with CUDA events and
the median of 50 replays, divided by the calls per graph, is reported. "GB/s" counts the weight
bytes (planes + scales + zeros, or the fp16 matrix) read per call.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import math
import os
import statistics

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_variant(name: str, defines: str):
    """JIT build of csrc/ with extra -D flags (tuning experiments); registers the ops in this process."""
    from torch.utils.cpp_extension import load

    csrc = os.path.join(ROOT, "csrc")
    build_dir = os.path.join("/tmp", f"bipolar_{name}")
    os.makedirs(build_dir, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(csrc, "*.cu"))) + [os.path.join(csrc, "torch_bindings.cpp")]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    load(name=f"bipolar_{name}", sources=sources, extra_include_paths=[csrc], build_directory=build_dir,
         extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", abi,
                            "-gencode=arch=compute_90a,code=sm_90a", *defines.split()],
         extra_cflags=["-O3", abi], verbose=False)
    print(f"variant library: {os.path.join(build_dir, f'bipolar_{name}.so')}")
    return torch.ops.bipolar_kernels


def load_ops():
    try:
        importlib.import_module("vllm_bipolar._C")
    except Exception:  # noqa: BLE001 - package __init__ may need vLLM: load the library directly
        torch.ops.load_library(sorted(glob.glob(os.path.join(ROOT, "vllm_bipolar", "_C*.so")))[0])
    return torch.ops.bipolar_kernels


def time_graph(calls, iters: int = 50, warmup: int = 5) -> float:
    """Median microseconds per call of a graph replaying `calls` (a list of thunks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copies_for(nbytes: int, l2_bytes: int) -> int:
    return max(2, math.ceil(4 * l2_bytes / nbytes))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--variant", default=None, help="JIT-build csrc/ under this name with --defines")
    ap.add_argument("--defines", default="")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fp16 only, fewer widths, no cuBLAS baseline")
    ap.add_argument("--ncu", action="store_true", help="eager calls only, for profiling")
    args = ap.parse_args()
    ops = build_variant(args.variant, args.defines) if args.variant else load_ops()
    if args.build_only:
        return
    if args.ncu:
        return profile_calls(ops, args.n, args.k, args.group_size)
    n, k, gs = args.n, args.k, args.group_size
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; N={n} K={k} group={gs}")
    words, groups = math.ceil(k / 32), (1 if gs == -1 else math.ceil(k / gs))

    rows = []
    for dtype in ((torch.float16,) if args.quick else (torch.float16, torch.bfloat16)):
        if not args.quick:  # fp16/bf16 baseline: torch.nn.functional.linear (cuBLAS)
            wbytes = n * k * 2
            ws = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(wbytes, l2))]
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                us = time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in ws * 2])
                rows.append((str(dtype).split(".")[-1], "torch linear", m, us, wbytes / us / 1e3))
            del ws
        widths = (1, 2, 4, 8) if args.quick else ((1, 2, 3, 4, 5, 8) if dtype == torch.float16 else (4,))
        for bits in widths:
            wbytes = bits * n * words * 4 + 2 * n * groups * 2
            layers = []
            for _ in range(copies_for(wbytes, l2)):
                q = torch.randint(-2**31, 2**31, (bits, n, words), device="cuda", dtype=torch.int32)
                s = (torch.rand(n, groups, device="cuda") * 0.01 + 0.001).to(dtype)
                z = (torch.randn(n, groups, device="cuda") * 0.01).to(dtype)
                layers.append((q, s, z))
            for m in ((1, 4) if args.quick else (1, 2, 4, 16)):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                us = time_graph([lambda q=q, s=s, z=z: ops.gemm_a16(x, q, s, z, k, gs) for q, s, z in layers * 2])
                rows.append((str(dtype).split(".")[-1], f"bipolar W{bits} g{gs}", m, us, wbytes / us / 1e3))
            del layers
    print(f"variant {args.variant or 'built'} {args.defines}")
    print(f"{'dtype':9} {'kernel':18} {'M':>3} {'us/call':>9} {'weight GB/s':>12}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:18} {r[2]:>3} {r[3]:>9.2f} {r[4]:>12.0f}")


def profile_calls(ops, n: int, k: int, gs: int):
    """One eager call per case (run under ncu, which replays each kernel with flushed caches)."""
    words, groups = math.ceil(k / 32), (1 if gs == -1 else math.ceil(k / gs))
    for bits, m in ((4, 1), (2, 1), (1, 1), (8, 1), (4, 4)):
        q = torch.randint(-2**31, 2**31, (bits, n, words), device="cuda", dtype=torch.int32)
        s = (torch.rand(n, groups, device="cuda") * 0.01 + 0.001).half()
        z = (torch.randn(n, groups, device="cuda") * 0.01).half()
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ops.gemm_a16(x, q, s, z, k, gs)
        torch.cuda.synchronize()
        print(f"profiled W{bits} M={m}")


if __name__ == "__main__":
    main()
