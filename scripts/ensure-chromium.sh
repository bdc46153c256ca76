#!/usr/bin/env bash
# The review-page test renders HTML in headless Chromium (Debian package `chromium`). Install it once if missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }) \
    || echo "ensure-chromium: could not install chromium; the review-page test will be skipped" >&2
else
  echo "ensure-chromium: chromium missing and not root; the review-page test will be skipped" >&2
fi
