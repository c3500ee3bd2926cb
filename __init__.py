"""comfyui-glance: Glance Slow/Fast LoRA experts and ArcFlow few-step sampling for ComfyUI.

ComfyUI loads this package from ``custom_nodes/`` and calls ``comfy_entrypoint`` (V3 schema).
Imported outside ComfyUI (e.g. by test collection) it exposes nothing.
"""

if __package__:  # pytest >= 9 may import this file as a top-level module: nothing to expose then
    try:
        from .nodes import comfy_entrypoint
    except ModuleNotFoundError as e:  # not running inside ComfyUI
        if not (e.name or "").startswith(("comfy", "folder_paths")):
            raise
    else:
        __all__ = ["comfy_entrypoint"]
