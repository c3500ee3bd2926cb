"""ArcFlow in the graphs users build (ModelSampling after the loader, combined / area / masked conditioning,
odd latent sizes, partial loading, fp8 weights), on "cuda" weights without a GPU, and on bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

ARCHS = ["flux", "qwen_image"]


def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def _mod(glance, name):
    return importlib.import_module(f"{glance.__name__}.glance_core.{name}")


def _load(comfy_nodes, tiny, loras_dir, arch, sd=None, name="arc.safetensors", model=None):
    model = model if model is not None else tiny.build(arch, 0)
    tiny.save_lora(loras_dir / name, sd if sd is not None else tiny.arcflow_adapter(arch, 3))
    return model, _n(comfy_nodes, "ArcFlowLoader").execute(model, name, 1.0, 3.2).args[0]


def _sample(comfy_nodes, model, cond, latent, sigmas=(1.0, 0.7619, 0.0), seed=0, sampler=None):
    """SamplerCustomAdvanced with BasicGuider and ArcFlow Sampler (or another SAMPLER)."""
    n = lambda name: _n(comfy_nodes, name)  # noqa: E731
    guider = n("BasicGuider").execute(model, cond).args[0]
    sampler = sampler or n("ArcFlowSampler").execute().args[0]
    noise = n("RandomNoise").execute(seed).args[0]
    out = n("SamplerCustomAdvanced").execute(noise, guider, sampler, torch.tensor(sigmas), {"samples": latent})
    return out.args[0]["samples"]


def _euler(comfy_nodes):
    return _n(comfy_nodes, "KSamplerSelect").execute("euler").args[0]


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_modelsampling_after_the_loader_keeps_the_arcflow_step(comfy_nodes, tiny, loras_dir, arch):
    """The stock Qwen-Image template puts ModelSamplingAuraFlow after the model loader: with it after the ArcFlow
    loader the heads must still decide the step (the old heads returned zeros there: output = input noise)."""
    model, arc = _load(comfy_nodes, tiny, loras_dir, arch)
    after = _n(comfy_nodes, "ModelSamplingAuraFlow")().patch_aura(arc, 3.2)[0]
    cond, latent = tiny.conditioning(arch, 1), tiny.latent(arch)
    ref = _sample(comfy_nodes, arc, cond, latent)
    out = _sample(comfy_nodes, after, cond, latent)
    assert _close(out, ref), float((out - ref).abs().max())
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))  # RandomNoise(0)
    assert float((out - noise).abs().mean()) > 0.1 * float(noise.abs().mean()), "the output is the input noise"
    assert _close(_sample(comfy_nodes, after, cond, latent, sampler=_euler(comfy_nodes)), ref)


def test_non_flow_modelsampling_after_the_loader_is_a_named_error(comfy_nodes, tiny, loras_dir):
    _, arc = _load(comfy_nodes, tiny, loras_dir, "qwen_image")
    eps = _n(comfy_nodes, "ModelSamplingDiscrete")().patch(arc, "eps", False)[0]
    cond, latent = tiny.conditioning("qwen_image", 1), tiny.latent("qwen_image")
    with pytest.raises(ValueError, match=r"ArcFlow models predict a flow velocity.*non-flow sampling \(EPS prediction"):
        _sample(comfy_nodes, eps, cond, latent)


@pytest.mark.parametrize("arch", ARCHS)
def test_combined_area_and_masked_conditioning(comfy_nodes, tiny, loras_dir, arch):
    """Conditioning Combine (one model call per entry, or one call with B × entries) and area/mask conditioning
    go through ComfyUI's own mixing: the ArcFlow Sampler equals KSampler-euler's route, and two copies of one
    caption equal the caption alone (the old sampler stepped with the last call's batch of B × entries)."""
    _, arc = _load(comfy_nodes, tiny, loras_dir, arch)
    c1, c2 = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2)
    latent = tiny.latent(arch, 64, 64)
    combine = _n(comfy_nodes, "ConditioningCombine")().combine
    area = _n(comfy_nodes, "ConditioningSetArea")().append(c2, 32, 24, 8, 16, 1.0)[0]
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:56] = 1.0
    masked = _n(comfy_nodes, "ConditioningSetMask")().append(c2, mask, "default", 1.0)[0]
    single = _sample(comfy_nodes, arc, c1, latent)
    assert _close(_sample(comfy_nodes, arc, combine(c1, c1)[0], latent), single)
    for cond in (combine(c1, c2)[0], combine(c1, area)[0], combine(c1, masked)[0]):
        out = _sample(comfy_nodes, arc, cond, latent)
        assert torch.isfinite(out).all() and out.shape == latent.shape
        assert _close(out, _sample(comfy_nodes, arc, cond, latent, sampler=_euler(comfy_nodes)))
        assert not _close(out, single, 1e-3), "the second entry takes part"


