#!/usr/bin/env bash
# The test command: sets up the runtimes if needed (idempotent), then lint + the whole suite on each
# ComfyUI runtime the machine has (CPU only):
#   - ComfyUI 0.3.75 (.comfyui/, or $COMFYUI_PATH): pure maths, in-process ComfyUI, a real headless server,
#     and its frontend in headless Chromium (scripts/setup_browser.sh installs Chromium + playwright or fails);
#   - ComfyUI 0.33.0 (.comfyui-0.33/), when its source archive ../shared/runtimes/comfyui-0.33.0.tar.gz is
#     present (CI has it): the same suite without the browser test.
# Arguments go to pytest (both runs). GLANCE_RUNTIMES="0.3.75" or "0.33" runs one runtime only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARBALL=${GLANCE_COMFYUI_033_TARBALL:-$ROOT/../shared/runtimes/comfyui-0.33.0.tar.gz}
RUNTIMES=${GLANCE_RUNTIMES:-0.3.75 0.33}

for rt in $RUNTIMES; do
  case "$rt" in
    0.3.75)
      bash scripts/setup.sh
      bash scripts/setup_browser.sh
      .venv/bin/ruff check .
      echo "[test] ComfyUI 0.3.75"
      .venv/bin/python -m pytest "$@"
      ;;
    0.33)
      if [ ! -f "$TARBALL" ]; then
        echo "[test] ComfyUI 0.33.0: skipped ($TARBALL not found; CI has it)"
        continue
      fi
      bash scripts/setup.sh 0.33
      echo "[test] ComfyUI 0.33.0"
      rc=0
      COMFYUI_PATH=$ROOT/.comfyui-0.33 .venv-0.33/bin/python -m pytest --ignore=tests/test_browser.py "$@" || rc=$?
      # 5 = every selected test was the browser test (run on 0.3.75 only).
      [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"
      ;;
    *) echo "[test] unknown runtime '$rt'" >&2; exit 2 ;;
  esac
done
