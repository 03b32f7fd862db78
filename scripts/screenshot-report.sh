#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a full-page PNG beside it.
#   scripts/screenshot-report.sh runs/demo        -> runs/demo/report.png
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
run="${1:?usage: $0 RUN_DIR}"
html="$(cd "$run" && pwd)/report.html"
[ -f "$html" ] || { echo "$html: no report (run llama2 run first)" >&2; exit 1; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1100,"${HEIGHT:-6000}" --screenshot="$run/report.png" "file://$html" 2>/dev/null
echo "$run/report.png"
