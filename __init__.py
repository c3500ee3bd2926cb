"""comfyui-glance: Glance Slow/Fast LoRA experts and ArcFlow few-step sampling for ComfyUI.

ComfyUI loads this package from ``custom_nodes/`` and calls ``comfy_entrypoint`` (V3 schema).
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