@pytest.mark.parametrize("arch", ARCHS)
def test_odd_latent_sizes(comfy_nodes, glance, tiny, loras_dir, arch):
    """Latents that are not a multiple of the 2×2 patch (ComfyUI pads them): each pixel's step is the closed form
    of its own policy, and the padding does not leak into the picture."""
    _, arc = _load(comfy_nodes, tiny, loras_dir, arch)
    cond, latent = tiny.conditioning(arch, 1), tiny.latent(arch, 72, 40)  # 9 × 5 latent
    out = _sample(comfy_nodes, arc, cond, latent)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert _close(out, _sample(comfy_nodes, arc, cond, latent, sampler=_euler(comfy_nodes)))
    # Each step moves x by exactly the closed form D(σ0 → σ1) of the policy the model call produced.
    import comfy.patcher_extension as pe
    import comfy.samplers

    am = _mod(glance, "arcflow_model")
    state = am.state_of(arc)
    seen = []

    def record(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append((args[0].clone(), state.raw))
        return out

    rec = arc.clone()
    rec.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "rec", record)
    guider = comfy.samplers.CFGGuider(rec)
    guider.set_conds(cond, [])
    guider.set_cfg(1.0)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    state.record = True
    try:
        arc_sampler = comfy.samplers.KSAMPLER(glance.glance_core.arcflow_sampler.sample)
        guider.sample(noise, latent, arc_sampler, torch.tensor([1.0, 0.7619, 0.0]), disable_pbar=True)
    finally:
        state.record = False
    (x0, raw0), (x1, _) = seen
    state.raw = raw0
    d = state.policy(x0).displacement(1.0, 0.7619)
    state.raw = None
    assert d.shape == x0.shape
    assert torch.allclose(x1, x0 - d, atol=1e-5)


@pytest.mark.parametrize("arch", ["flux"])
def test_partial_loading_casts_the_heads(comfy_nodes, glance, tiny, loras_dir, arch):
    """Under a low-VRAM budget ComfyUI loads part of the model and casts the rest per call; layers it cannot
    cast stay on the offload device and crash on a GPU. The heads and the new norm must be cast-capable and the
    partially loaded model must give the same step as the fully loaded one."""
    import comfy.model_management as mm

    _, arc = _load(comfy_nodes, tiny, loras_dir, arch)
    cond, latent = tiny.conditioning(arch, 1), tiny.latent(arch)
    mm.unload_all_models()
    heads, norm = arc.attachments[_mod(glance, "arcflow_model").STATE_KEY + "_modules"]
    ours = [*heads.heads.values(), norm.linear]
    loaded = mm.LoadedModel(arc)
    loaded.model_load(lowvram_model_memory=1)  # ComfyUI's own partial load, with a 1-byte budget
    try:
        assert arc.model.model_lowvram, "ComfyUI did not load the model partially"
        assert all(getattr(m, "comfy_cast_weights", False) for m in ours), "ArcFlow layers ComfyUI cannot cast"
        # Call the partially loaded model directly (the sampler would reload it fully on a CPU machine).
        opts = arc.model_options["transformer_options"]
        sig = torch.tensor([1.0, 0.7619, 0.0])
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

        def evaluate() -> torch.Tensor:
            return arc.model.apply_model(
                noise,
                sig[:1],
                c_crossattn=cond[0][0],
                y=cond[0][1]["pooled_output"],
                guidance=torch.full((1,), 3.5),
                transformer_options={**opts, "sample_sigmas": sig},
            )

        out = evaluate()
    finally:
        loaded.model_unload()
        mm.unload_all_models()
    mm.load_models_gpu([arc])  # fully loaded, the same call
    try:
        ref = evaluate()
    finally:
        mm.unload_all_models()
    assert not arc.model.model_lowvram
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    assert not torch.allclose(out, noise, atol=1e-2)


def test_fp8_base_weights(comfy_nodes, tiny, loras_dir):
    """A base model stored in fp8_e4m3fn (UNETLoader weight_dtype, computed in the manual-cast dtype)."""
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        _fp8_run(comfy_nodes, tiny, loras_dir)


