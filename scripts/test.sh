#!/usr/bin/env bash
# The test command: sets up the runtime if needed (idempotent), then lint + the whole suite
# (pure maths, in-process ComfyUI, a real headless ComfyUI server, and its frontend in headless Chromium).
# CPU only. scripts/setup_browser.sh installs Chromium (apt) and playwright if missing, or fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
bash scripts/setup_browser.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
