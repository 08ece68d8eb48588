#!/usr/bin/env bash
# Run the test suite (installs .venv first if needed). Extra arguments go to pytest.
#   bash scripts/test.sh [-k PATTERN] [-x]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" exec "$ROOT/.venv/bin/python" -m pytest -q tests "$@"
