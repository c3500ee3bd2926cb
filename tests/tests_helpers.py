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


def train(comfy_nodes, model, positive, inference: bool = True, **kw):
    """OneShotTrainer as the executor calls it (inside inference mode unless ``inference`` is False), with small
    official-objective settings that ``kw`` overrides."""
    import torch

    args = dict(
        objective="official",
        expert="both",
        steps=6,
        rank=4,
        alpha=4.0,
        learning_rate=1e-3,
        seed=0,
        target_layers="official",
        batch=1,
        resolution=64,
    )
    args.update(kw)
    with torch.inference_mode(inference):
        return comfy_nodes.NODE_CLASS_MAPPINGS["OneShotTrainer"].execute(model, positive, **args).args
