"""Phase-Aware LoRA Loader: bad numbers and bad files are named errors at load time (never a black or silently
unchanged image), the default boundary follows the model, and the graphs users build around it (a style LoRA
before or after it, img2img / denoise < 1 / a second pass below the boundary) pick the expert by sigma."""

from __future__ import annotations

import math

import pytest
import torch
from tests_helpers import model_state, same_state, sample


def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def phase(comfy_nodes, model, slow, fast, boundary, slow_strength=1.0, fast_strength=1.0):
    node = _n(comfy_nodes, "PhaseAwareLoRALoader")
    return node.execute(model, slow, fast, slow_strength, fast_strength, boundary).args[0]


def stock_lora(comfy_nodes, model, name, strength=1.0):
    return _n(comfy_nodes, "LoraLoaderModelOnly")().load_lora_model_only(model, name, strength)[0]


def close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= tol * scale


# --- Numbers: NaN / inf never pass ------------------------------------------------------------------
def test_non_finite_numbers_are_named_errors_before_any_file_is_read(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    tiny.save_lora(loras_dir / "ok.safetensors", tiny.glance_lora("flux", 1))
    # "missing.safetensors" would be a file error: the number is checked first (no LoRA load for a bad number).
    for kwargs, needle in (
        (dict(slow_strength=math.nan), "slow_strength must be a finite number"),
        (dict(fast_strength=math.inf), "fast_strength must be a finite number"),
        (dict(fast_strength=-math.inf), "fast_strength must be a finite number"),
        (dict(boundary=math.nan), "boundary_sigma must be a finite number"),
        (dict(boundary=-0.5), "boundary_sigma must be a finite number >= 0, or -1 for auto"),
    ):
        args = dict(slow="missing.safetensors", fast="ok.safetensors", boundary=0.5) | kwargs
        with pytest.raises(ValueError, match=needle):
            phase(comfy_nodes, model, **args)


# --- Files: broken values, mismatched factors, LoRAs for another model size -----------------------
def _broken_files(tiny) -> dict[str, tuple[dict, str]]:
    """name → (state dict, the error it must raise); every one "loaded" without an error before."""
    files = {}
    q = "transformer.transformer_blocks.0.attn.to_q"
    nan = tiny.glance_lora("flux", 1)
    nan[f"{q}.lora.up.weight"] = nan[f"{q}.lora.up.weight"].clone()
    nan[f"{q}.lora.up.weight"][3, 1] = math.nan
    files["nan_value"] = (nan, rf"nan_value\.safetensors.*{q}\.lora\.up\.weight.*NaN or inf")
    big = tiny.glance_lora("flux", 1)
    big[f"{q}.lora.down.weight"] = big[f"{q}.lora.down.weight"].clone()
    big[f"{q}.lora.down.weight"][0, 0] = 1e30
    files["overflow"] = (big, rf"overflow\.safetensors.*{q}\.lora\.down\.weight.*magnitude 1e\+30")
    alpha = tiny.native_lora("flux", 1)
    alpha_key = next(k for k in sorted(alpha) if k.endswith(".alpha"))
    alpha[alpha_key] = torch.tensor(math.nan)
    files["nan_alpha"] = (alpha, rf"nan_alpha\.safetensors.*{alpha_key}.*NaN or inf")
    ranks = tiny.glance_lora("flux", 1)
    ranks[f"{q}.lora.up.weight"] = ranks[f"{q}.lora.up.weight"][:, :3].contiguous()  # rank 3 up, rank 4 down
    files["ranks"] = (ranks, r"ranks\.safetensors.*img_attn\.qkv.*rank 3.*rank 4.*same rank")
    # A LoRA for a wider FLUX (hidden 96) that only hits the fused q/k/v of a block: ComfyUI logged the shape
    # error and left the weight unchanged, so it "loaded" and changed nothing.
    wider = {}
    for p in ("to_q", "to_k", "to_v"):
        wider[f"transformer.transformer_blocks.0.attn.{p}.lora.down.weight"] = torch.randn(4, 96)
        wider[f"transformer.transformer_blocks.0.attn.{p}.lora.up.weight"] = torch.randn(96, 4)
    files["wider_qkv"] = (wider, r"wider_qkv\.safetensors' does not fit .*img_attn\.qkv.*\[96, 96\].*\[64, 64\]")
    flat = {
        f"{q}.lora.down.weight": torch.randn(64),  # 1-D factors
        f"{q}.lora.up.weight": torch.randn(64),
    }
    files["flat"] = (flat, r"flat\.safetensors' does not fit .*img_attn\.qkv.*must be matrices")
    proj = "diffusion_model.double_blocks.0.img_attn.proj"
    files["diff_shape"] = (
        {f"{proj}.diff": torch.randn(96, 64)},
        r"diff_shape\.safetensors' does not fit .*img_attn\.proj.*\[96, 64\].*\[64, 64\]",
    )
    loha = {f"{proj}.hada_w1_a": torch.randn(96, 2), f"{proj}.hada_w1_b": torch.randn(2, 64)}
    loha |= {f"{proj}.hada_w2_a": torch.randn(96, 2), f"{proj}.hada_w2_b": torch.randn(2, 64)}
    files["loha_shape"] = (loha, r"loha_shape\.safetensors' does not fit .*img_attn\.proj.*could not apply")
    return files


def test_broken_and_misfit_lora_files_are_named_errors(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    state = model_state(model)
    tiny.save_lora(loras_dir / "ok.safetensors", tiny.glance_lora("flux", 2))
    for name, (sd, msg) in _broken_files(tiny).items():
        tiny.save_lora(loras_dir / f"{name}.safetensors", sd)
        with pytest.raises(ValueError, match=msg):
            phase(comfy_nodes, model, "ok.safetensors", f"{name}.safetensors", 0.5)
    assert same_state(model, state)


def test_a_lora_model_input_gets_the_same_checks(comfy_nodes, tiny):
    """LORA_MODEL from another node (e.g. a trainer whose run diverged) is checked like a file."""
    model = tiny.build("flux", 0)
    node = _n(comfy_nodes, "PhaseAwareLoRALoader")
    sd, _ = _broken_files(tiny)["nan_value"]
    with pytest.raises(ValueError, match=r"Slow LoRA: LoRA 'slow_lora_model'.*NaN or inf"):
        node.execute(model, "None", "None", 1.0, 1.0, 0.5, slow_lora_model=sd)


def test_dense_adapters_past_the_size_limit_are_refused(comfy_nodes, glance, tiny, loras_dir, monkeypatch):
    model = tiny.build("flux", 0)
    proj = "diffusion_model.double_blocks.0.img_attn.proj"
    g = torch.Generator().manual_seed(0)
    loha = {f"{proj}.hada_w1_a": torch.randn(64, 2, generator=g), f"{proj}.hada_w1_b": torch.randn(2, 64, generator=g)}
    loha |= {f"{proj}.hada_w2_a": torch.randn(64, 2, generator=g), f"{proj}.hada_w2_b": torch.randn(2, 64, generator=g)}
    tiny.save_lora(loras_dir / "loha.safetensors", loha)
    phase(comfy_nodes, model, "loha.safetensors", "None", 0.5)  # within the limit: loads
    # The limit scales with the model: a full-size LoKr/LoHa on every layer is many GiB. Shrink it to this layer.
    monkeypatch.setattr(glance.glance_core.experts, "MAX_DENSE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"loha\.safetensors.*1 layers.*dense.*LoraLoaderModelOnly"):
        phase(comfy_nodes, model, "loha.safetensors", "None", 0.5)


# --- The default boundary follows the connected model ---------------------------------------------
@pytest.mark.parametrize("arch,preset", [("flux", "glance_flux"), ("qwen_image", "glance_qwen_image")])
def test_unwired_boundary_is_the_models_own_preset_boundary(comfy_nodes, glance, tiny, loras_dir, arch, preset):
    """The default used to be Qwen's 0.9: on FLUX the 6th official sigma 0.92665 ran with the Slow expert."""
    node = _n(comfy_nodes, "PhaseAwareLoRALoader")
    boundary_input = next(i for i in node.define_schema().inputs if i.id == "boundary_sigma")
    assert boundary_input.default == -1.0
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora(arch, 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora(arch, 2))
    ours = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary_input.default)
    ph = glance.glance_core.experts.phase_loras(ours)[0]
    assert ph.boundary == glance.glance_core.schedules.preset(preset).boundary
    sigmas = torch.tensor(glance.glance_core.schedules.PRESETS[preset])
    sample(comfy_nodes, ours, sigmas, tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), tiny.latent(arch))
    assert ph.counts == {"slow": 5, "fast": 5}  # one evaluation (cond and uncond batched) per step


# --- A style LoRA stacked with the phase loader ----------------------------------------------------
def test_style_lora_before_or_after_applies_in_both_phases(comfy_nodes, tiny, loras_dir):
    arch = "flux"
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora(arch, 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora(arch, 2))
    tiny.save_lora(loras_dir / "style.safetensors", tiny.native_lora(arch, 7, std=0.3))
    pos, neg, latent = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), tiny.latent(arch)
    sigmas, boundary = _n(comfy_nodes, "SlowFastScheduler").execute(model, "glance_flux").args

    before = phase(
        comfy_nodes,
        stock_lora(comfy_nodes, model, "style.safetensors"),
        "slow.safetensors",
        "fast.safetensors",
        boundary,
    )
    after = stock_lora(
        comfy_nodes, phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary), "style.safetensors"
    )
    # The stock two-stage graph with the style LoRA in both stages.
    styled = stock_lora(comfy_nodes, model, "style.safetensors")
    high, low = _n(comfy_nodes, "SplitSigmas").execute(sigmas, 5).args
    half = sample(comfy_nodes, stock_lora(comfy_nodes, styled, "slow.safetensors"), high, pos, neg, latent)
    stock = sample(
        comfy_nodes, stock_lora(comfy_nodes, styled, "fast.safetensors"), low, pos, neg, half, add_noise=False
    )
    no_style = sample(
        comfy_nodes,
        phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary),
        sigmas,
        pos,
        neg,
        latent,
    )
    for m in (before, after):
        out = sample(comfy_nodes, m, sigmas, pos, neg, latent)
        assert close(out, stock), float((out - stock).abs().max())
    assert not close(no_style, stock, 1e-2), "the style LoRA must change the output"


