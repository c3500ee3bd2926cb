"""PhaseAwareLoRALoader and SlowFastScheduler inside real ComfyUI sampling (tiny FLUX / Qwen-Image)."""

from __future__ import annotations

import math

import pytest
import torch
from tests_helpers import model_state, same_state, sample

ARCHS = ["flux", "qwen_image"]
PRESET = {"flux": "glance_flux", "qwen_image": "glance_qwen_image"}


# --- helpers: stock ComfyUI nodes, called as the executor would -------------------------------
def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def stock_lora(comfy_nodes, model, name, strength=1.0):
    return _n(comfy_nodes, "LoraLoaderModelOnly")().load_lora_model_only(model, name, strength)[0]


def phase(comfy_nodes, model, slow, fast, boundary, slow_strength=1.0, fast_strength=1.0):
    node = _n(comfy_nodes, "PhaseAwareLoRALoader")
    return node.execute(model, slow, fast, slow_strength, fast_strength, boundary).args[0]


def scheduler(comfy_nodes, model, preset, **custom):
    out = _n(comfy_nodes, "SlowFastScheduler").execute(model, preset, **custom).args
    return out[0], out[1]


def close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= tol * scale


@pytest.fixture
def setup(comfy_nodes, tiny, loras_dir, request):
    arch = request.param
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora(arch, 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora(arch, 2))
    pos, neg = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2)
    return arch, model, pos, neg, tiny.latent(arch)


# --- SlowFastScheduler -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_scheduler_presets_are_exact(comfy_nodes, tiny, arch):
    from glance_core import schedules

    model = tiny.build(arch, 0)
    for name in schedules.PRESETS:
        sigmas, boundary = scheduler(comfy_nodes, model, name)
        assert sigmas.dtype == torch.float32
        assert torch.equal(sigmas, torch.tensor(schedules.PRESETS[name], dtype=torch.float32))
        assert sigmas[4] > boundary > sigmas[5]


def test_scheduler_custom_mode_derives_official_lists_from_model_sampling(comfy_nodes, tiny):
    from glance_core import schedules

    flux = tiny.build("flux", 0)  # ComfyUI's FLUX sampling: mu 1.15 = 1024²
    sig, _ = scheduler(
        comfy_nodes, flux, "custom", base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5, shift_terminal=0.0
    )
    assert (sig - torch.tensor(schedules.PRESETS["glance_flux"])).abs().max() < 5e-6
    # Qwen-Image at 1024²: diffusers' mu 0.69355 (seq 4096 of 256..8192) and a 0.02 terminal stretch,
    # expressed with ComfyUI's own ModelSamplingFlux node.
    qwen = tiny.build("qwen_image", 0)
    mu = schedules.PRESET_SOURCES["glance_qwen_image"]["mu"]
    qwen = _n(comfy_nodes, "ModelSamplingFlux")().patch(qwen, mu, 0.5, 1024, 1024)[0]
    sig, boundary = scheduler(
        comfy_nodes, qwen, "custom", base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5, shift_terminal=0.02
    )
    assert (sig - torch.tensor(schedules.PRESETS["glance_qwen_image"])).abs().max() < 5e-6
    assert sig[4] > boundary > sig[5]


def test_scheduler_refuses_non_flow_model(comfy_nodes, tiny):
    eps = _n(comfy_nodes, "ModelSamplingDiscrete")().patch(tiny.build("flux", 0), "eps", False)[0]
    with pytest.raises(ValueError, match="flow-matching model"):
        scheduler(comfy_nodes, eps, "glance_flux")


