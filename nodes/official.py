"""GlanceOfficialSampler: the released Glance Qwen-Image pipeline's stepping, as a SAMPLER."""

from __future__ import annotations

import logging

import comfy.model_sampling
import comfy.samplers
from comfy_api.latest import io

from ..glance_core import GlanceError, architectures, official, schedules
from .common import CATEGORY

log = logging.getLogger("comfyui-glance")


def _sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
    patcher = getattr(model.inner_model, "model_patcher", None)
    if patcher is not None:
        ms = patcher.get_model_object("model_sampling")
        if not isinstance(ms, comfy.model_sampling.CONST):
            raise GlanceError(
                f"Glance Official Sampler needs a flow-matching model (Qwen-Image); the connected "
                f"{type(patcher.model).__name__} model is not one. Connect Qwen-Image, or use KSamplerSelect."
            )
        arch = architectures.find(patcher)
        if arch is None or arch.name != "qwen_image":
            log.warning(
                "Glance: the official stepping reproduces the released Qwen-Image pipeline; the model is %s.",
                type(patcher.model).__name__,
            )
    return official.sample_official(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)


class GlanceOfficialSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GlanceOfficialSampler",
            display_name="Glance Official Sampler (released Qwen-Image stepping)",
            category=CATEGORY,
            description=(
                "A SAMPLER for SamplerCustomAdvanced that reproduces the released Glance Qwen-Image pipeline exactly: "
                "the model is called at the pipeline's hard-coded timesteps (the Slow/Fast Scheduler's "
                f"{schedules.OFFICIAL_PRESET} sigmas, so the Phase-Aware LoRA Loader picks the expert by them), while "
                "each Euler update uses the released pipelines' own sigmas: the first 5 intervals of the Slow "
                "pipeline's 50-step schedule, then the Fast pipeline's 5-step schedule started again at 1.0 (total "
                "1.054). Use CFGGuider cfg 5 with Glance Qwen Norm-Rescaled CFG and the negative prompt ' '."
            ),
            inputs=[],
            outputs=[
                io.Sampler.Output(
                    tooltip="Connect to SamplerCustomAdvanced's sampler input, with the "
                    f"{schedules.OFFICIAL_PRESET} sigmas."
                )
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(_sample))
