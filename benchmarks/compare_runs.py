"""Side-by-side table of several benchmarks/kernels.py result files: one row per (M, N, K, w_bits, a_bits,
group_size), one column of median microseconds per file (a tuning sweep: one file per setting).

    python benchmarks/compare_runs.py build/sweep/pf0.json build/sweep/pf8.json [--best-by M=1]

--best-by M=1: also print the file with the least total time over the rows with that M (the setting to
keep), as the last line "best: FILE".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEY = ("M", "N", "K", "w_bits", "a_bits", "group_size")


def load(path: str) -> dict[tuple, float]:
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "us" in r for r in rows):
        raise ValueError("not a kernels.py result file (a list of rows with 'us'); *.kernels.json are kernel names")
    return {tuple(r[k] for k in KEY): r["us"] for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="kernels.py JSON files")
    ap.add_argument("--best-by", default=None, metavar="M=VALUE", help="pick the file with the least total time at this M")
    args = ap.parse_args(argv)
    runs = {}
    for f in args.files:
        try:
            runs[f] = load(f)
        except (OSError, ValueError, KeyError) as exc:
            print(f"skipping {f}: {exc}", file=sys.stderr)
    if not runs:
        print("no readable result files", file=sys.stderr)
        return 1
    names = [Path(f).stem for f in runs]
    keys = sorted(set().union(*(r.keys() for r in runs.values())))
    print(f"{'M':>5} {'N':>6} {'K':>6} {'W':>2} {'A':>2} {'g':>4} | " + " ".join(f"{n:>9}" for n in names))
    for key in keys:
        cells = " ".join(f"{runs[f][key]:9.2f}" if key in runs[f] else f"{'-':>9}" for f in runs)
        print(f"{key[0]:5d} {key[1]:6d} {key[2]:6d} {key[3]:2d} {key[4]:2d} {key[5]:4d} | {cells}")
    if args.best_by:
        m = int(args.best_by.split("=", 1)[1])
        common = [k for k in keys if k[0] == m and all(k in r for r in runs.values())]
        if not common:
            print(f"no rows with M={m} in every file", file=sys.stderr)
            return 1
        totals = {f: sum(r[k] for k in common) for f, r in runs.items()}
        best = min(totals, key=totals.get)
        print("totals at M=%d: " % m + ", ".join(f"{Path(f).stem} {t:.1f}" for f, t in totals.items()))
        print(f"best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
