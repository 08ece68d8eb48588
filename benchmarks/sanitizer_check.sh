#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over a few odd shapes of every kernel family, on the GPU machine,
# after the extension is built (benchmarks/gpu_session.sh). Prints one summary line per (tool, shape) and
# exits non-zero when any run reports an error or a hazard.
#
#   bash benchmarks/sanitizer_check.sh > benchmarks/results/sanitizer_<gpu>.txt
#   bash benchmarks/sanitizer_check.sh a-bits     # only the shapes whose arguments contain "a-bits"
#
# Shapes: decode (M <= 16; K = 8192 runs the 32-warp CTA), mid-M and dequantize + cuBLAS (M > 128)
# weight-only kernels; the binary WpAq kernel with group 128 (k128 MMAs) and per-row groups (k256), its
# staged-copy fallback (W5A8) and bf16.
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPES=(
  "--m 1 --bits 4 --n 200 --k 576"
  "--m 1 --bits 2 --n 1553 --k 8192"
  "--m 17 --bits 3 --n 77 --k 1000 --group-size 32"
  "--m 40 --bits 8 --n 1553 --k 96 --group-size -1 --dtype bfloat16"
  "--m 300 --bits 2 --n 100 --k 4096"
  "--m 255 --bits 5 --n 1553 --k 1536 --group-size 256"
  "--m 300 --bits 1 --a-bits 1 --n 300 --k 1024"
  "--m 77 --bits 2 --a-bits 2 --n 1553 --k 4096 --group-size -1"
  "--m 33 --bits 2 --a-bits 4 --n 100 --k 1024"
  "--m 17 --bits 5 --a-bits 8 --n 200 --k 2048 --dtype bfloat16"
  "--m 130 --bits 4 --a-bits 4 --n 136 --k 1536 --group-size 256"
)
fail=0
for shape in "${SHAPES[@]}"; do
  [[ -z "${1:-}" || "$shape" == *"$1"* ]] || continue
  for tool in memcheck racecheck; do
    # shellcheck disable=SC2086
    log=$(compute-sanitizer --tool "$tool" python3 benchmarks/profile_kernels.py $shape --calls 1 2>&1)
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" <<<"$log" | tail -1)
    [[ -n "$summary" ]] || summary="no summary: $(tail -3 <<<"$log" | tr '\n' ' ')"
    echo "$tool $shape: $summary"
    grep -qE "SUMMARY: 0 (errors|hazards)" <<<"$summary" || fail=1
  done
done
exit $fail