# --- Equivalence with the stock graphs ---------------------------------------------------------
@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_one_run_equals_stock_two_stage_graph(comfy_nodes, setup):
    arch, model, pos, neg, latent = setup
    sigmas, boundary = scheduler(comfy_nodes, model, PRESET[arch])
    ours_model = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary)
    ours = sample(comfy_nodes, ours_model, sigmas, pos, neg, latent)

    high, low = _n(comfy_nodes, "SplitSigmas").execute(sigmas, 5).args
    half = sample(comfy_nodes, stock_lora(comfy_nodes, model, "slow.safetensors"), high, pos, neg, latent)
    stock = sample(
        comfy_nodes, stock_lora(comfy_nodes, model, "fast.safetensors"), low, pos, neg, half, add_noise=False
    )
    base = sample(comfy_nodes, model, sigmas, pos, neg, latent)
    assert close(ours, stock), float((ours - stock).abs().max())
    assert not close(ours, base, 1e-2), "the LoRAs must change the output"


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_boundary_extremes_are_single_expert_runs(comfy_nodes, setup):
    arch, model, pos, neg, latent = setup
    sigmas, _ = scheduler(comfy_nodes, model, PRESET[arch])
    for boundary, name in ((0.0, "slow.safetensors"), (1.01, "fast.safetensors")):
        ours = sample(
            comfy_nodes,
            phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary),
            sigmas,
            pos,
            neg,
            latent,
        )
        stock = sample(comfy_nodes, stock_lora(comfy_nodes, model, name), sigmas, pos, neg, latent)
        assert close(ours, stock), (boundary, float((ours - stock).abs().max()))


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_zero_strength_and_none_are_the_base_model(comfy_nodes, setup):
    arch, model, pos, neg, latent = setup
    sigmas, boundary = scheduler(comfy_nodes, model, PRESET[arch])
    base = sample(comfy_nodes, model, sigmas, pos, neg, latent)
    zero = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary, 0.0, 0.0)
    none = phase(comfy_nodes, model, "None", "None", boundary)
    assert torch.equal(sample(comfy_nodes, zero, sigmas, pos, neg, latent), base)
    assert torch.equal(sample(comfy_nodes, none, sigmas, pos, neg, latent), base)
    # Strength scales the delta like the stock loader's strength does.
    half = phase(comfy_nodes, model, "slow.safetensors", "slow.safetensors", boundary, 0.5, 0.5)
    stock_half = stock_lora(comfy_nodes, model, "slow.safetensors", 0.5)
    assert close(
        sample(comfy_nodes, half, sigmas, pos, neg, latent), sample(comfy_nodes, stock_half, sigmas, pos, neg, latent)
    )


@pytest.mark.parametrize("setup", ARCHS, indirect=True)
def test_multistep_sampler_keeps_its_state_across_the_switch(comfy_nodes, glance, setup):
    """KSampler + dpmpp_2m: one pass with a switch in the middle. With the same LoRA in both slots
    the run must equal a plain single-LoRA run: nothing restarts the sampler at the switch."""
    arch, model, pos, neg, latent = setup
    ks = _n(comfy_nodes, "KSampler")()
    basic = _n(comfy_nodes, "BasicScheduler").execute(model, "simple", 10, 1.0).args[0]
    boundary = float(basic[4] + basic[5]) / 2
    same = phase(comfy_nodes, model, "slow.safetensors", "slow.safetensors", boundary)
    a = ks.sample(same, 7, 10, 3.0, "dpmpp_2m", "simple", pos, neg, {"samples": latent})[0]["samples"]
    b = ks.sample(
        stock_lora(comfy_nodes, model, "slow.safetensors"),
        7,
        10,
        3.0,
        "dpmpp_2m",
        "simple",
        pos,
        neg,
        {"samples": latent},
    )[0]["samples"]
    assert close(a, b)
    counts = glance.glance_core.experts.phase_loras(same)[0].counts
    assert counts["slow"] > 0 and counts["fast"] > 0 and counts["slow"] + counts["fast"] >= 10
    two = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary)
    ks.sample(two, 7, 10, 3.0, "dpmpp_2m", "simple", pos, neg, {"samples": latent})
    c = glance.glance_core.experts.phase_loras(two)[0].counts
    assert c["slow"] == c["fast"] and c["slow"] >= 5, c


# --- Every LoRA layout ComfyUI loads -----------------------------------------------------------
LAYOUTS = [
    ("flux", "glance"),
    ("flux", "comfy"),
    ("flux", "kohya"),
    ("flux", "diff"),
    ("qwen_image", "glance"),
    ("qwen_image", "comfy"),
    ("qwen_image", "kohya"),
    ("qwen_image", "peft"),
    ("qwen_image", "diff"),
]


def _layout_sd(tiny, arch, layout):
    if layout == "glance":
        return tiny.glance_lora(arch, 5)
    if layout == "peft":
        return tiny.peft_lora(arch, 5)
    if layout == "diff":  # full-weight and bias differences: ComfyUI's "diff" patches
        name = "double_blocks.0.img_attn.proj" if arch == "flux" else "transformer_blocks.0.attn.to_out.0"
        g = torch.Generator().manual_seed(3)
        shape = tiny.model_shapes(arch)[name + ".weight"]
        return {
            f"diffusion_model.{name}.diff": 0.05 * torch.randn(shape, generator=g),
            f"diffusion_model.{name}.diff_b": 0.05 * torch.randn(shape[0], generator=g),
        }
    return tiny.native_lora(arch, 5, style=layout)


@pytest.mark.parametrize("arch,layout", LAYOUTS)
def test_every_layout_matches_stock_loader(comfy_nodes, tiny, loras_dir, arch, layout):
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "x.safetensors", _layout_sd(tiny, arch, layout))
    pos, neg, latent = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), tiny.latent(arch)
    sigmas, _ = scheduler(comfy_nodes, model, PRESET[arch])
    ours = sample(comfy_nodes, phase(comfy_nodes, model, "x.safetensors", "None", 0.0), sigmas, pos, neg, latent)
    stock = sample(comfy_nodes, stock_lora(comfy_nodes, model, "x.safetensors"), sigmas, pos, neg, latent)
    base = sample(comfy_nodes, model, sigmas, pos, neg, latent)
    assert close(ours, stock), float((ours - stock).abs().max())
    assert not torch.equal(ours, base)


