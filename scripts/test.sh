#!/usr/bin/env bash
# Set up (if needed) and run the test suite. GPU tests skip with a reason when CUDA is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
# Debian's prometheus (promtool, a real scrape) for the metrics and alert-rule tests; the demo does not need it.
"$root/scripts/bootstrap-prometheus.sh"
# The vLLM (CPU) environment for the real-engine tests (tests/test_vllm_engine.py): ~4 minutes once.
"$root/scripts/bootstrap-vllm.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -ra "$@"