# --- img2img / denoise < 1 / second pass: the expert is picked by sigma ---------------------------
def test_schedules_starting_below_the_boundary_run_fast_only(comfy_nodes, glance, tiny, loras_dir):
    arch = "flux"
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora(arch, 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora(arch, 2))
    pos, neg = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2)
    image = torch.randn(tiny.latent(arch).shape, generator=torch.Generator().manual_seed(4))  # an encoded image
    sigmas, boundary = _n(comfy_nodes, "SlowFastScheduler").execute(model, "glance_flux").args
    ours = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary)
    fast_only = stock_lora(comfy_nodes, model, "fast.safetensors")
    ph = glance.glance_core.experts.phase_loras(ours)[0]

    # SplitSigmas low half (a second / hires pass over an image).
    _, low = _n(comfy_nodes, "SplitSigmas").execute(sigmas, 5).args
    a = sample(comfy_nodes, ours, low, pos, neg, image)
    assert ph.counts["slow"] == 0 and ph.counts["fast"] > 0
    assert close(a, sample(comfy_nodes, fast_only, low, pos, neg, image))

    # KSampler img2img at denoise 0.6: its sigmas start well below the boundary.
    ks = _n(comfy_nodes, "KSampler")()
    b = ks.sample(ours, 3, 8, 3.0, "euler", "simple", pos, neg, {"samples": image}, denoise=0.6)[0]["samples"]
    assert ph.counts["slow"] == 0 and ph.counts["fast"] > 0
    c = ks.sample(fast_only, 3, 8, 3.0, "euler", "simple", pos, neg, {"samples": image}, denoise=0.6)[0]["samples"]
    assert close(b, c)


