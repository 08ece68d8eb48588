#!/usr/bin/env bash
# Compile csrc/ into object files on a machine without a GPU, against the headers of the exact torch wheel
# the GPU machine runs, so that a GPU machine only links them (seconds, with g++) instead of building the
# extension with nvcc (minutes). For GPU machines that are lent by the minute.
#
#   bash scripts/prebuild_objects.sh [OUT.tar.xz]        # default .gpu/objs.tar.xz
#
# Environment: TORCH_WHEEL_SPEC (default torch==2.11.0: the GPU machine's 2.11.0+cu130), PY_VERSION (default
# 3.12, the GPU machine's Python: its headers must be installed here, e.g. by pyenv; PY_INCLUDE overrides the
# path), ARCH (default 90a), NVCC (default nvcc), JOBS (default nproc). The flags are setup.py's (C++17 for
# torch < 2.13, -O3 -lineinfo, torch's half / bfloat16 defines). On the GPU machine:
#   bash scripts/link_prebuilt.sh OUT.tar.xz   # writes vllm_bipolar/_C.<python tag>.so next to the sources
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/.gpu/objs.tar.xz}")"
SPEC="${TORCH_WHEEL_SPEC:-torch==2.11.0}"
PYV="${PY_VERSION:-3.12}"
ARCH="${ARCH:-90a}"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-$(nproc)}"
WORK="$(mktemp -d /tmp/bipolar-prebuild.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

python3 -m pip download --quiet --no-deps --only-binary=:all: "$SPEC" -d "$WORK/wheel" \
    --python-version "$PYV" --platform manylinux_2_28_x86_64
wheel="$(ls "$WORK"/wheel/torch-*.whl)"
(cd "$WORK" && python3 -m zipfile -e "$wheel" unpacked >/dev/null)
T="$WORK/unpacked/torch"
version="$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$T/version.py")"
PY_INCLUDE="${PY_INCLUDE:-$(ls -d /root/.pyenv/versions/"$PYV"*/include/python"$PYV" 2>/dev/null | head -1)}"
[[ -f "$PY_INCLUDE/Python.h" ]] || { echo "prebuild: no Python $PYV headers (set PY_INCLUDE)" >&2; exit 2; }
major_minor="$(echo "$version" | sed 's/^\([0-9]*\)\.\([0-9]*\).*/\1 \2/')"
read -r tmaj tmin <<<"$major_minor"
STD=-std=c++17; (( tmaj > 2 || (tmaj == 2 && tmin >= 13) )) && STD=-std=c++20
export INCLUDES="-I $ROOT/csrc -isystem $T/include -isystem $T/include/torch/csrc/api/include -isystem $PY_INCLUDE"
export DEFINES="-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1"
export NVFLAGS="-O3 $STD -lineinfo --expt-relaxed-constexpr -Xptxas=-warn-spills -D__CUDA_NO_HALF_OPERATORS__ \
-D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
--compiler-options -fPIC -gencode=arch=compute_$ARCH,code=sm_$ARCH"
export NVCC OBJ="$WORK/obj"; mkdir -p "$OBJ"
echo "prebuild: csrc/ for sm_$ARCH against torch $version, Python $PYV headers, $JOBS jobs"
ls "$ROOT"/csrc/*.cu | xargs -n 1 -P "$JOBS" bash -c \
    'n=$(basename "$0" .cu); $NVCC -c "$0" -o "$OBJ/$n.o" $NVFLAGS $INCLUDES $DEFINES > "$OBJ/$n.log" 2>&1 \
     || { cat "$OBJ/$n.log"; echo "prebuild: FAILED csrc/$n.cu" >&2; exit 255; }'
for src in "$ROOT"/csrc/*.cpp; do
  g++ -c "$src" -o "$OBJ/$(basename "$src" .cpp).o" -O3 "$STD" -fPIC $INCLUDES $DEFINES
done
echo "torch $version sm_$ARCH python $PYV $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$OBJ/PREBUILT"
mkdir -p "$(dirname "$OUT")"
tar -C "$OBJ" -cf - $(cd "$OBJ" && ls *.o PREBUILT) | xz -T"$JOBS" -3 > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "prebuild: wrote $OUT ($(du -h "$OUT" | cut -f1)); link it on the GPU machine with scripts/link_prebuilt.sh"