def _fp8_run(comfy_nodes, tiny, loras_dir):
    import comfy.model_management as mm
    import comfy.model_patcher

    arch = "qwen_image"
    mc = tiny._config_class(arch)(tiny.runtime_config(arch))
    dev = mm.get_torch_device()
    fp8 = torch.float8_e4m3fn
    mc.set_inference_dtype(fp8, mm.unet_manual_cast(fp8, dev, mc.supported_inference_dtypes))  # as UNETLoader
    base = mc.get_model({})
    base.load_model_weights(tiny.state_dict(arch, 0), "")
    model = comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=mm.unet_offload_device())
    assert model.model.get_dtype() == fp8
    _, arc = _load(comfy_nodes, tiny, loras_dir, arch, model=model)
    _, ref = _load(comfy_nodes, tiny, loras_dir, arch, name="arc2.safetensors")
    cond, latent = tiny.conditioning(arch, 1), tiny.latent(arch)
    out = _sample(comfy_nodes, arc, cond, latent)
    full = _sample(comfy_nodes, ref, cond, latent)
    assert torch.isfinite(out).all()
    rel = float((out - full).norm() / full.norm())
    assert rel < 0.1, rel  # fp8 rounding of the base weights only


# ---------------------------------------------------------------------------------------------
# "cuda" weights on a CPU-only build: FakeTensorMode raises on any cpu/cuda mix
# ---------------------------------------------------------------------------------------------
def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _fake_params(mode, module: torch.nn.Module, device: torch.device) -> None:
    """Replace the module's parameters by fake tensors on ``device`` (what ComfyUI's loader would leave there)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                fake = mode.from_tensor(p.detach()).to(device)
                # no autograd on fake "cuda" leaves: the CPU build has no CUDA device guard for the graph
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_norm_and_step_on_cuda_inputs(comfy_nodes, glance, tiny, arch):
    """The heads and the norm keep their weights where the file put them (CPU) until ComfyUI moves or casts them;
    on "cuda" activations every tensor they and the closed form create must follow the input."""
    am = _mod(glance, "arcflow_model")
    model = tiny.build(arch, 0)
    m = model.clone()
    full = {k: v for k, v in tiny.arcflow_adapter(arch, 3).items() if "lora" not in k}
    state = am.attach_heads(m, full, 4, 3.2)
    heads, norm = m.attachments[am.STATE_KEY + "_modules"]
    hidden = full["norm_out.linear.weight"].shape[1]
    state.record = True
    with _fake_mode() as mode:
        cuda = torch.device("cuda", 0)
        _fake_params(mode, heads, cuda)  # where ComfyUI's loader puts them
        _fake_params(mode, norm, cuda)
        x = torch.empty(2, 8 * 8, hidden, device="cuda", dtype=torch.bfloat16)
        vec = torch.empty(2, hidden, device="cuda", dtype=torch.bfloat16)
        assert norm(vec).device.type == "cuda"
        state.step = 0.2381
        out = heads(x)
        assert out.device.type == "cuda" and out.shape == (2, 64, 16 * 4)
        lat = torch.empty((2, 16, 16, 16) if arch == "flux" else (2, 16, 1, 16, 16), device="cuda")
        d = state.policy(lat).displacement(1.0, 0.7619)
        assert d.device.type == "cuda" and d.shape == lat.shape
    state.record, state.raw, state.step = False, None, None


def test_distiller_iteration_on_cuda(comfy_nodes, glance, tiny):
    """One distillation iteration (noise, intermediate states, the student's velocities and the loss; autograd on
    fake "cuda" tensors needs a real CUDA runtime, so no backward here) with the model on "cuda": the noise drawn
    from the seeded CPU generator must be moved to the model's device (the old distiller kept it on the CPU)."""
    am, distill = _mod(glance, "arcflow_model"), _mod(glance, "arcflow_distill")
    arch = "flux"
    model = tiny.build(arch, 0)
    m = model.clone()
    gen = torch.Generator().manual_seed(0)
    state = am.attach_heads(m, distill.initial_heads(model, 4, gen), 4, 3.2, trainable=True)
    heads, _ = m.attachments[am.STATE_KEY + "_modules"]
    noise, fractions = distill.draw(gen, (2, 16, 8, 8), 2, 2)
    sched = [1.0, 0.7619, 0.0]
    with _fake_mode() as mode:
        cuda = torch.device("cuda", 0)
        _fake_params(mode, heads, cuda)  # trainable heads live on the load device
        noise = mode.from_tensor(noise)  # drawn on the CPU from the seeded generator
        hidden = torch.empty(2, 16, 64, device="cuda")

        def student(x, sigma, grad):
            state.record = True
            with torch.enable_grad() if grad else torch.no_grad():
                heads(hidden * sigma)
            pol = state.policy(x)
            state.record, state.raw = False, None
            return pol

        losses = distill.iteration(
            noise, fractions, sched, 0.5, cuda, lambda x, s: x * s, student, backward=lambda loss: None
        )
        assert [v.device.type for v in losses] == ["cuda", "cuda"]