def test_arcflow_adapter_lora_part_gets_the_same_checks(comfy_nodes, tiny, loras_dir):
    """The ArcFlow loader merges its adapter's LoRA through the same parser: a NaN value or a LoRA part for
    another model size is a named error there too, not a black or silently unchanged image."""
    model = tiny.build("flux", 0)
    node = _n(comfy_nodes, "ArcFlowLoader")
    good = tiny.arcflow_adapter("flux", 3)
    lora_key = "single_transformer_blocks.0.proj_out.lora_B.weight"  # → single_blocks.0.linear2 [64, 320]
    nan = dict(good)
    nan[lora_key] = good[lora_key].clone()
    nan[lora_key][0, 0] = math.nan
    tiny.save_lora(loras_dir / "arc_nan.safetensors", nan)
    with pytest.raises(ValueError, match=rf"arc_nan\.safetensors.*{lora_key}.*NaN or inf"):
        node.execute(model, "arc_nan.safetensors")
    wide = dict(good)
    wide[lora_key] = torch.randn(96, good[lora_key].shape[1])
    tiny.save_lora(loras_dir / "arc_wide.safetensors", wide)
    with pytest.raises(ValueError, match=r"arc_wide\.safetensors' does not fit .*linear2.*\[96, 320\].*\[64, 320\]"):
        node.execute(model, "arc_wide.safetensors")


@pytest.mark.parametrize("max_shift", [math.nan, math.inf])
def test_custom_schedule_of_a_model_with_a_broken_shift_is_a_named_error(comfy_nodes, tiny, max_shift):
    """A NaN/inf shift in a ModelSampling node before the scheduler made NaN sigmas (and a NaN boundary) that
    failed later as "non-descending sigmas": the scheduler now names the shift."""
    model = tiny.build("flux", 0)
    patched = _n(comfy_nodes, "ModelSamplingFlux")().patch(model, max_shift, 0.5, 1024, 1024)[0]
    with pytest.raises(ValueError, match=r"unusable schedule.*ModelSampling node.*shift"):
        _n(comfy_nodes, "SlowFastScheduler").execute(patched, "custom", 50, 5, 2, 5, 0.0)
