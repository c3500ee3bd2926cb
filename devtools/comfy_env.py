"""Locate and import the real ComfyUI runtime ($COMFYUI_PATH, else .comfyui/ in the repo)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-glance"


def comfy_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui")
    if not (path / "comfy" / "samplers.py").is_file():
        raise RuntimeError(f"No ComfyUI at {path}: run `bash scripts/setup.sh` or set COMFYUI_PATH.")
    return path


def pack_link(parent: Path) -> Path:
    """``parent/comfyui-glance`` → this repo, as a user's custom_nodes/ would hold it."""
    parent.mkdir(parents=True, exist_ok=True)
    link = parent / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


def import_comfy(cpu: bool = True):
    """Import ComfyUI in-process (once) and load this pack as a custom node; returns ``nodes``."""
    path = str(comfy_path())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import nodes

    if _pack_module() is None:
        # ComfyUI's own comfy_extras nodes (custom sampling, ModelSampling*, hooks, train…). Its audio nodes
        # fail to import without torchaudio (not installable on CPU): keep that known noise out of the log.
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR
        try:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        finally:
            root.setLevel(level)
        link = pack_link(REPO / ".cache" / "custom_nodes")
        ok = asyncio.run(nodes.load_custom_node(str(link), module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"{PACK_NAME} failed to load as a custom node (see the log above).")
    return nodes


def _pack_module():
    # ComfyUI registers a custom node under its path with "." → "_x_" as the module name.
    return next((m for k, m in sys.modules.items() if k.endswith("/" + PACK_NAME)), None)


def pack():
    """The pack module as ComfyUI imported it (``pack().glance_core`` is what the nodes use)."""
    mod = _pack_module()
    if mod is None:
        raise RuntimeError("The pack is not loaded: call import_comfy() first.")
    return mod