# ---------------------------------------------------------------------------------------------
# Bad input: named errors, before any expensive work
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("proj_out_means.bias", float("nan"), r"'proj_out_means\.bias' holds 1 NaN or inf"),
        ("norm_out.linear.weight", float("inf"), r"'norm_out\.linear\.weight' holds 1 NaN or inf"),
        ("proj_out_means.bias", 1e30, r"'proj_out_means\.bias' holds a value of magnitude 1e\+30"),
        (
            "LORA",
            float("nan"),
            r"'(transformer\.)?single_transformer_blocks\.0\.proj_mlp\.lora_B\.weight' holds 1 NaN or inf",
        ),
    ],
)
def test_non_finite_adapter_tensors_are_refused_by_name(comfy_nodes, tiny, loras_dir, key, value, msg):
    model = tiny.build("flux", 0)
    sd = tiny.arcflow_adapter("flux", 3)
    key = next(k for k in sorted(sd) if "lora_B" in k) if key == "LORA" else key
    sd[key] = sd[key].clone().reshape(-1)
    sd[key][0] = value
    sd[key] = sd[key].reshape(tiny.arcflow_adapter("flux", 3)[key].shape)
    tiny.save_lora(loras_dir / "bad.safetensors", sd)
    with pytest.raises(ValueError, match=r"bad\.safetensors'?: tensor " + msg):
        _n(comfy_nodes, "ArcFlowLoader").execute(model, "bad.safetensors", 1.0, 3.2)


def test_overflowing_log_gamma_is_a_named_error_not_a_black_image(comfy_nodes, tiny, loras_dir):
    sd = tiny.arcflow_adapter("qwen_image", 3)
    sd["proj_out_loggamma.bias"] = torch.full_like(sd["proj_out_loggamma.bias"], 1000.0)  # γ = e^1000
    _, arc = _load(comfy_nodes, tiny, loras_dir, "qwen_image", sd)
    cond, latent = tiny.conditioning("qwen_image", 1), tiny.latent("qwen_image")
    with pytest.raises(ValueError, match=r"step σ 1 → 0\.7619 is not finite.*log-γ"):
        _sample(comfy_nodes, arc, cond, latent)
    ks = _n(comfy_nodes, "KSampler")()
    with pytest.raises(ValueError, match=r"not finite.*log-γ"):
        ks.sample(arc, 0, 2, 1.0, "euler", "simple", cond, cond, {"samples": latent})


