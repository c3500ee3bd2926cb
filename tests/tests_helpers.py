"""Helpers shared by the in-process tests: stock ComfyUI nodes called as the executor would."""

from __future__ import annotations


def sample(comfy_nodes, model, sigmas, pos, neg, latent, cfg=3.0, seed=0, add_noise=True, sampler="euler"):
    """SamplerCustomAdvanced with RandomNoise/DisableNoise, CFGGuider and KSamplerSelect."""
    n = comfy_nodes.NODE_CLASS_MAPPINGS
    noise = n["RandomNoise"].execute(seed).args[0] if add_noise else n["DisableNoise"].execute().args[0]
    guider = n["CFGGuider"].execute(model, pos, neg, cfg).args[0]
    sampler_obj = n["KSamplerSelect"].execute(sampler).args[0]
    out = n["SamplerCustomAdvanced"].execute(noise, guider, sampler_obj, sigmas, {"samples": latent}).args[0]
    return out["samples"]
