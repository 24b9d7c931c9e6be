#!/usr/bin/env bash
# Set up and run the main job on the embedded default model (SmolLM2-135M).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/kvbm-codec" demo "$@"
