#!/usr/bin/env bash
# Debian's prometheus package for the tests only (the main job does not need it): promtool checks the
# alert rules and a real Prometheus scrapes the service in tests/test_metrics_scrape.py. Without root
# or apt-get it does nothing, and those tests skip with a reason.
set -euo pipefail
# Only the binaries are wanted: a temporary policy-rc.d keeps the package from starting its system service.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[bootstrap-prometheus] apt-get install prometheus (promtool)" >&2
  rc_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    rc_policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$rc_policy" && chmod +x "$rc_policy"
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >&2 \
    || echo "[bootstrap-prometheus] install failed; the tests that need it will skip" >&2
  [ -z "$rc_policy" ] || rm -f "$rc_policy"
fi
