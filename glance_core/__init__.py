"""comfyui-glance core library.

One module per idea:

- ``schedules``: Glance Slow/Fast sigma schedules (pure maths, no ComfyUI).
- ``lora_files``: safe, cached loading of LoRA safetensors from a model folder.
- ``experts``: LoRA experts applied at forward time and switched at a sigma boundary
  inside one ComfyUI sampling run.
- ``guidance``: Qwen-Image's norm-rescaled true CFG.
"""

__version__ = "0.1.0"


class GlanceError(ValueError):
    """A user-facing error: the message names the problem and the fix."""
