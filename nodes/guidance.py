"""QwenNormCFG: the official Qwen-Image pipeline's norm-rescaled true CFG as a model patch."""

from __future__ import annotations

from comfy_api.latest import io

from ..glance_core.guidance import norm_rescaled_cfg
from .common import CATEGORY, require_flow_model


def _cfg(args: dict):
    return norm_rescaled_cfg(args["cond"], args["uncond"], args["cond_scale"])


class QwenNormCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GlanceQwenNormCFG",
            display_name="Glance Qwen Norm-Rescaled CFG",
            category=CATEGORY,
            description=(
                "The official Qwen-Image pipeline's true-CFG combination: classifier-free guidance, then each packed "
                "2×2 latent token rescaled to the norm of the conditional prediction. The official Glance Qwen "
                "pipeline uses it with cfg 5 and negative prompt ' ' (set those in CFGGuider); this node reproduces "
                "the combination only, not the rest of the diffusers pipeline. Any latent size: at odd sizes the "
                "edge tokens are normed over their visible values. No effect at cfg 1."
            ),
            inputs=[io.Model.Input("model", tooltip="A Qwen-Image model (or any flow model with 2×2 patches).")],
            outputs=[io.Model.Output(tooltip="The model with norm-rescaled CFG.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        require_flow_model(model, "Glance Qwen Norm-Rescaled CFG")
        m = model.clone()
        m.set_model_sampler_cfg_function(_cfg)
        return io.NodeOutput(m)
