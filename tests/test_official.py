"""The released Glance Qwen-Image stepping ("official" mode): its sigma lists against diffusers'
FlowMatchEulerDiscreteScheduler (the oracle), and the mode inside real ComfyUI sampling against a
direct re-implementation of the released pipeline's loop on tiny Qwen-Image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glance_core import GlanceError, official, schedules

#: Qwen/Qwen-Image's scheduler/scheduler_config.json, as published (the oracle's configuration).
QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
#: The timesteps hard-coded (as bf16 tensors) in GlanceQwenSlowPipeline / GlanceQwenFastPipeline.
SLOW_T = [1000.0000, 979.1915, 957.5157, 934.9171, 911.3354]
FAST_T = [886.7053, 745.0728, 562.9505, 320.0802, 20.0000]
#: Steps each released pipeline builds its scheduler with (the Slow one forces 50).
PIPELINE_STEPS = {"slow": 50, "fast": 5}


def oracle(steps: int, seq_len: int):
    """diffusers' scheduler as the released pipeline sets it up for ``steps`` and an image of ``seq_len`` tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)
    c = sch.config  # the pipeline's calculate_shift, with the scheduler's configuration
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = seq_len * m + (c.base_shift - m * c.base_image_seq_len)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sch.set_begin_index(0)
    return sch


# --- the sigma lists, computed, against the oracle ---------------------------------------------
def test_scheduler_configuration_is_qwen_images():
    for key, value in schedules.QWEN_IMAGE_SCHEDULER.items():
        assert QWEN_SCHEDULER_CONFIG[key] == value, key
    assert abs(schedules.qwen_mu(4096) - 0.69355) < 1e-5


@pytest.mark.parametrize("seq_len", [4096, 6032, 256, 16])
def test_update_sigmas_are_the_released_pipelines_schedules(seq_len):
    """Slow: the first 5 intervals of the 50-step schedule; Fast: the whole 5-step schedule, from 1.0."""
    stepping = schedules.official_stepping(seq_len)
    slow = oracle(PIPELINE_STEPS["slow"], seq_len).sigmas[:6].double()
    fast = oracle(PIPELINE_STEPS["fast"], seq_len).sigmas.double()
    expected = list(zip(slow.tolist(), slow[1:].tolist())) + list(zip(fast.tolist(), fast[1:].tolist()))
    got = torch.tensor(stepping.updates, dtype=torch.float64)
    assert got.shape == (10, 2)
    assert (got - torch.tensor(expected, dtype=torch.float64)).abs().max() < 1e-6


def test_official_lists_at_1024():
    """The figures of the released pipeline at 1024² (4096 tokens)."""
    s = schedules.official_stepping(4096)
    slow = [a for a, _ in s.updates[:5]] + [s.updates[4][1]]
    fast = [a for a, _ in s.updates[5:]] + [s.updates[9][1]]
    assert np.allclose(slow, [1.0, 0.98970, 0.97919, 0.96847, 0.95752, 0.94634], atol=5e-6)
    assert np.allclose(fast, [1.0, 0.83670, 0.63256, 0.37006, 0.02, 0.0], atol=5e-5)
    assert abs(s.total_update - 1.0537) < 1e-4
    assert s.schedule.sigmas[4] > s.schedule.boundary > s.schedule.sigmas[5]


def test_conditioning_sigmas_are_the_hardcoded_bf16_timesteps():
    """Computed from the 50-step schedule at 1024², they equal the pipelines' literals as bf16 / 1000."""
    released = torch.tensor(SLOW_T + FAST_T, dtype=torch.bfloat16).to(torch.float32) / 1000
    cond = schedules.official_conditioning()
    assert torch.equal(torch.tensor(cond[:-1], dtype=torch.float32), released) and cond[-1] == 0.0
    # The hard-coded values are the oracle's 50-step timesteps at the Glance indices.
    t50 = oracle(50, 4096).timesteps
    picked = t50[[0, 2, 4, 6, 8, 10, 20, 30, 40, 49]].to(torch.bfloat16)
    assert torch.equal(picked, torch.tensor(SLOW_T + FAST_T, dtype=torch.bfloat16))
    assert [round(1000 * c) for c in cond[:-1]] == [1000, 980, 956, 936, 912, 888, 744, 564, 320, 20]


