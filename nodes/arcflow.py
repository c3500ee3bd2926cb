"""ArcFlow nodes: load a released adapter onto a MODEL, and the closed-form 2-step sampler."""

from __future__ import annotations

import json
import math

import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..glance_core import (
    GlanceError,
    arcflow_distill,
    arcflow_model,
    arcflow_sampler,
    architectures,
    lora_files,
    lora_save,
    oneshot,
    training,
)
from ..glance_core.plots import loss_curve
from .common import CATEGORY, caption_inputs, guidance_inputs, progress_text, require_flow_model, save_inputs


class ArcFlowLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ArcFlowLoader",
            display_name="ArcFlow Adapter Loader",
            category=CATEGORY,
            description=(
                "Attaches an ArcFlow adapter (LoRA + momentum heads, the released ymyy307/ArcFlow format) to the "
                "connected FLUX or Qwen-Image model, so that it predicts K velocities, gates and momentum factors. "
                "Sample with ArcFlow Sampler (or KSampler + euler) over 2 steps: BasicScheduler 'simple', 2 steps on "
                "this model gives the official sigmas 1.0, 0.7619, 0. cfg 1 (the adapter distilled the guidance)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base FLUX.1-dev or Qwen-Image model the adapter was made for."),
                io.Combo.Input(
                    "adapter",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="The adapter file (.safetensors) in models/loras, e.g. the "
                    "diffusion_pytorch_model.safetensors of arcflow-qwen-2steps, renamed.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Multiplier of the adapter's LoRA part (factor; 1.0 = as trained, usually 0.5-1.2; the "
                    "heads are used as they are).",
                ),
                io.Float.Input(
                    "shift",
                    default=3.2,
                    min=0.1,
                    max=20.0,
                    step=0.01,
                    tooltip="Fixed sigma shift of the schedule the adapter was trained on (shift factor; official 3.2, "
                    "keep the training value).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with ArcFlow heads (base weights untouched).")],
        )

    @classmethod
    def execute(cls, model, adapter: str, strength: float = 1.0, shift: float = 3.2) -> io.NodeOutput:
        require_flow_model(model, "ArcFlow Adapter Loader")
        path = lora_files.resolve_in_folder("loras", adapter)
        sd, _ = lora_files.load_safetensors(path)
        return io.NodeOutput(arcflow_model.apply_arcflow(model, sd, adapter, strength, shift))


class ArcFlowSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ArcFlowSampler",
            display_name="ArcFlow Sampler",
            category=CATEGORY,
            description=(
                "A SAMPLER for SamplerCustomAdvanced: each step evaluates the ArcFlow model once and integrates its "
                "momentum velocities in closed form to the next sigma (2 evaluations for the official 2-step "
                "schedule). Needs a model from ArcFlow Adapter Loader and cfg 1."
            ),
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced's sampler input.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(arcflow_sampler.sample))


