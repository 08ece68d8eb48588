#!/usr/bin/env bash
# One session on a GPU machine (H100/H200): build for sm_90a, SASS summary, the GPU tests, timings
# of the built kernels and of tuning variants (JIT builds with -D knobs, see bipolar_gemm_a16.cuh,
# each also run through a subset of the tests), and an Nsight Compute summary. Logs go to $OUT.
#   bash csrc/tests/gpu_session.sh [--no-variants] [--no-ncu]
set -u
OUT="${OUT:-/tmp/bipolar-gpu-session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
VARIANTS=1; NCU=1
for a in "$@"; do case "$a" in --no-variants) VARIANTS=0 ;; --no-ncu) NCU=0 ;; esac; done

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cxx11abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
echo "CC=${CC:-} CXX=${CXX:-}; compiler default: $(echo '#include <string>' | ${CXX:-g++} -x c++ -dM -E - 2>/dev/null | grep -o '_GLIBCXX_USE_CXX11_ABI [01]')"
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/pytest-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

echo "== build (sm_90a)"
if ! TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED after $(elapsed)s"; exit 1
fi
grep -i "warning\|spill" "$OUT/build.log" | grep -v "AutogradState\|bit-field" | head -10
echo "built in $(elapsed)s: $(ls vllm_bipolar/_C*.so)"
cuobjdump --dump-sass vllm_bipolar/_C*.so >/tmp/sass.txt && gzip -c /tmp/sass.txt >"$OUT/sass.txt.gz"
echo "SASS: LOP3 $(grep -c LOP3 /tmp/sass.txt), PRMT $(grep -c PRMT /tmp/sass.txt), FFMA $(grep -c FFMA /tmp/sass.txt), LDL/STL $(grep -c 'LDL\|STL' /tmp/sass.txt)"

VARS=(rows4 rows1 regs32)
declare -A DEFS=([rows4]="-DBIPOLAR_A16_ROWS_SMALL_M=4" [rows1]="-DBIPOLAR_A16_ROWS_SMALL_M=1"
                 [regs32]="-DBIPOLAR_A16_PLANE_REGS=32")
if [[ $VARIANTS == 1 ]]; then
  ( for v in "${VARS[@]}"; do
      MAX_JOBS=6 python3 csrc/tests/bench_gemm_a16.py --variant "$v" "--defines=${DEFS[$v]}" --build-only \
        && echo "variant $v built at $(elapsed)s" || echo "variant $v FAILED"
    done ) >"$OUT/variants_build.log" 2>&1 &
  BG=$!
fi

echo "== tests"
timeout 240 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda_kernels.py >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? at $(elapsed)s"; tail -15 "$OUT/pytest.log"
if grep -q "FAILED.*argument_checks" "$OUT/pytest.log" && command -v cuda-gdb >/dev/null; then
  # the argument checks run in a child process; rerun them under cuda-gdb for a native backtrace
  timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 -c "import sys; sys.path.insert(0, 'tests'); \
import test_cuda_kernels as t; print(t.run_argument_checks())" >"$OUT/gdb_bt.txt" 2>&1
  grep -E "^#|signal" "$OUT/gdb_bt.txt" | cut -c1-200 | head -12
fi

echo "== timings (built extension)"
python3 csrc/tests/bench_gemm_a16.py 2>&1 | tee "$OUT/bench.log"

if [[ $VARIANTS == 1 ]]; then
  wait $BG; grep -v "^$" "$OUT/variants_build.log" | grep -i "built\|failed\|error" | head -8
  for v in "${VARS[@]}"; do
    lib=/tmp/bipolar_$v/bipolar_$v.so
    [[ -f $lib ]] || continue
    if (( $(elapsed) > 420 )); then echo "skipping variant $v (time)"; continue; fi
    python3 csrc/tests/bench_gemm_a16.py --quick --variant "$v" "--defines=${DEFS[$v]}" 2>&1 | tee -a "$OUT/variants.log" | tail -10
    BIPOLAR_TEST_LIB=$lib timeout 60 python3 -m pytest -q --noconftest -p no:cacheprovider \
      -k "exact or padding or unaligned or strided or graph" tests/test_cuda_kernels.py 2>&1 | tail -1 | sed "s/^/variant $v tests: /"
  done
fi

if [[ $NCU == 1 ]] && (( $(elapsed) < 440 )) && command -v ncu >/dev/null; then
  echo "== ncu"
  timeout 50 ncu --kernel-name regex:gemm_a16_kernel --launch-count 5 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    python3 csrc/tests/bench_gemm_a16.py --ncu >"$OUT/ncu.txt" 2>&1
  grep -E "gemm_a16_kernel|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Issued Warp|Compute \(SM\) Throughput" "$OUT/ncu.txt" | sed 's/(const T1.*bool)//' | head -40
fi
echo "done in $(elapsed)s"
