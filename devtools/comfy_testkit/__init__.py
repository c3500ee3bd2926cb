"""Test/demo scaffolding loaded as a second custom node pack (never shipped to users).

- Lets ComfyUI's stock loaders load the tiny seeded models: their safetensors carry the tiny
  config in metadata, and ComfyUI's shape-based detection assumes full-size head counts
  (its ``detect_unet_config``), so the detected config is completed from the metadata.
- ``GlanceTestkitTextEncode`` stands in for CLIPTextEncode: real FLUX/Qwen text encoders are
  gigabytes; it returns a conditioning of the tiny models' shape, seeded by the text.
- With ``$GLANCE_TESTKIT_TINY_PROMPTS`` = N (set by ``ComfyServer(tiny_prompts=N)``), every queued
  prompt is rewritten by ``tiny_models.tiny_prompt`` (text encoders → the testkit's, images N px), so the
  shipped workflows queued unchanged from the browser UI run on the tiny stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import comfy.model_detection
from comfy_api.latest import ComfyExtension, io

sys.path.append(str(Path(__file__).resolve().parents[2]))  # after ComfyUI: the repo root has a nodes/ package
from devtools import tiny_models  # noqa: E402

_detect = comfy.model_detection.detect_unet_config


def _detect_tiny(state_dict, key_prefix, metadata=None):
    cfg = _detect(state_dict, key_prefix, metadata=metadata)
    if cfg is not None and metadata and tiny_models.META_KEY in metadata:
        cfg.update(json.loads(metadata[tiny_models.META_KEY]))
    return cfg


if getattr(_detect, "__name__", "") != "_detect_tiny":
    comfy.model_detection.detect_unet_config = _detect_tiny


def _tiny_prompts(size: int):
    def handler(json_data: dict) -> dict:
        if isinstance(json_data.get("prompt"), dict):
            json_data["prompt"] = tiny_models.tiny_prompt(json_data["prompt"], size)
        return json_data

    return handler


if os.environ.get("GLANCE_TESTKIT_TINY_PROMPTS"):
    from server import PromptServer

    PromptServer.instance.add_on_prompt_handler(_tiny_prompts(int(os.environ["GLANCE_TESTKIT_TINY_PROMPTS"])))


class GlanceTestkitTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GlanceTestkitTextEncode",
            display_name="Testkit Text Encode (tiny models)",
            category="Glance/testkit",
            inputs=[io.String.Input("text", multiline=True), io.Combo.Input("arch", options=list(tiny_models.CONFIGS))],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text: str, arch: str) -> io.NodeOutput:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "little")
        return io.NodeOutput(tiny_models.conditioning(arch, seed))


class Testkit(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [GlanceTestkitTextEncode]


async def comfy_entrypoint() -> Testkit:
    return Testkit()
