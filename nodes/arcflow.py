"""ArcFlow nodes: load a released adapter onto a MODEL, and the closed-form 2-step sampler."""

from __future__ import annotations

import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io
from tqdm.auto import trange

from ..glance_core import GlanceError, arcflow_model, lora_files
from .common import CATEGORY, require_flow_model


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
                    tooltip="Multiplier of the adapter's LoRA part (the heads are used as they are).",
                ),
                io.Float.Input(
                    "shift",
                    default=3.2,
                    min=0.1,
                    max=20.0,
                    step=0.01,
                    tooltip="Fixed sigma shift of the schedule the adapter was trained on (official: 3.2).",
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


@torch.no_grad()
def sample_arcflow(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Each step: one model evaluation gives the policy at σ_i; x ← x − D(σ_i → σ_{i+1}) in closed form."""
    extra_args = {} if extra_args is None else extra_args
    guider = model.inner_model
    state = arcflow_model.state_of(getattr(guider, "model_patcher", None))
    if state is None:
        raise GlanceError(
            "ArcFlow Sampler needs a model with ArcFlow heads: load one with ArcFlow Adapter Loader "
            "(or the One-Shot Trainer's arcflow objective)."
        )
    cfg = float(getattr(guider, "cfg", 1.0))
    if cfg != 1.0:
        raise GlanceError(
            f"ArcFlow adapters distilled the guidance in: use cfg 1 (got {cfg}). With CFGGuider set cfg "
            f"to 1, or use BasicGuider; for FLUX keep FluxGuidance 3.5."
        )
    values = [float(s) for s in sigmas]
    if any(not b < a for a, b in zip(values, values[1:])):
        raise GlanceError(f"ArcFlow Sampler needs strictly descending sigmas; got {[round(v, 4) for v in values]}.")
    masked = extra_args.get("denoise_mask") is not None
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = state.last_displacement
        if masked or d is None:  # inpainting mixes in the known latent: step through the equivalent denoised
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            x = x - d.to(x.dtype)
    return x


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
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_arcflow))
