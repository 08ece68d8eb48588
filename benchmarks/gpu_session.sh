#!/usr/bin/env bash
# One call on the GPU machine: build the extension, run GPU tests, benchmarks and the SASS census.
#
#   bash benchmarks/gpu_session.sh [--tests "tests/test_cuda_kernels.py ..."] [--bench "ARGS"] [--sass] [--vllm]
#
# --vllm: install this package (editable, no rebuild) into the python that runs vLLM, so that vLLM
# finds the plugin's entry point (run `source .gpu/device-vllm.sh activate 4` first; see
# ../shared/gpu/README.md). `python3 -m pip`, not `pip`: a bare pip may belong to another Python,
# and vLLM then reports "Unknown quantization method: bipolar".
#
# Results go to $OUT (the device tool brings that folder back) and benchmarks/results/.
# The GPU machine's copy of the tree may carry a stale .git: the benchmarks record BIPOLAR_COMMIT, taken
# here from .gpu/commit when set (write it before the call, `git rev-parse --short HEAD > .gpu/commit`,
# and carry it).
# `unset CC CXX`: the extension must be built by the compiler torch was built with (see README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bipolar-out}"; mkdir -p "$OUT"
TESTS=""; BENCH=""; SASS=0; VLLM=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tests) TESTS="$2"; shift 2 ;;
    --bench) BENCH="$2"; shift 2 ;;
    --sass) SASS=1; shift ;;
    --vllm) VLLM=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
unset CC CXX
if [[ -z "${BIPOLAR_COMMIT:-}" && -s .gpu/commit ]]; then export BIPOLAR_COMMIT="$(cat .gpu/commit)"; fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=16 python3 setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | head -20
if [[ $VLLM -eq 1 ]]; then
  VLLM_BIPOLAR_SKIP_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1 \
    || { tail -5 "$OUT/pip.log"; exit 1; }
  python3 -c "from importlib.metadata import entry_points as e; print('entry points:', [x.value for x in e(group='vllm.general_plugins')])"
fi
if [[ -n "$TESTS" ]]; then
  # shellcheck disable=SC2086
  python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ -n "$BENCH" ]]; then
  # shellcheck disable=SC2086
  python3 benchmarks/kernels.py $BENCH 2>&1 | tee "$OUT/bench.log"
  cp benchmarks/results/kernels_*.json "$OUT/" 2>/dev/null
fi
if [[ $SASS -eq 1 ]]; then
  so=$(ls vllm_bipolar/_C*.so | head -1)
  {
    echo "# SASS census of $so (cuobjdump --dump-sass), tensor-core instructions per kernel family"
    for fam in gemv_a16_kernel gemm_mid_a16_kernel dequantize_a16_kernel gemm_binary quantize_activations; do
      cuobjdump --dump-sass "$so" | awk -v f="$fam" '/Function :/ {keep = index($0, f) > 0} keep' >"$OUT/sass_$fam.txt"
      printf '%-24s' "$fam"
      for ins in HGMMA BGMMA IGMMA HMMA BMMA IMMA LDSM LOP3 PRMT; do
        printf ' %s=%s' "$ins" "$(grep -c "$ins" "$OUT/sass_$fam.txt")"
      done
      echo
    done
  } | tee "$OUT/sass_census.txt"
  rm -f "$OUT"/sass_*_kernel.txt "$OUT"/sass_gemm_binary.txt "$OUT"/sass_quantize_activations.txt
fi