def test_loader_refuses_non_finite_settings(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    tiny.save_lora(loras_dir / "arc.safetensors", tiny.arcflow_adapter("flux", 3))
    loader = _n(comfy_nodes, "ArcFlowLoader")
    with pytest.raises(ValueError, match=r"strength must be a finite number \(got nan\)"):
        loader.execute(model, "arc.safetensors", float("nan"), 3.2)
    with pytest.raises(ValueError, match=r"shift must be a finite number \(got inf\)"):
        loader.execute(model, "arc.safetensors", 1.0, float("inf"))


def test_sampler_errors_summarise_the_sigmas_and_name_the_nodes(comfy_nodes, tiny, loras_dir):
    model, arc = _load(comfy_nodes, tiny, loras_dir, "flux")
    cond, latent = tiny.conditioning("flux", 1), tiny.latent("flux")
    sigmas = torch.linspace(1.0, 0.0, 10000)
    sigmas[5000] = 0.9
    with pytest.raises(ValueError) as err:
        _sample(comfy_nodes, arc, cond, latent, sigmas=tuple(sigmas.tolist()))
    text = str(err.value)
    assert len(text) < 600, len(text)
    assert "10000 sigmas" in text and "stop descending at index 5000" in text
    with pytest.raises(ValueError, match=r"finite.*nan"):
        _sample(comfy_nodes, arc, cond, latent, sigmas=(1.0, float("nan"), 0.0))
    with pytest.raises(ValueError) as err:
        _sample(comfy_nodes, model, cond, latent)
    assert "ArcFlow Adapter Loader" in str(err.value) and "ArcFlow Distiller" in str(err.value)
    assert "objective" not in str(err.value)


def test_distiller_refuses_bad_settings_before_any_work(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    pos = tiny.conditioning("flux", 1)
    distiller = _n(comfy_nodes, "ArcFlowDistiller")
    cases = [
        (dict(resolution=72), r"resolution 72 is not a multiple of 16 px.*use 64 or 80"),
        (dict(resolution=24), r"resolution 24 .* at least 32"),
        (dict(learning_rate=float("nan")), r"learning_rate must be a finite number > 0 \(got nan\)"),
        (dict(shift=float("nan")), r"shift must be a finite number"),
        (dict(cfg=float("inf")), r"cfg must be a finite number"),
    ]
    for change, msg in cases:
        args = dict(iterations=2, steps=2, components=4, rank=2, learning_rate=1e-3, batch=1, resolution=64, seed=0)
        args.update(change)
        with pytest.raises(ValueError, match=msg):
            distiller.execute(model, pos, save_name="never", **args)
        assert not (loras_dir / "never.safetensors").exists()


def _mixed_precision_model(tiny, arch: str, quantize: str):
    """The tiny model as a mixed-precision checkpoint loads: layers matching ``quantize`` stored as scaled
    float8_e4m3fn with per-layer ``comfy_quant`` metadata, built with ComfyUI's mixed-precision Linear class."""
    import json
    import re

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    sd = tiny.state_dict(arch, 0)
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for key in [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2 and re.search(quantize, k)]:
        w = sd.pop(key)
        scale = w.abs().max() / 448.0
        prefix = key[: -len("weight")]
        sd[key] = (w / scale).to(torch.float8_e4m3fn)
        sd[prefix + "weight_scale"] = scale.reshape(())
        sd[prefix + "comfy_quant"] = conf
    mc = tiny._config_class(arch)(tiny.runtime_config(arch))
    mc.set_inference_dtype(torch.float32, None)
    mc.custom_operations = comfy.ops.mixed_precision_ops({}, torch.float32)
    model = mc.get_model({})
    model.load_model_weights(sd, "")
    dev = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=mm.unet_offload_device())


def test_mixed_precision_linear_layers(comfy_nodes, glance, tiny, loras_dir):
    """Newer ComfyUI loads quantized checkpoints with a mixed-precision Linear class (not a torch Linear, weights
    as QuantizedTensor): the loader, the sampler and the distiller's head initialisation must take it."""
    import comfy.ops

    if not hasattr(comfy.ops, "_load_quantized_module"):
        pytest.skip("this ComfyUI has no per-layer quantized checkpoints")
    arch = "qwen_image"
    with torch.inference_mode():
        model = _mixed_precision_model(tiny, arch, r"^(proj_out|norm_out\.linear|transformer_blocks\.\d+\.img_mlp)")
        proj = model.get_model_object("diffusion_model.proj_out")
        assert not isinstance(proj, torch.nn.Linear) and type(proj.weight).__name__ == "QuantizedTensor"
        _, arc = _load(comfy_nodes, tiny, loras_dir, arch, model=model)
        _, ref = _load(comfy_nodes, tiny, loras_dir, arch, name="arc2.safetensors")
        cond, latent = tiny.conditioning(arch, 1), tiny.latent(arch)
        out, full = _sample(comfy_nodes, arc, cond, latent), _sample(comfy_nodes, ref, cond, latent)
    assert torch.isfinite(out).all()
    assert float((out - full).norm() / full.norm()) < 0.1  # fp8 rounding of the quantized layers only
    heads = _mod(glance, "arcflow_distill").initial_heads(model, 4, torch.Generator().manual_seed(0))
    dense = proj.weight.dequantize().float()
    assert torch.allclose(heads["proj_out_means.weight"][: dense.shape[0]], dense)


def test_arcflow_model_as_input_is_a_named_error(comfy_nodes, tiny, loras_dir):
    """A second ArcFlow loader, or the distiller, on a model that already has heads (the old code raised a raw
    AttributeError: the heads have no ``in_features``)."""
    _, arc = _load(comfy_nodes, tiny, loras_dir, "flux")
    with pytest.raises(ValueError, match=r"ArcFlow Adapter Loader: this model already has ArcFlow heads"):
        _n(comfy_nodes, "ArcFlowLoader").execute(arc, "arc.safetensors", 1.0, 3.2)
    args = dict(iterations=2, steps=2, components=4, rank=2, learning_rate=1e-3, batch=1, resolution=64, seed=0)
    with pytest.raises(ValueError, match=r"ArcFlow Distiller: this model already has ArcFlow heads"):
        _n(comfy_nodes, "ArcFlowDistiller").execute(arc, tiny.conditioning("flux", 1), **args)