class ArcFlowDistiller(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ArcFlowDistiller",
            display_name="ArcFlow Distiller",
            category=CATEGORY,
            description=(
                "Distils an ArcFlow adapter (LoRA + momentum heads) from the connected model, data-free from a few "
                "captions: the student's instantaneous velocity inside each of its few steps is matched to the "
                "model's own (guided) velocity along a mixed student/teacher path (a simplified variant of the "
                "official objective, which matches a windowed mean velocity and drops components; sized for one "
                "machine). Outputs "
                "the model with the adapter (sample it with ArcFlow Sampler, cfg 1) and the adapter itself."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The teacher: a FLUX or Qwen-Image model (stays unchanged)."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="Caption(s): a combined conditioning counts as one caption "
                    "per entry. For FLUX put FluxGuidance 3.5 before it.",
                ),
                io.Int.Input(
                    "iterations",
                    default=300,
                    min=1,
                    max=1000000,
                    tooltip="Optimisation steps (count; usually 300-20000; the official run used 10-15k on 4 GPUs).",
                ),
                io.Int.Input(
                    "steps",
                    default=2,
                    min=1,
                    max=16,
                    tooltip="Student steps (model evaluations) per image (count; official 2, usually 1-4).",
                ),
                io.Int.Input(
                    "components",
                    default=16,
                    min=2,
                    max=64,
                    tooltip="K: momentum components (count; official 16, usually 4-32).",
                ),
                io.Int.Input(
                    "rank",
                    default=16,
                    min=1,
                    max=512,
                    tooltip="LoRA rank (dimensions; official 256 at full size, usually 16-256).",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-3,
                    min=1e-6,
                    max=1.0,
                    step=1e-5,
                    round=1e-6,
                    tooltip="AdamW learning rate (per step; official 1e-4, usually 1e-5 to 1e-3; the momentum head "
                    "gets 0.1×).",
                ),
                io.Int.Input("batch", default=4, min=1, max=256, tooltip="Noises per iteration (count; usually 1-16)."),
                io.Int.Input(
                    "resolution",
                    default=1024,
                    min=32,
                    max=4096,
                    step=16,
                    tooltip="Square image size the student is trained at (pixels, multiple of 16; usually 512-1024; "
                    "32 for the reference teacher).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed for init, noises and sampled times (0 to 2^32-1).",
                ),
                io.Float.Input(
                    "shift",
                    default=3.2,
                    min=0.1,
                    max=20.0,
                    step=0.01,
                    tooltip="Fixed sigma shift of the student's schedule (shift factor; official 3.2, usually 1-5).",
                ),
                *guidance_inputs(
                    "Teacher CFG negative (Qwen-Image official: empty prompt).",
                    "Teacher CFG scale (1 = no CFG, usually 1-7; Qwen-Image official 4). The student runs at cfg 1.",
                ),
                *caption_inputs(),
                *save_inputs("<save_name>.safetensors (ArcFlow Adapter Loader reads it)"),
            ],
            outputs=[
                io.Model.Output("arcflow_model", display_name="model", tooltip="The model with the distilled adapter."),
                io.LoraModel.Output(
                    "adapter", display_name="adapter", tooltip="The adapter (released ArcFlow layout)."
                ),
                io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Distillation loss per iteration."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        iterations: int,
        steps: int,
        components: int,
        rank: int,
        learning_rate: float,
        batch: int,
        resolution: int,
        seed: int,
        shift: float = 3.2,
        negative=None,
        cfg: float = 1.0,
        clip=None,
        captions: str = "",
        save_name: str = "",
        overwrite: bool = False,
    ) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        require_flow_model(model, "ArcFlow Distiller")
        architectures.of(model, "ArcFlow Distiller")
        arcflow_model.refuse_arcflow_model(model, "ArcFlow Distiller")
        arcflow_distill.check_resolution(model, resolution)
        for label, value in (("learning_rate", learning_rate), ("shift", shift), ("cfg", cfg)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise GlanceError(f"ArcFlow Distiller: {label} must be a finite number > 0 (got {value}).")
        path = None
        if save_name.strip():
            path = oneshot.save_paths(save_name, [""], overwrite)[""]
        conds = oneshot.caption_list(positive, clip, captions)
        neg = training.clone_conditioning(negative) if negative is not None else None
        pbar = comfy.utils.ProgressBar(iterations, node_id=node_id)

        def on_step(i: int, loss: float) -> None:
            pbar.update_absolute(i + 1, iterations)
            progress_text(f"ArcFlow distillation: iteration {i + 1}/{iterations}, loss {loss:.5f}", node_id)

        result = arcflow_distill.distill(
            model,
            [(c, neg) for c in conds],
            teacher_cfg=cfg,
            iterations=iterations,
            steps=steps,
            shift=shift,
            k=components,
            rank=rank,
            lr=learning_rate,
            batch=batch,
            seed=seed,
            latent_shape=oneshot.latent_shape(model, resolution, None),
            on_step=on_step,
        )
        if path:
            meta = {
                "policy_config": json.dumps({"type": "ArcFlow"}),
                "glance.format": "1",
                "glance.objective": "arcflow",
                "glance.components": str(components),
                "glance.steps": str(steps),
                "glance.shift": str(shift),
                "glance.iterations": str(iterations),
                "glance.seed": str(seed),
                "glance.rank": str(rank),
                "glance.scale_convention": "alpha = rank (scale 1)",
            }
            lora_save.save_lora_atomic(path, result.adapter, meta, overwrite=overwrite)
        loaded = arcflow_model.apply_arcflow(model, result.adapter, "distilled adapter", 1.0, shift)
        curve = loss_curve({"ArcFlow": result.losses}, title=f"ArcFlow distillation, {steps} steps, K={components}")
        return io.NodeOutput(loaded, result.adapter, curve)
