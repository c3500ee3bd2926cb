"""The released Glance Qwen-Image stepping inside a ComfyUI sampling run ("official" mode).

The released pipelines call the model at hard-coded (bf16-rounded) timesteps but move the latent
with diffusers' own Euler sigmas, which are other values (``schedules.official_stepping``). Here
the run's SIGMAS are the conditioning sigmas, so everything keyed on the sigma the model is called
with (the phase-aware loader's expert choice, CFG, previews) sees what the released pipeline's
model sees; each update then uses the released step: x ← x + (σ_to − σ_from)·v, with the
velocity v recovered from ComfyUI's denoised output at the conditioning sigma σ_c:
v = (x − denoised) / σ_c (flow models: denoised = x − σ_c·v).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import trange

from . import GlanceError, schedules

#: How far a run's sigma may lie from an official conditioning sigma (they arrive as float32).
SIGMA_TOLERANCE = 1e-6


def latent_tokens(x: torch.Tensor) -> int:
    """Latent tokens of one image as Qwen-Image packs them: 2×2 patches (padded), × frames."""
    frames = x.shape[2] if x.ndim == 5 else 1
    return frames * math.ceil(x.shape[-2] / 2) * math.ceil(x.shape[-1] / 2)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def match_updates(sigmas: Sequence[float], stepping: schedules.OfficialStepping) -> list[tuple[float, float]]:
    """The released update (from, to) of each step of ``sigmas``.

    ``sigmas`` must be a contiguous run of the official conditioning list: the whole list, or a part
    of it as SplitSigmas makes (its last value is where the run stops: the next conditioning sigma,
    or the terminal 0).
    """
    cond = stepping.conditioning
    if len(sigmas) < 2:
        raise GlanceError(
            f"Glance Official Sampler got no step ({len(sigmas)} sigma): wire the Glance Slow/Fast Scheduler's "
            f"{schedules.OFFICIAL_PRESET} sigmas into SamplerCustomAdvanced."
        )
    start = next((k for k in range(len(cond) - 1) if abs(sigmas[0] - cond[k]) <= SIGMA_TOLERANCE), None)
    ok = start is not None and start + len(sigmas) <= len(cond)
    ok = ok and all(abs(s - c) <= SIGMA_TOLERANCE for s, c in zip(sigmas, cond[start:]))
    if not ok:
        raise GlanceError(
            f"Glance Official Sampler steps the released Glance Qwen-Image sigmas {_fmt(cond)} (or a part of them "
            f"from SplitSigmas); got {_fmt(sigmas)}. Set the Glance Slow/Fast Scheduler's preset to "
            f"{schedules.OFFICIAL_PRESET} and wire its sigmas into SamplerCustomAdvanced unchanged. For any other "
            f"sigma list use KSamplerSelect (euler) instead."
        )
    return list(stepping.updates[start : start + len(sigmas) - 1])


@torch.no_grad()
def sample_official(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None, disable=None):
    """k-diffusion-style sampler: the model is called at ``sigmas[i]``, x moves by the released update."""
    extra_args = {} if extra_args is None else extra_args
    values = [float(s) for s in sigmas]  # one host sync for the whole run
    updates = match_updates(values, schedules.official_stepping(latent_tokens(x)))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(updates), disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if not bool(torch.isfinite(denoised).all()):
            raise GlanceError(
                f"Glance Official Sampler: the model's prediction at sigma {values[i]:.4f} (step {i + 1} of "
                f"{len(updates)}) contains NaN or inf values. Nothing is returned. Load the model in bf16 or fp32 "
                f"(fp16 overflows), or lower the LoRA strengths / cfg."
            )
        sigma_from, sigma_to = updates[i]
        x = x + (x - denoised) * ((sigma_to - sigma_from) / values[i])
    return x