def test_runs_must_be_a_contiguous_part_of_the_official_list():
    s = schedules.official_stepping(16)
    cond = list(s.conditioning)
    assert official.match_updates(cond, s) == list(s.updates)
    assert official.match_updates(cond[:6], s) == list(s.updates[:5])  # SplitSigmas at 5: both halves
    assert official.match_updates(cond[5:], s) == list(s.updates[5:])
    f32 = torch.tensor(cond, dtype=torch.float32).tolist()  # as they arrive from a SIGMAS tensor
    assert official.match_updates(f32, s) == list(s.updates)
    for bad in (list(schedules.PRESETS["glance_qwen_image"]), cond[:3] + cond[4:], [1.0], cond[:-1] + [0.01]):
        with pytest.raises(GlanceError, match=schedules.OFFICIAL_PRESET):
            official.match_updates(bad, s)


# --- the mode inside real ComfyUI sampling ----------------------------------------------------
def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def _pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] → the pipeline's packed tokens [B, H/2·W/2, C·4]."""
    b, c, _, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _unpack(tokens: torch.Tensor, shape) -> torch.Tensor:
    b, c, _, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(shape)


@torch.no_grad()
def released_loop(comfy_nodes, models: dict, noise: torch.Tensor, pos, neg, cfg: float = 5.0) -> torch.Tensor:
    """The released Slow pipeline then Fast pipeline, as their code runs: packed latents, the model called at
    the hard-coded bf16 t / 1000, true CFG with the norm rescale, diffusers' ``scheduler.step``."""
    import comfy.model_management as mm

    latents = _pack(noise.float())
    for phase, hard_coded in (("slow", SLOW_T), ("fast", FAST_T)):
        mm.load_models_gpu([models[phase]])
        dm = models[phase].model.diffusion_model
        sch = oracle(PIPELINE_STEPS[phase], latents.shape[1])
        for t in torch.tensor(hard_coded, dtype=torch.bfloat16):
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            x = _unpack(latents, noise.shape)
            noise_pred = _pack(dm(x, timestep, context=pos[0][0], transformer_options={}).float())
            neg_noise_pred = _pack(dm(x, timestep, context=neg[0][0], transformer_options={}).float())
            comb_pred = neg_noise_pred + cfg * (noise_pred - neg_noise_pred)
            cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
            noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
            noise_pred = comb_pred * (cond_norm / noise_norm)
            latents = sch.step(noise_pred, t, latents, return_dict=False)[0]
    return _unpack(latents, noise.shape)


@pytest.fixture
def qwen(comfy_nodes, tiny, loras_dir):
    model = tiny.build("qwen_image", 0)
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora("qwen_image", 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora("qwen_image", 2))
    pos, neg = tiny.conditioning("qwen_image", 1), tiny.conditioning("qwen_image", 2)
    return model, pos, neg, tiny.latent("qwen_image", 64, 64)


def _official_graph(comfy_nodes, model, pos, neg, cfg=5.0, preset=schedules.OFFICIAL_PRESET):
    """Scheduler preset → Phase-Aware LoRA Loader (boundary wired) → Norm CFG → CFGGuider; official SAMPLER."""
    sigmas, boundary = _n(comfy_nodes, "SlowFastScheduler").execute(model, preset).args
    m = _n(comfy_nodes, "PhaseAwareLoRALoader").execute(
        model, "slow.safetensors", "fast.safetensors", 1.0, 1.0, boundary
    )
    m = _n(comfy_nodes, "GlanceQwenNormCFG").execute(m.args[0]).args[0]
    guider = _n(comfy_nodes, "CFGGuider").execute(m, pos, neg, cfg).args[0]
    sampler = _n(comfy_nodes, "GlanceOfficialSampler").execute().args[0]
    return sigmas, guider, sampler, m


