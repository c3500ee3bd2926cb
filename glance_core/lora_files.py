"""Safe, cached loading of LoRA files from a ComfyUI model folder.

User-supplied names are resolved inside the folder's registered paths only (no absolute paths,
no ``..``), and only ``.safetensors`` files are read: no pickle is ever unpickled.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
from safetensors import SafetensorError, safe_open

from . import GlanceError

_CACHE: OrderedDict[tuple, tuple[dict[str, torch.Tensor], dict[str, str]]] = OrderedDict()
_CACHE_SIZE = 4
_LOCK = threading.Lock()


def resolve_in_folder(folder_name: str, name: str) -> str:
    """Full path of ``name`` inside ComfyUI's ``folder_name`` folders, or a clear error."""
    import folder_paths

    if not name or name in ("None", "none"):
        raise GlanceError(f"No file chosen: pick a .safetensors file from models/{folder_name}/.")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm.startswith("..") or os.path.isabs(norm):
        raise GlanceError(
            f"{name!r} points outside the {folder_name} folder; give a name relative to models/{folder_name}/."
        )
    if not name.lower().endswith((".safetensors", ".sft")):
        raise GlanceError(
            f"{name!r} is not a .safetensors file. Only safetensors are loaded (pickled .ckpt/.pt/.bin can run code): "
            f"convert it, e.g. with safetensors.torch.save_file, and put it in models/{folder_name}/."
        )
    roots = folder_paths.get_folder_paths(folder_name)
    for root in roots:
        full = os.path.join(root, norm)
        if os.path.commonpath([os.path.abspath(root), os.path.abspath(full)]) != os.path.abspath(root):
            continue
        if os.path.isfile(full):
            return full
    raise GlanceError(f"LoRA file {name!r} not found in {folder_name} folders {roots}: copy it there or pick another.")


def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file; cached by path, size and mtime.

    The returned dict is shared with the cache: callers must not modify it.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise GlanceError(f"Cannot read {path}: {e.strerror}.") from None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise GlanceError(f"{os.path.basename(path)} is not a readable safetensors file ({e}).") from None
    if not sd:
        raise GlanceError(f"{os.path.basename(path)} contains no tensors.")
    with _LOCK:
        _CACHE[key] = (sd, metadata)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return sd, metadata


def check_values(sd: dict[str, torch.Tensor], label: str, limit: float, fix: str) -> None:
    """Refuse NaN, inf and values beyond ``limit`` in a file's tensors, naming the tensor: they would sample a
    black image without an error. ``label`` names the file for the user, ``fix`` says what to do."""
    for key in sorted(sd):
        t = sd[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0 or t.is_meta:
            continue
        t = t.detach()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise GlanceError(
                f"{label}: tensor {key!r} holds {int((~finite).sum())} NaN or inf value(s) of {t.numel()}: the "
                f"file is broken (a diverged training or a bad conversion). {fix}"
            )
        peak = float(t.abs().max())
        if peak > limit:
            raise GlanceError(
                f"{label}: tensor {key!r} holds a value of magnitude {peak:.3g}, above {limit:g}: the file is "
                f"broken. {fix}"
            )
