#!/usr/bin/env bash
# Set up (if needed) and run the test suite. GPU tests skip with a reason when CUDA is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
# The vLLM (CPU) environment for the real-engine tests (tests/test_vllm_engine.py): ~4 minutes once.
"$root/scripts/bootstrap-vllm.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -ra "$@"
