"""Helpers shared by the in-process tests: stock ComfyUI nodes called as the executor would."""

from __future__ import annotations

import torch


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


def model_state(model) -> dict:
    """A copy of every tensor of a ModelPatcher's model (to prove later that nothing changed)."""
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def same_state(model, state: dict) -> bool:
    """The model's tensors equal a ``model_state`` snapshot bit for bit."""
    return all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