def _run(comfy_nodes, guider, sampler, sigmas, latent, seed=0, add_noise=True):
    n = comfy_nodes.NODE_CLASS_MAPPINGS
    noise = n["RandomNoise"].execute(seed).args[0] if add_noise else n["DisableNoise"].execute().args[0]
    return n["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, {"samples": latent}).args[0]["samples"]


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


def test_official_mode_equals_the_released_loop(comfy_nodes, qwen):
    """SamplerCustomAdvanced with the official preset + Official Sampler + phase loader + Norm CFG 5 lands where
    the released two-pipeline loop does (each expert merged by stock LoraLoaderModelOnly), to float precision;
    with the experts swapped, or stepped along the conditioning sigmas themselves, it does not."""
    model, pos, neg, latent = qwen
    sigmas, guider, sampler, phase_model = _official_graph(comfy_nodes, model, pos, neg)
    assert torch.equal(sigmas, torch.tensor(schedules.official_conditioning(), dtype=torch.float32))
    out = _run(comfy_nodes, guider, sampler, sigmas, latent)

    noise = _n(comfy_nodes, "RandomNoise").execute(0).args[0].generate_noise({"samples": latent})
    lora = _n(comfy_nodes, "LoraLoaderModelOnly")()
    merged = {p: lora.load_lora_model_only(model, f"{p}.safetensors", 1.0)[0] for p in ("slow", "fast")}
    fmt = model.model.latent_format
    expected = fmt.process_out(released_loop(comfy_nodes, merged, noise, pos, neg))
    assert torch.isfinite(out).all()
    assert _close(out, expected), f"max |diff| {float((out - expected).abs().max())}"

    swapped = fmt.process_out(
        released_loop(comfy_nodes, {"slow": merged["fast"], "fast": merged["slow"]}, noise, pos, neg)
    )
    assert not _close(out, swapped, 1e-3)
    euler = _n(comfy_nodes, "KSamplerSelect").execute("euler").args[0]  # the consistent stepping of the same sigmas
    consistent = _run(comfy_nodes, guider, euler, sigmas, latent)
    assert not _close(consistent, expected, 1e-3)


def test_both_phases_run_with_their_expert(comfy_nodes, qwen):
    """The loader sees the conditioning sigmas: 5 calls at sigma >= 0.9 (Slow), 5 below (Fast)."""
    from glance_core import experts

    model, pos, neg, latent = qwen
    sigmas, guider, sampler, phase_model = _official_graph(comfy_nodes, model, pos, neg, cfg=1.0)
    _run(comfy_nodes, guider, sampler, sigmas, latent)
    (phase,) = experts.phase_loras(phase_model)
    assert phase.counts == {"slow": 5, "fast": 5}
    assert sigmas[4] > phase.boundary > sigmas[5]


def test_split_sigmas_run_the_two_pipelines_separately(comfy_nodes, qwen):
    """SplitSigmas at 5 into two SamplerCustomAdvanced runs (the second without noise) = one run."""
    model, pos, neg, latent = qwen
    sigmas, guider, sampler, _ = _official_graph(comfy_nodes, model, pos, neg)
    whole = _run(comfy_nodes, guider, sampler, sigmas, latent)
    high, low = _n(comfy_nodes, "SplitSigmas").execute(sigmas, 5).args
    half = _run(comfy_nodes, guider, sampler, high, latent)
    assert _close(_run(comfy_nodes, guider, sampler, low, half, add_noise=False), whole)


def test_other_sigmas_are_refused_with_the_fix(comfy_nodes, qwen):
    model, pos, neg, latent = qwen
    sigmas, guider, sampler, _ = _official_graph(comfy_nodes, model, pos, neg, preset="glance_qwen_image")
    with pytest.raises(ValueError, match=f"preset to {schedules.OFFICIAL_PRESET}"):  # the pack's GlanceError
        _run(comfy_nodes, guider, sampler, sigmas, latent)
