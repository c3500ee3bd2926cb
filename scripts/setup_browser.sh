#!/usr/bin/env bash
# What the browser test (tests/test_browser.py) needs, installed only when missing:
#  - Chromium from the system's packages (Debian: apt-get install chromium) — no browser download;
#  - the Playwright Python package in .venv (it drives that Chromium through executable_path).
# Fails (exit 1) when Chromium cannot be installed: the browser test must not be skipped silently.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
export PIP_DISABLE_PIP_VERSION_CHECK=1

chromium_bin() { command -v chromium || command -v chromium-browser || true; }
if [ -z "${GLANCE_CHROMIUM:-}" ] && [ -z "$(chromium_bin)" ]; then
  echo "[setup-browser] installing chromium (apt)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && SUDO="sudo -n" || { echo "[setup-browser] ERROR: not root and no sudo: install chromium yourself" >&2; exit 1; }
  fi
  if ! { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q chromium >/dev/null; }; then
    echo "[setup-browser] ERROR: apt-get install chromium failed; the browser test needs it" >&2
    exit 1
  fi
  [ -n "$(chromium_bin)" ] || { echo "[setup-browser] ERROR: chromium installed but not on PATH" >&2; exit 1; }
fi

if ! "$VENV/bin/python" -c "import playwright.sync_api" 2>/dev/null; then
  echo "[setup-browser] installing playwright into $VENV (the Python driver only; no browser download)"
  "$VENV/bin/python" -m pip install -q "playwright>=1.50" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
echo "[setup-browser] ready: $("${GLANCE_CHROMIUM:-$(chromium_bin)}" --version 2>/dev/null | head -1), playwright $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
