"""CPU timings of the pure-torch backend (``bipolar::linear``: dequantize the bit planes per call, then one
matmul), the path vLLM's CPU backend runs, against torch's matmul on the unquantized weight.

    python benchmarks/torch_path.py [--shapes 1536x576 576x1536] [--m 1 16 128] [--bits 1 2 4 8]
                                    [--group-size 128] [--threads 2] [--out benchmarks/results/torch_path_cpu.json]

Prints a table and writes a list of rows with the keys of benchmarks/kernels.py (``M, N, K, w_bits,
a_bits, group_size, us``; so ``compare_runs.py`` reads them) plus ``dequantize_us`` (the per-call
dequantization alone), ``bf16_us`` (``torch.nn.functional.linear`` on the bf16 weight), ``device``,
``threads``, ``commit`` and ``command``. Medians of ``--iters`` calls. Default shapes: SmolLM2-135M's
(hidden 576, MLP 1536) and one Llama-7B-like 4096 x 4096.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vllm_bipolar.format as fmt  # noqa: E402
from vllm_bipolar.format.reference import bipolar_linear, dequantize_packed  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from kernels import git_commit  # noqa: E402


def run_meta(argv: list[str] | None) -> tuple[str, str, str]:
    """(device, commit, command) recorded beside CPU results."""
    device = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return device, git_commit(), " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))


def write_rows(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


def median_us(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536", "4096x4096"], help="NxK")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 128], help="tokens per call")
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4, 8], help="weight bits (a_bits 16)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "torch_path_cpu.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    device, commit, command = run_meta(argv)
    print(f"# {device}, torch {torch.__version__}, commit {commit}")
    print(f"{'M':>5} {'N':>6} {'K':>6} {'W':>2} {'bipolar us':>11} {'dequant us':>11} {'bf16 us':>9} {'x bf16':>7}")
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k) * 0.02
        w_bf16 = w.to(dtype)
        for bits in args.bits:
            q = fmt.quantize_weight(w, bits, group_size=args.group_size, symmetric=False, dtype=dtype)
            qweight = fmt.pack_codes(q.codes, bits)
            deq = median_us(lambda: dequantize_packed(qweight, q.scales, q.zeros, k, args.group_size, dtype), args.iters)
            for m in args.m:
                x = torch.randn(m, k, dtype=dtype)
                us = median_us(lambda: bipolar_linear(x, qweight, q.scales, q.zeros, None, k, args.group_size, 16),
                               args.iters)
                ref = median_us(lambda: torch.nn.functional.linear(x, w_bf16), args.iters)
                print(f"{m:5d} {n:6d} {k:6d} {bits:2d} {us:11.1f} {deq:11.1f} {ref:9.1f} {ref / us:6.2f}x")
                rows.append({"M": m, "N": n, "K": k, "w_bits": bits, "a_bits": 16, "group_size": args.group_size,
                             "us": us, "dequantize_us": deq, "bf16_us": ref, "device": device,
                             "threads": torch.get_num_threads(), "commit": commit, "command": command})
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
