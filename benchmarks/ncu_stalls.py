"""Warp-stall summary of one kernel from an Nsight Compute report's SASS source page.

    ncu --set full --import-source no -k regex:gemm_mid --launch-skip 2 --launch-count 1 -o /tmp/r \
        python3 benchmarks/profile_kernels.py --m 64 --bits 4 --n 11008 --k 4096
    ncu -i /tmp/r.ncu-rep --page source --csv --print-source sass > /tmp/src.csv
    python3 benchmarks/ncu_stalls.py /tmp/src.csv [--top 25]

Prints the stall reasons' share of all warp-state samples, the instructions with the most samples
(with their two largest reasons) and the global loads ncu counts excessive sectors for: where the
warps of a kernel wait, per instruction (benchmarks/results/kernels_mid_variants_h100.txt and
ncu_gemv_m1_h100.txt were read this way).
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def as_int(v: str) -> int:
    try:
        return int(v.replace(",", ""))
    except ValueError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=25, help="instructions to list")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    # the first line names the kernel; the header follows
    start = next((i for i, r in enumerate(rows) if SAMPLES in r), None)
    if start is None:
        sys.exit(f"{args.csv}: no '{SAMPLES}' column (not an ncu source page with SASS?)")
    hdr, data = rows[start], rows[start + 1:]
    ix = {h: i for i, h in enumerate(hdr)}
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    for r in data:
        for s in stalls:
            total[s] += as_int(r[ix[s]])
    samples = sum(as_int(r[ix[SAMPLES]]) for r in data) or 1
    print("total samples", samples)
    for s, v in total.most_common(10):
        print(f"{s:28s} {v:7d} {100 * v / samples:5.1f}%")
    for r in sorted(data, key=lambda r: -as_int(r[ix[SAMPLES]]))[: args.top]:
        top2 = sorted(((as_int(r[ix[s]]), s) for s in stalls), reverse=True)[:2]
        print(r[ix["Address"]][-5:], r[ix[SAMPLES]].rjust(5), r[ix["Instructions Executed"]].rjust(7),
              r[ix["Source"]].strip()[:60].ljust(60), top2)
    col = "L2 Theoretical Sectors Global Excessive"
    if col in ix:
        print("--- excessive global sectors")
        for r in data:
            if as_int(r[ix[col]]):
                print(r[ix["Source"]].strip()[:70], r[ix[col]], r[ix["L2 Theoretical Sectors Global"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
