"""PhaseAwareLoRALoader: Slow LoRA above the boundary sigma, Fast LoRA below, in one run."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..glance_core import GlanceError, experts, lora_files
from .common import CATEGORY, check_finite, require_flow_model

NONE = "None"


def _lora_expert(model, name: str, strength: float, role: str, lora_model: dict | None = None):
    if strength == 0.0 or (not lora_model and name == NONE):
        return None
    try:
        if lora_model:  # a LORA_MODEL wired in (e.g. from the One-Shot Trainer): no file involved
            return experts.build_expert(model, lora_model, strength, f"{role.lower()}_lora_model")
        path = lora_files.resolve_in_folder("loras", name)
        sd, metadata = lora_files.load_safetensors(path)
        return experts.build_expert(model, sd, strength, name, metadata)
    except GlanceError as e:
        raise GlanceError(f"{role} LoRA: {e}") from None


class PhaseAwareLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = [NONE, *folder_paths.get_filename_list("loras")]
        return io.Schema(
            node_id="PhaseAwareLoRALoader",
            display_name="Glance Phase-Aware LoRA Loader",
            category=CATEGORY,
            description=(
                "Applies the Glance Slow LoRA to model evaluations at sigma >= boundary_sigma and the Fast LoRA below "
                "it, inside ONE run of any sampler. The LoRAs are added at forward time, so switching costs nothing "
                "and "
                "the base weights are never changed. Official Glance files have no alpha: strength 1.0 reproduces the "
                "official inference."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base flow model (FLUX.1 or Qwen-Image, or any flow model)."),
                io.Combo.Input(
                    "slow_lora",
                    options=loras,
                    tooltip="Slow expert (models/loras, .safetensors): used while sigma >= boundary_sigma "
                    "(the early, high-noise steps). None = base model there.",
                ),
                io.Combo.Input(
                    "fast_lora",
                    options=loras,
                    tooltip="Fast expert (models/loras, .safetensors): used while sigma < boundary_sigma "
                    "(the late steps). None = base model there.",
                ),
                io.Float.Input(
                    "slow_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier of the Slow LoRA (factor; 1.0 = as stored, 0 = off, usually 0-1.5). Official "
                    "Glance files carry no alpha, so 1.0 is what the official pipeline used.",
                ),
                io.Float.Input(
                    "fast_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier of the Fast LoRA (factor; 1.0 = as stored, 0 = off, usually 0-1.5).",
                ),
                io.Float.Input(
                    "boundary_sigma",
                    default=experts.AUTO_BOUNDARY,
                    min=experts.AUTO_BOUNDARY,
                    max=10.0,
                    step=0.001,
                    tooltip="Switch point in sigma (0..1 for flow models): evaluations at sigma >= this use "
                    "Slow, below it Fast. Wire it from Glance Slow/Fast Scheduler. -1 = auto: the official "
                    "boundary of the connected model (FLUX.1 0.9349, Qwen-Image 0.8990). 0 = Slow everywhere; "
                    "above the first sigma (e.g. 1.01) = Fast everywhere.",
                ),
                io.LoraModel.Input(
                    "slow_lora_model",
                    optional=True,
                    tooltip="A Slow LoRA from another node (e.g. the One-Shot Trainer's slow_lora); when "
                    "connected it is used instead of slow_lora.",
                ),
                io.LoraModel.Input(
                    "fast_lora_model",
                    optional=True,
                    tooltip="A Fast LoRA from another node; when connected it is used instead of fast_lora.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with both experts, switched by sigma.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        slow_lora: str,
        fast_lora: str,
        slow_strength: float = 1.0,
        fast_strength: float = 1.0,
        boundary_sigma: float = experts.AUTO_BOUNDARY,
        slow_lora_model: dict | None = None,
        fast_lora_model: dict | None = None,
    ) -> io.NodeOutput:
        require_flow_model(model, "Glance Phase-Aware LoRA Loader")
        # Cheap checks first: a bad number must not cost a LoRA load.
        check_finite(slow_strength=slow_strength, fast_strength=fast_strength)
        boundary_sigma = experts.resolve_boundary(model, boundary_sigma)
        slow = _lora_expert(model, slow_lora, slow_strength, "Slow", slow_lora_model)
        fast = _lora_expert(model, fast_lora, fast_strength, "Fast", fast_lora_model)
        return io.NodeOutput(experts.apply_phase_lora(model, slow, fast, boundary_sigma))
