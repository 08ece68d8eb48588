#!/usr/bin/env bash
# Compile check of csrc/ for CI machines without a GPU (a CPU-only torch wheel is enough).
#
#   .ci/nvcc_check.sh                      # uses python3's torch
#   PYTHON=.venv/bin/python NVCC=/usr/local/cuda/bin/nvcc .ci/nvcc_check.sh
#
# What it does, with the torch headers of ${PYTHON:-python3} (torch/include and
# torch/include/torch/csrc/api/include) and that Python's include dir:
#   1. nvcc -c every csrc/*.cu for sm_90a and sm_80 (real -gencode targets, so ptxas runs too);
#   2. g++ -c csrc/torch_bindings.cpp (and every other csrc/*.cpp);
#   3. builds and runs every csrc/tests/*.cu as a host-only self-test (none at present).
# Objects go to a temporary directory that is removed on exit. Exit status: non-zero on any error.
#
# CPU-only torch wheels ship the c10/cuda and ATen/cuda headers, except one generated file,
# c10/cuda/impl/cuda_cmake_macros.h (included by c10/cuda/CUDAMacros.h). When it is missing, this
# script writes the one line a CUDA wheel has there (#define C10_CUDA_BUILD_SHARED_LIBS) into an
# include dir of its own. ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE headers, which a bare
# toolkit lacks: the kernels include only c10/cuda headers, so nothing else is needed.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/bipolar-nvcc-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

command -v "$NVCC" >/dev/null || { echo "nvcc_check: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 2; }
read -r TORCH_VERSION TORCH_INC PY_INC CXX11_ABI < <("$PYTHON" - <<'PY'
import os, sysconfig, torch
inc = os.path.join(os.path.dirname(torch.__file__), "include")
print(torch.__version__, inc, sysconfig.get_paths()["include"], int(torch._C._GLIBCXX_USE_CXX11_ABI))
PY
) || { echo "nvcc_check: cannot import torch with $PYTHON" >&2; exit 2; }
[[ -f "$PY_INC/Python.h" ]] || { echo "nvcc_check: Python.h not found in $PY_INC (install the python dev headers)" >&2; exit 2; }

# Same rule as setup.py: C++20 where torch requires it of extensions (>= 2.13), else C++17.
STD=-std=c++17
"$PYTHON" -c "import re,sys,torch; m=re.match(r'(\d+)\.(\d+)', torch.__version__); sys.exit(0 if (int(m[1]),int(m[2]))>=(2,13) else 1)" && STD=-std=c++20

echo "nvcc_check: torch $TORCH_VERSION ($TORCH_INC), $("$NVCC" --version | tail -1), $STD"
echo "nvcc_check: CUDA headers in this torch wheel:"
STUB_INC=()
for h in ATen/cuda/CUDAContext.h c10/cuda/CUDAStream.h c10/cuda/CUDAGuard.h c10/cuda/CUDAException.h \
         c10/cuda/impl/cuda_cmake_macros.h; do
  if [[ -f "$TORCH_INC/$h" ]]; then echo "  present  $h"; else echo "  MISSING  $h"; fi
done
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$TMP/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  STUB_INC=(-I "$TMP/stub")
  echo "  (using a generated c10/cuda/impl/cuda_cmake_macros.h: #define C10_CUDA_BUILD_SHARED_LIBS)"
fi

INCLUDES=("${STUB_INC[@]}" -I "$ROOT/csrc" -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$PY_INC")
DEFINES=(-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI")
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS, as the real build passes them
NVCC_FLAGS=(-O3 "$STD" -lineinfo --expt-relaxed-constexpr -Xptxas=-warn-spills
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler=-fPIC
            -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 --threads 2)

status=0
shopt -s nullglob
# The .cu files compile in parallel (JOBS, default: number of CPUs); each logs to its own file.
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
export NVCC TMP
export NVCC_ARGS="$(printf '%q ' "${NVCC_FLAGS[@]}" "${INCLUDES[@]}" "${DEFINES[@]}")"
compile_cu() {
  local src="$1" name; name="$(basename "$1")"
  if eval "\"\$NVCC\" -c \"\$src\" -o \"\$TMP/\$name.o\" $NVCC_ARGS" >"$TMP/$name.log" 2>&1; then
    echo "nvcc_check: ok     csrc/$name [sm_90a, sm_80]"
  else
    echo "nvcc_check: FAILED csrc/$name"; return 1
  fi
}
export -f compile_cu
cu_files=("$ROOT"/csrc/*.cu)
echo "nvcc_check: nvcc -c ${#cu_files[@]} files of csrc/*.cu, $JOBS at a time"
if ! printf '%s\0' "${cu_files[@]}" | xargs -0 -n 1 -P "$JOBS" bash -c 'compile_cu "$1"' _; then status=1; fi
for src in "${cu_files[@]}"; do  # compiler messages (warnings too), file by file
  log="$TMP/$(basename "$src").log"
  if [[ -s "$log" ]]; then echo "---- csrc/$(basename "$src"):"; grep -v "AutogradState.h\|bool .*_ : 1 = \|^ *\^\$\|Remark: The warnings\|^\$" "$log" || true; fi
done
CXX="${CXX:-g++}"
for src in "$ROOT"/csrc/*.cpp; do
  obj="$TMP/$(basename "$src").o"
  echo "nvcc_check: $CXX -c csrc/$(basename "$src")"
  if ! "$CXX" -c "$src" -o "$obj" -O2 "$STD" -fPIC "${INCLUDES[@]}" "${DEFINES[@]}"; then
    echo "nvcc_check: FAILED csrc/$(basename "$src")" >&2; status=1
  fi
done
for src in "$ROOT"/csrc/tests/*.cu; do
  exe="$TMP/$(basename "$src" .cu)"
  echo "nvcc_check: nvcc csrc/tests/$(basename "$src") (host program) and run it"
  if ! { "$NVCC" -O2 "$STD" -o "$exe" "$src" && "$exe"; }; then
    echo "nvcc_check: FAILED csrc/tests/$(basename "$src")" >&2; status=1
  fi
done

if [[ $status -eq 0 ]]; then echo "nvcc_check: all of csrc/ compiled"; else echo "nvcc_check: errors above" >&2; fi
exit $status
