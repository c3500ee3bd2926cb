"""The shipped reference teacher: loader (MODEL, CONDITIONING, VAE) and its caption encoder."""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ..glance_core import lora_files, reference_model
from .common import CATEGORY

FOLDER = "glance_reference"
# The pack's own assets/ holds the shipped file; models/glance_reference/ takes retrained ones.
folder_paths.add_model_folder_path(FOLDER, str(reference_model.ASSETS))
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def load(name: str) -> reference_model.Reference:
    path = lora_files.resolve_in_folder(FOLDER, name)
    return reference_model.load_cached(path, os.path.getmtime(path))


def _files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER) or [reference_model.REFERENCE_NAME]


def _caption_tip(what: str) -> str:
    return (
        f"{what}: a scene of 1-3 shapes in plain words, e.g. 'a triangle', 'a red circle', 'a circle and a square', "
        "'two red circles' (two / three), 'a red circle and a blue square', 'a red circle left of a blue square' "
        "(left of / right of / above / below). Colours: red, green, blue, yellow, purple, cyan; shapes: circle, "
        "square, triangle. Empty = unconditional."
    )


class ReferenceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GlanceReferenceLoader",
            display_name="Glance Reference Model Loader",
            category=CATEGORY,
            description=(
                "Loads the pack's reference teacher: a small FLUX (ComfyUI's own Flux architecture, 2.6 M parameters) "
                "trained by the project on scenes of coloured shapes drawn in code, working directly in pixel space "
                "(32×32 RGB; the VAE output is ComfyUI's pixel-space VAE). Use it to try Glance, the One-Shot Trainer "
                f"and ArcFlow without downloading FLUX. Sample it with CFG {reference_model.CFG:g} and "
                "EmptyChromaRadianceLatentImage (32×32)."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=_files(),
                    tooltip="The reference model (.safetensors) in the pack's assets/ or in models/glance_reference/.",
                ),
                io.String.Input(
                    "prompt", default="a red circle left of a blue square", tooltip=_caption_tip("Positive caption")
                ),
                io.String.Input("negative_prompt", default="", tooltip=_caption_tip("Negative caption")),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The reference flow model (FLUX class, pixel space)."),
                io.Conditioning.Output(display_name="positive", tooltip="The encoded prompt."),
                io.Conditioning.Output(display_name="negative", tooltip="The encoded negative prompt (for CFG)."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel-space VAE: the latent is the image in [-1, 1]."),
            ],
        )

    @classmethod
    def execute(cls, model_name: str, prompt: str, negative_prompt: str) -> io.NodeOutput:
        import comfy.sd

        ref = load(model_name)
        vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
        return io.NodeOutput(ref.model, ref.encode(prompt), ref.encode(negative_prompt), vae)


class ReferenceTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GlanceReferenceTextEncode",
            display_name="Glance Reference Caption",
            category=CATEGORY,
            description=(
                "Encodes captions for the reference model (its text encoder is a tiny word embedding stored in the "
                "model "
                "file). One caption per line; several lines give one conditioning entry each (like Conditioning "
                "(Combine)): the One-Shot Trainer and the ArcFlow Distiller take each entry as one caption."
            ),
            inputs=[
                io.Combo.Input("model_name", options=_files(), tooltip="The same reference model file as the loader."),
                io.String.Input(
                    "text",
                    default="two yellow triangles",
                    multiline=True,
                    tooltip=_caption_tip("Caption(s), one per line"),
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="The encoded caption.")],
        )

    @classmethod
    def execute(cls, model_name: str, text: str) -> io.NodeOutput:
        ref = load(model_name)
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        return io.NodeOutput([entry for line in lines for entry in ref.encode(line)])
