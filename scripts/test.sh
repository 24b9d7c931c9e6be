#!/usr/bin/env bash
# Set up (if needed) and run the test suite. GPU tests skip with a reason when CUDA is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -ra "$@"
