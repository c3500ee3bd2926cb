#!/usr/bin/env bash
# The main job: sets up the runtime if needed (idempotent), starts a real headless ComfyUI with
# the pack, runs the shipped workflows and writes images, a side-by-side sheet and a report.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
.venv/bin/python -m devtools.demo "$@"