# --- Bad input ---------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors_and_change_nothing(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    state = model_state(model)
    tiny.save_lora(loras_dir / "ok.safetensors", tiny.glance_lora("flux", 1))
    tiny.save_lora(loras_dir / "qwen.safetensors", tiny.glance_lora("qwen_image", 1))
    tiny.save_lora(
        loras_dir / "sd15.safetensors",
        {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{ud}.weight": torch.zeros(4, 4) for ud in ("up", "down")},
    )
    wide = tiny.glance_lora("flux", 1)
    wide["transformer.transformer_blocks.0.attn.to_q.lora.down.weight"] = torch.zeros(4, 96)
    tiny.save_lora(loras_dir / "wide.safetensors", wide)
    partial = dict(tiny.glance_lora("flux", 1))
    partial.update({f"transformer.nonexistent_{i}.lora_A.weight": torch.zeros(4, 8) for i in range(3)})
    tiny.save_lora(loras_dir / "partial.safetensors", partial)
    torch.save({"a": torch.zeros(1)}, loras_dir / "pickled.pt")
    (loras_dir / "broken.safetensors").write_bytes(b"\x00" * 64)

    cases = [
        ("sd15.safetensors", 0.9, r"sd15\.safetensors.*matches no layer.*2 of 2 keys unmatched"),
        ("qwen.safetensors", 0.9, r"qwen\.safetensors.*16 of 48 keys match no layer"),
        ("wide.safetensors", 0.9, r"wide\.safetensors.*does not fit .*img_attn\.qkv.*\[64, 96\].*\[64, 64\]"),
        ("partial.safetensors", 0.9, r"partial\.safetensors.*3 of 31 keys match no layer"),
        ("missing.safetensors", 0.9, r"missing\.safetensors.*not found"),
        ("pickled.pt", 0.9, r"not a \.safetensors file"),
        ("broken.safetensors", 0.9, r"broken\.safetensors is not a readable safetensors file"),
        ("../escape.safetensors", 0.9, r"outside the loras folder"),
        ("ok.safetensors", -0.1, r"boundary_sigma must be a finite number >= 0"),
        ("ok.safetensors", math.nan, r"boundary_sigma must be a finite number"),
        ("ok.safetensors", math.inf, r"boundary_sigma must be a finite number"),
    ]
    for name, boundary, msg in cases:
        with pytest.raises(ValueError, match=msg):
            phase(comfy_nodes, model, name, "ok.safetensors", boundary)
    eps = _n(comfy_nodes, "ModelSamplingDiscrete")().patch(model, "eps", False)[0]
    with pytest.raises(ValueError, match="flow-matching model"):
        phase(comfy_nodes, eps, "ok.safetensors", "ok.safetensors", 0.9)
    assert same_state(model, state)


# --- The base model stays bit-identical: after a run, an interrupt, an exception -----------------
def test_base_model_is_bit_identical_after_run_interrupt_and_exception(comfy_nodes, glance, tiny, loras_dir):
    import comfy.model_management as mm
    import comfy.sample

    arch = "flux"
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora(arch, 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora(arch, 2))
    pos, neg, latent = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), tiny.latent(arch)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas, boundary = scheduler(comfy_nodes, model, "glance_flux")

    def run(m, callback=None):
        return comfy.sample.sample_custom(
            m, noise, 3.0, comfy.samplers.sampler_object("euler"), sigmas, pos, neg, latent, callback=callback, seed=0
        )

    base_out = run(model)
    state = model_state(model)
    versions = {k: v._version for k, v in model.model.state_dict(keep_vars=True).items()}
    ours = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary)
    assert not ours.patches, "nothing is merged into the weights"
    lora_out = run(ours)
    assert not torch.equal(lora_out, base_out)
    # No weight was written during the run (in-place writes bump a tensor's version counter).
    assert {k: v._version for k, v in model.model.state_dict(keep_vars=True).items()} == versions

    def interrupt_at_3(step, *args):
        if step == 3:
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()

    def fail_at_6(step, *args):
        if step == 6:
            raise RuntimeError("boom")

    with pytest.raises(mm.InterruptProcessingException):
        run(ours, interrupt_at_3)
    assert torch.equal(run(model), base_out)
    with pytest.raises(RuntimeError, match="boom"):
        run(ours, fail_at_6)
    assert torch.equal(run(model), base_out)
    assert torch.equal(run(ours), lora_out), "the phase model still works after an interrupted run"
    mm.unload_all_models()
    assert same_state(model, state)
    assert all(not m._forward_hooks for m in model.model.modules()), "hooks are removed when unloaded"
    assert glance.glance_core.experts.phase_loras(ours)[0].active is None
