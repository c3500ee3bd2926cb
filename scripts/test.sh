#!/usr/bin/env bash
# The test command: sets up the runtime if needed (idempotent), then lint + the whole suite
# (pure maths, in-process ComfyUI, and a real headless ComfyUI server). CPU only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
