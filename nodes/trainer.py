"""OneShotTrainer: train the Glance Slow and Fast LoRAs in the canvas, on the model already loaded."""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..glance_core import oneshot
from .common import (
    CATEGORY,
    caption_inputs,
    check_at_least,
    check_choice,
    check_finite,
    guidance_inputs,
    progress_text,
    require_flow_model,
    save_inputs,
)

OBJECTIVES = ["official", "trajectory"]
EXPERTS = ["both", "slow", "fast"]
TARGET_PRESETS = ["official", "attention", "all_linear"]
#: The integer inputs' minima (as the schema declares them).
MINIMA = {"steps": 1, "rank": 0, "batch": 1, "resolution": 32, "noises": 1, "teacher_steps": 4}


class OneShotTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneShotTrainer",
            display_name="Glance One-Shot Trainer",
            category=CATEGORY,
            description=(
                "Trains the Glance Slow and/or Fast LoRA on the connected model. 'official': the released recipe, "
                "plain flow-matching loss on ONE image at the expert's timesteps. 'trajectory': the model's own "
                "fine-step rollouts from your caption(s) as targets, so that one big step lands where 50 small ones "
                "do (no image needed; several captions generalise better). Outputs the LoRAs, the model with them "
                "applied phase-aware, and the loss curve; optionally saves to models/loras."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base FLUX or Qwen-Image model to accelerate (stays unchanged)."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The caption, from the graph's text encoder. A combined "
                    "conditioning (Conditioning Combine) counts as one caption per entry.",
                ),
                io.Combo.Input(
                    "objective",
                    options=OBJECTIVES,
                    default="official",
                    tooltip="official: plain flow-matching loss on the image (the paper's recipe). "
                    "trajectory: targets from the model's own 50-step rollouts (measurably better at "
                    "few steps; data-free).",
                ),
                io.Combo.Input(
                    "expert",
                    options=EXPERTS,
                    default="both",
                    tooltip="Which expert(s) to train: Slow = the high-noise steps, Fast = the rest.",
                ),
                io.Int.Input(
                    "steps",
                    default=60,
                    min=1,
                    max=100000,
                    tooltip="Optimisation steps per expert (count; official 60, usually 30-500).",
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=512,
                    tooltip="LoRA rank (dimensions; 0 = official for the model: FLUX 16, Qwen-Image 32; usually 4-64).",
                ),
                io.Float.Input(
                    "alpha",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=1.0,
                    tooltip="LoRA alpha (scale = alpha/rank; 0 = 4 × rank, the official value; usually 1-4 × rank). "
                    "The saved file has alpha/rank folded in, so it loads at strength 1.0.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=1e-5,
                    round=1e-6,
                    tooltip="AdamW learning rate (per step; 0 = official: FLUX 5e-4, Qwen-Image 3e-4; usually 1e-4 to "
                    "1e-3).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed for LoRA init, timestep draws and noise (0 to 2^32-1): same seed + inputs = same "
                    "LoRA.",
                ),
                io.Combo.Input(
                    "target_layers",
                    options=TARGET_PRESETS,
                    default="official",
                    tooltip="Layers that get a LoRA. official: FLUX q/k/v/out of every block; Qwen-Image "
                    "attention, MLP-out and modulation (the released recipe).",
                ),
                io.Int.Input(
                    "batch",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Samples per step (count; official 1, usually 1-8). trajectory: teacher states per step.",
                ),
                io.Int.Input(
                    "resolution",
                    default=1024,
                    min=32,
                    max=4096,
                    step=32,
                    tooltip="Pixels. official: the image's longer side is resized to this (then floored to a multiple "
                    "of 32). trajectory: the square size of the teacher rollouts. 512-1024 for FLUX/Qwen "
                    "(1024 = official); 32 for the reference teacher.",
                ),
                io.Image.Input("image", optional=True, tooltip="official: the ONE training image (RGB)."),
                io.Vae.Input("vae", optional=True, tooltip="official: the VAE of the model, to encode the image."),
                io.Sigmas.Input(
                    "sigmas",
                    optional=True,
                    tooltip="The Glance schedule (from Glance Slow/Fast "
                    "Scheduler). Not connected: the official preset for the model.",
                ),
                io.Float.Input(
                    "boundary_sigma",
                    default=-1.0,
                    min=-1.0,
                    max=10.0,
                    step=0.001,
                    optional=True,
                    tooltip="Slow/Fast boundary of the connected sigmas (sigma, 0..1 for flow models; wire it from the "
                    "scheduler; -1 = auto, the model's official boundary: FLUX.1 0.9349, Qwen-Image 0.8990); "
                    "ignored without sigmas.",
                ),
                *guidance_inputs(
                    "trajectory: negative caption for CFG (Qwen-Image official: ' ').",
                    "trajectory: CFG scale of the teacher rollouts and of the student (1 = no CFG, usually 1-7; "
                    "Qwen-Image official: 5 with negative ' '; FLUX: 1, guidance comes from FluxGuidance).",
                ),
                io.Int.Input(
                    "noises",
                    default=8,
                    min=1,
                    max=4096,
                    optional=True,
                    tooltip="trajectory: teacher rollouts per caption (count, different noise each; usually 4-32).",
                ),
                io.Int.Input(
                    "teacher_steps",
                    default=50,
                    min=4,
                    max=1000,
                    optional=True,
                    tooltip="trajectory: steps of the teacher's fine schedule (count; its own 50-step schedule, "
                    "usually 20-100; the Glance sigmas are added to it).",
                ),
                io.Float.Input(
                    "student_mix",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    optional=True,
                    tooltip="trajectory: in the second half of training, the share of steps on the student's own "
                    "rollout states (with the teacher's fine rollout from there as target). Fraction 0-1; 0 = teacher "
                    "states only; unused with unroll.",
                ),
                io.Boolean.Input(
                    "unroll",
                    default=False,
                    optional=True,
                    tooltip="trajectory: train each expert through its whole phase: its Euler steps chained from the "
                    "teacher's state at its first sigma, gradients through all of them, every state matched to the "
                    "teacher's. Trains on the student's own states; each step costs as many model evaluations as the "
                    "expert has steps.",
                ),
                *caption_inputs("trajectory: "),
                *save_inputs("<save_name>_slow/_fast.safetensors"),
            ],
            outputs=[
                io.LoraModel.Output(
                    "slow_lora",
                    display_name="slow_lora",
                    tooltip="The Slow LoRA (wire into the Phase-Aware LoRA Loader's slow_lora_model).",
                ),
                io.LoraModel.Output(
                    "fast_lora",
                    display_name="fast_lora",
                    tooltip="The Fast LoRA (wire into the Phase-Aware LoRA Loader's fast_lora_model).",
                ),
                io.Model.Output(
                    "trained_model", display_name="model", tooltip="The model with the trained experts, phase-aware."
                ),
                io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Training loss per step."),
            ],
            hidden=[io.Hidden.unique_id],
            is_experimental=False,
        )

    @classmethod
    def execute(cls, model, positive, **inputs) -> io.NodeOutput:
        """``inputs``: the schema's inputs by name (optional ones only when connected; ``oneshot.train`` has the
        defaults)."""
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        # Every input is checked before any work (encoding, rollouts, training).
        check_choice("objective", inputs["objective"], OBJECTIVES)
        check_choice("expert", inputs["expert"], EXPERTS)
        check_choice("target_layers", inputs["target_layers"], TARGET_PRESETS)
        check_finite(**{k: inputs.get(k) for k in ("learning_rate", "alpha", "boundary_sigma", "cfg", "student_mix")})
        check_at_least(**{k: (inputs[k], low) for k, low in MINIMA.items() if k in inputs})
        require_flow_model(model, "Glance One-Shot Trainer")
        pbar: list = []

        def progress(done: int, total: int, text: str | None) -> None:
            if not pbar:
                pbar.append(comfy.utils.ProgressBar(total, node_id=node_id))
            pbar[0].update_absolute(done, total)
            if text:
                progress_text(text, node_id)

        res = oneshot.train(model, positive, **inputs, progress=progress)
        return io.NodeOutput(res.slow, res.fast, res.model, res.curve)
