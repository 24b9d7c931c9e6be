#!/usr/bin/env bash
# Set up and run the main job on the embedded default model (SmolLM2-135M).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
# `./scripts/demo.sh --engine vllm` runs the main job with a real vLLM engine: it needs .venv-vllm/.
case " $* " in *" --engine vllm "*|*" --engine=vllm "*) "$root/scripts/bootstrap-vllm.sh" ;; esac
exec "$root/.venv/bin/kvbm-codec" demo "$@"
