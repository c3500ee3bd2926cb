"""ArcFlow's sampling loop, in the shape of ComfyUI's k-diffusion samplers (``KSAMPLER`` calls it).

Each step is one model evaluation; the ArcFlow model's output already carries the closed-form step of its
momentum policy (see ``arcflow_model``), so the loop itself is an Euler step on it, with the checks that keep a
bad adapter or schedule from becoming a silent black image.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from . import GlanceError, arcflow_model


def describe_sigmas(values: list[float]) -> str:
    """A short account of a sigma list: count, first and last few, and where it stops descending."""
    fmt = lambda vs: ", ".join(f"{v:.4g}" for v in vs)  # noqa: E731
    shown = fmt(values) if len(values) <= 8 else f"{fmt(values[:4])}, …, {fmt(values[-3:])}"
    text = f"{len(values)} sigmas [{shown}]"
    for i, (a, b) in enumerate(zip(values, values[1:])):
        if not (math.isfinite(a) and math.isfinite(b) and b < a):
            return f"{text}; they stop descending at index {i + 1} ({a:.6g} → {b:.6g})"
    bad = [i for i, v in enumerate(values) if not math.isfinite(v) or v < 0]
    return f"{text}; value {bad[0]} is {values[bad[0]]}" if bad else text


def check_sigmas(sigmas) -> list[float]:
    values = [float(s) for s in sigmas]
    if (
        len(values) < 2
        or any(not (math.isfinite(v) and v >= 0) for v in values)
        or any(not b < a for a, b in zip(values, values[1:]))
    ):
        raise GlanceError(
            f"ArcFlow Sampler needs at least 2 finite, non-negative, strictly descending sigmas; got "
            f"{describe_sigmas(values)}. Use BasicScheduler 'simple' with 2 steps on the ArcFlow model as it is."
        )
    return values


@torch.no_grad()
def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Each step evaluates the model once. The ArcFlow model returns x̂0 = x − σ_i·ū, where ū = D/Δ is the
    closed-form mean velocity of its momentum policy from σ_i to σ_{i+1}, so x ← x − D is the step
    x + (x − x̂0)/σ_i · (σ_{i+1} − σ_i): the displacement comes from the model call itself."""
    extra_args = {} if extra_args is None else extra_args
    guider = model.inner_model
    state = arcflow_model.state_of(getattr(guider, "model_patcher", None))
    if state is None:
        raise GlanceError(
            "ArcFlow Sampler needs a model with ArcFlow heads: load an adapter with ArcFlow Adapter Loader, or "
            "distil one with ArcFlow Distiller (its model output), and connect that model to the guider."
        )
    cfg = float(getattr(guider, "cfg", 1.0))
    if cfg != 1.0:
        raise GlanceError(
            f"ArcFlow adapters distilled the guidance in: use cfg 1 (got {cfg}). With CFGGuider set cfg "
            f"to 1, or use BasicGuider; for FLUX keep FluxGuidance 3.5."
        )
    values = check_sigmas(sigmas)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if not bool(torch.isfinite(x).all()):
            raise GlanceError(
                f"ArcFlow Sampler: step {i + 1} (σ {values[i]:.4g} → {values[i + 1]:.4g}) gave non-finite values "
                f"(NaN/inf). Likely cause: an adapter whose log-γ or means overflow on this model (corrupt or "
                f"made for another model), or fp16 overflow: use the matching adapter, or load the model in bf16."
            )
    return x
