"""SlowFastScheduler: the Glance Slow/Fast sigma schedule and its boundary."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..glance_core import architectures, schedules
from .common import CATEGORY, require_flow_model

log = logging.getLogger("comfyui-glance")


class SlowFastScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SlowFastScheduler",
            display_name="Glance Slow/Fast Scheduler",
            category=CATEGORY,
            description=(
                "Sigmas for Glance sampling: a few small Slow steps at high noise, then a few large Fast steps. "
                "The presets are the official 10-step lists (5 Slow + 5 Fast of the base model's 50-step schedule at "
                "1024²). 'custom' derives the list from the connected model's own sampling. Wire 'sigmas' into "
                "SamplerCustomAdvanced and 'boundary_sigma' into the Phase-Aware LoRA Loader. "
                f"'{schedules.OFFICIAL_PRESET}' gives the timesteps the released Qwen-Image pipeline conditions the "
                "model at: use it with Glance Official Sampler to reproduce that pipeline exactly."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The flow model to sample (FLUX.1, Qwen-Image, …). 'custom' reads its "
                    "model_sampling, so put ModelSamplingFlux/AuraFlow nodes before this one.",
                ),
                io.Combo.Input(
                    "preset",
                    options=[*schedules.PRESETS, schedules.OFFICIAL_PRESET, "custom"],
                    default="glance_flux",
                    tooltip="glance_qwen_image / glance_flux: the official Glance sigma lists, stepped as they are. "
                    f"{schedules.OFFICIAL_PRESET}: the released pipeline's bf16-rounded timesteps (1.0, 0.98, … "
                    "0.02), for Glance Official Sampler only. custom: derived from the model with the settings "
                    "below (ignored by the presets).",
                ),
                io.Int.Input(
                    "base_steps",
                    default=50,
                    min=2,
                    max=1000,
                    tooltip="custom: steps of the base schedule the Glance steps are picked from (count; official 50, "
                    "usually 20-100).",
                ),
                io.Int.Input(
                    "slow_steps",
                    default=5,
                    min=0,
                    max=100,
                    tooltip="custom: number of Slow evaluations at the start (count; official 5, usually 2-8; 0 = Fast "
                    "only).",
                ),
                io.Int.Input(
                    "slow_stride",
                    default=2,
                    min=1,
                    max=100,
                    tooltip="custom: Slow evaluations take every n-th base step (base steps; official 2, i.e. base "
                    "steps 0,2,4,6,8; usually 1-3).",
                ),
                io.Int.Input(
                    "fast_steps",
                    default=5,
                    min=0,
                    max=100,
                    tooltip="custom: number of Fast evaluations, spread evenly over the remaining base steps "
                    "with the last one kept (count; official 5, i.e. base steps 10,20,30,40,49; usually 2-8; 0 = Slow "
                    "only).",
                ),
                io.Float.Input(
                    "shift_terminal",
                    default=0.0,
                    min=0.0,
                    max=0.99,
                    step=0.001,
                    tooltip="custom: stretch the base schedule so its last sigma equals this (sigma, 0-0.1 in "
                    "practice; Qwen-Image's diffusers scheduler uses 0.02; FLUX none = 0).",
                ),
            ],
            outputs=[
                io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="Descending sigmas ending in 0."),
                io.Float.Output(
                    "boundary_sigma",
                    display_name="boundary_sigma",
                    tooltip="A sigma between the last Slow and the first Fast step: wire it into the "
                    "Phase-Aware LoRA Loader.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        preset: str,
        base_steps: int = 50,
        slow_steps: int = 5,
        slow_stride: int = 2,
        fast_steps: int = 5,
        shift_terminal: float = 0.0,
    ) -> io.NodeOutput:
        ms = require_flow_model(model, "Glance Slow/Fast Scheduler")
        if preset == "custom":
            sched = schedules.custom(
                ms.percent_to_sigma, base_steps, slow_steps, slow_stride, fast_steps, shift_terminal
            )
        else:
            if preset == schedules.OFFICIAL_PRESET:
                sched = schedules.official_stepping().schedule
            else:
                sched = schedules.preset(preset)
            arch = architectures.for_preset(preset)
            if arch is not None and architectures.find(model) is not arch:
                log.warning(
                    "Glance: preset %s was made for %s but the model is %s.",
                    preset,
                    arch.label,
                    type(model.model).__name__,
                )
        return io.NodeOutput(torch.tensor(sched.sigmas, dtype=torch.float32), sched.boundary)
