#!/usr/bin/env bash
# The browser test's Chromium: Debian's `chromium` package (Playwright drives it; no browser is
# downloaded from the internet). Idempotent: returns at once when /usr/bin/chromium exists.
# Fails loudly when it cannot install, so CI never skips the browser test silently.
set -euo pipefail
CHROMIUM="${SD3LORA_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "[setup_browser] $CHROMIUM not found and no apt-get: install Chromium and set SD3LORA_CHROMIUM to it" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "[setup_browser] need root (or sudo) to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
echo "[setup_browser] installing Debian's chromium for the browser test"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
[ -x "$CHROMIUM" ] || { echo "[setup_browser] chromium installed but $CHROMIUM is missing" >&2; exit 1; }
