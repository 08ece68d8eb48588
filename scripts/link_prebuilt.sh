#!/usr/bin/env bash
# Link the objects of scripts/prebuild_objects.sh into vllm_bipolar/_C on the GPU machine (g++, seconds):
#   bash scripts/link_prebuilt.sh .gpu/objs.tar.xz
# Refuses objects built against another torch version than the one installed here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="$(realpath "${1:?usage: link_prebuilt.sh OBJS.tar.xz}")"
WORK="$(mktemp -d /tmp/bipolar-link.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
tar -xJf "$ARCHIVE" -C "$WORK"
read -r TORCH_INFO < "$WORK/PREBUILT"
installed="$(python3 -c 'import torch; print(torch.__version__)')"
built="$(echo "$TORCH_INFO" | awk '{print $2}')"
[[ "$built" == "$installed" ]] || { echo "link_prebuilt: objects are for torch $built, this machine has $installed" >&2; exit 2; }
TL="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
SUFFIX="$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
g++ -shared "$WORK"/*.o -o "$ROOT/vllm_bipolar/_C$SUFFIX" -L "$TL" -lc10 -ltorch -ltorch_cpu -lc10_cuda -ltorch_cuda \
    -L "$CUDA_HOME/lib64" -lcudart
echo "link_prebuilt: vllm_bipolar/_C$SUFFIX from $TORCH_INFO"
