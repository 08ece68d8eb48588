"""A few eager calls of the bipolar ops on one shape, for ncu / compute-sanitizer on the GPU machine.

    ncu --section SpeedOfLight -k regex:gemm_a16 python benchmarks/profile_kernels.py --m 1 --bits 4
    compute-sanitizer --tool memcheck python benchmarks/profile_kernels.py --m 17 --bits 3 --n 77 --k 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vllm_bipolar.format as fmt  # noqa: E402
from vllm_bipolar import ops  # noqa: E402
from vllm_bipolar.kernels import a16_layout  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--n", type=int, default=11008)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=16)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    w = torch.randn(args.n, args.k, device="cuda") * 0.02
    q = fmt.quantize_weight(w, args.bits, group_size=args.group_size, symmetric=False, dtype=dtype)
    qweight = fmt.pack_codes(q.codes, args.bits)
    x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
    if args.a_bits == 16:
        qw, sc, shift = a16_layout.repack(qweight, q.scales, q.zeros, args.k, args.group_size)
        fn = lambda: ops.linear_a16_cuda(x, qw, sc, args.n, args.k, shift)  # noqa: E731
    else:
        from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights

        sz, cb = prepare_binary_weights(qweight, q.scales, q.zeros, args.k, args.group_size, args.a_bits)
        fn = lambda: ops.linear_binary_cuda(x, qweight, sz, cb, args.k, args.group_size, args.a_bits)  # noqa: E731
    for _ in range(args.calls):
        y = fn()
    torch.cuda.synchronize()
    print("ok", tuple(y.shape), float(y.float().abs().mean()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
