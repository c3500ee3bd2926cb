"""ArcFlow adapters and the ArcFlow sampler in real ComfyUI (tiny FLUX / Qwen-Image)."""

from __future__ import annotations

import pytest
import torch

ARCHS = ["flux", "qwen_image"]


def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


@pytest.fixture
def arc(comfy_nodes, tiny, loras_dir, request):
    arch = request.param
    model = tiny.build(arch, 0)
    tiny.save_lora(loras_dir / "arc.safetensors", tiny.arcflow_adapter(arch, 3))
    arc_model = _n(comfy_nodes, "ArcFlowLoader").execute(model, "arc.safetensors", 1.0, 3.2).args[0]
    return arch, model, arc_model


def _arcflow_run(comfy_nodes, model, sigmas, pos, latent, seed=0):
    n = lambda name: _n(comfy_nodes, name)  # noqa: E731
    guider = n("BasicGuider").execute(model, pos).args[0]
    sampler = n("ArcFlowSampler").execute().args[0]
    noise = n("RandomNoise").execute(seed).args[0]
    return n("SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, {"samples": latent}).args[0]["samples"]


@pytest.mark.parametrize("arc", ARCHS, indirect=True)
def test_arcflow_sampler_equals_ksampler_euler_route(comfy_nodes, glance, tiny, arc):
    arch, model, arc_model = arc
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    sigmas = _n(comfy_nodes, "BasicScheduler").execute(arc_model, "simple", 2, 1.0).args[0]
    assert [round(float(s), 4) for s in sigmas] == [1.0, 0.7619, 0.0]  # the official 2-step schedule
    pos, latent = tiny.conditioning(arch, 1), tiny.latent(arch)
    a = _arcflow_run(comfy_nodes, arc_model, sigmas, pos, latent)
    ks = _n(comfy_nodes, "KSampler")()
    b = ks.sample(arc_model, 0, 2, 1.0, "euler", "simple", pos, tiny.conditioning(arch, 2), {"samples": latent})[0][
        "samples"
    ]
    scale = max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= 1e-5 * scale, float((a - b).abs().max())
    assert torch.isfinite(a).all()
    base = ks.sample(model, 0, 2, 1.0, "euler", "simple", pos, tiny.conditioning(arch, 2), {"samples": latent})[0][
        "samples"
    ]
    assert not torch.allclose(a, base), "the heads decide the step"
    import comfy.model_management as mm

    mm.unload_all_models()
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items()), "base model untouched"


@pytest.mark.parametrize("arc", ["flux"], indirect=True)
def test_each_step_is_the_closed_form_of_the_policy(comfy_nodes, glance, tiny, arc):
    """One step of the sampler moves x by exactly D(σ0 → σ1) of the policy the model produced at σ0."""
    import importlib

    import comfy.samplers

    am = importlib.import_module(glance.__name__ + ".glance_core.arcflow_model")
    arch, model, arc_model = arc
    state = am.state_of(arc_model)
    state.record = True  # keep each call's raw policy
    pos, latent = tiny.conditioning(arch, 1), tiny.latent(arch)
    sig = torch.tensor([1.0, 0.7619, 0.0])
    seen = []

    def record(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.append((args[0].clone(), state.raw))
        return out

    import comfy.patcher_extension as pe

    rec = arc_model.clone()
    rec.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "rec", record)
    guider = comfy.samplers.CFGGuider(rec)
    guider.set_conds(pos, [])
    guider.set_cfg(1.0)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    try:
        arc_sampler = comfy.samplers.KSAMPLER(glance.glance_core.arcflow_sampler.sample)
        guider.sample(noise, latent, arc_sampler, sig, disable_pbar=True)
    finally:
        state.record = False
    (x0, raw0), (x1, _) = seen
    state.raw = raw0
    d = state.policy(x0).displacement(1.0, 0.7619)
    assert torch.allclose(x1, x0 - d, atol=1e-6)
    assert state.evaluations >= 2


def test_bad_adapters_name_the_tensor_and_shapes(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    good = tiny.arcflow_adapter("flux", 1)
    bad_shape = dict(good, **{"proj_out_means.weight": torch.zeros(60, 64)})
    no_heads = {k: v for k, v in good.items() if not k.startswith("proj_out_loggamma")}
    foreign = dict(
        good, **{"not_a_layer.lora_A.weight": torch.zeros(4, 8), "not_a_layer.lora_B.weight": torch.zeros(8, 4)}
    )
    cases = [
        (bad_shape, r"proj_out_means\.weight has shape \[60, 64\], this model needs \[256, 64\]"),
        (no_heads, r"not an ArcFlow adapter: it has no 'proj_out_loggamma\.weight'"),
        (foreign, r"2 of \d+ keys match no layer"),
        (tiny.arcflow_adapter("qwen_image", 1), r"match"),
    ]
    for i, (sd, msg) in enumerate(cases):
        tiny.save_lora(loras_dir / f"bad{i}.safetensors", sd)
        with pytest.raises(ValueError, match=msg):
            _n(comfy_nodes, "ArcFlowLoader").execute(model, f"bad{i}.safetensors", 1.0, 3.2)


@pytest.mark.parametrize("arc", ["qwen_image"], indirect=True)
def test_sampler_refuses_what_it_cannot_do(comfy_nodes, tiny, arc):
    arch, model, arc_model = arc
    pos, neg, latent = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), tiny.latent(arch)
    n = lambda name: _n(comfy_nodes, name)  # noqa: E731
    sampler = n("ArcFlowSampler").execute().args[0]
    noise = n("RandomNoise").execute(0).args[0]
    sig = torch.tensor([1.0, 0.7619, 0.0])
    cases = [
        (n("BasicGuider").execute(model, pos).args[0], sig, "needs a model with ArcFlow heads"),
        (n("CFGGuider").execute(arc_model, pos, neg, 4.0).args[0], sig, "use cfg 1"),
        (n("BasicGuider").execute(arc_model, pos).args[0], torch.tensor([1.0, 0.5, 0.7, 0.0]), "descending"),
    ]
    for guider, sigmas, msg in cases:
        with pytest.raises(ValueError, match=msg):
            n("SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, {"samples": latent})


@pytest.mark.parametrize("arch,config", [("flux", "FLUX_DEV"), ("qwen_image", "QWEN_IMAGE")])
def test_full_size_official_layout_loads(comfy_nodes, glance, tiny, arch, config):
    """The released adapters' key list and shapes fit the full-size ComfyUI model."""
    import importlib

    import comfy.model_patcher

    am = importlib.import_module(glance.__name__ + ".glance_core.arcflow_model")
    experts = importlib.import_module(glance.__name__ + ".glance_core.experts")
    config = getattr(tiny, config)
    mc = tiny.model_config(arch, config, torch.bfloat16)
    model = comfy.model_patcher.ModelPatcher(mc.get_model({}, device="meta"), load_device="meta", offload_device="meta")
    sd = tiny.arcflow_adapter(arch, k=16, rank=256, config=config, shapes_only=True)
    assert tuple(sd["norm_out.linear.weight"].shape) == (6144, 3072)
    assert tuple(sd["proj_out_means.weight"].shape) == (1024, 3072)
    assert tuple(sd["proj_out_logweights.weight"].shape) == (64, 3072)
    assert tuple(sd["proj_out_loggamma.weight"].shape) == (60, 3072)
    if arch == "qwen_image":
        assert tuple(sd["transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"].shape) == (256, 3072)
        assert tuple(sd["transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight"].shape) == (12288, 256)
        assert tuple(sd["transformer_blocks.59.img_mlp.net.2.lora_A.weight"].shape) == (256, 12288)
    lora, full = am.split_adapter(sd)
    assert am.check_heads(model, full, "official") == 16
    if arch == "flux":
        lora = {f"transformer.{k}": v for k, v in lora.items()}
    patches = experts.parse_lora(model, lora, "official")
    assert len(patches) == len(lora) // 2


def test_distilled_adapter_beats_two_euler_steps_and_reloads(comfy_nodes, tiny, loras_dir):
    """Distil from the tiny FLUX teacher (data-free, 4 captions), save, reload with the loader, sample 2 steps."""
    import comfy.samplers
    from safetensors import safe_open

    with torch.inference_mode():
        model = tiny.build("flux", 0)
    captions = [tiny.conditioning("flux", 100 + i) for i in range(4)]
    positive = [entry for c in captions for entry in c]
    with torch.inference_mode():
        arc_model, adapter, curve = (
            _n(comfy_nodes, "ArcFlowDistiller")
            .execute(model, positive, 100, 2, 8, 4, 1e-3, 8, 64, 0, save_name="arc_distilled")
            .args
        )
    assert curve.shape[-1] == 3
    with safe_open(str(loras_dir / "arc_distilled.safetensors"), "pt") as f:
        assert set(f.keys()) == set(adapter) and "ArcFlow" in f.metadata()["policy_config"]
    loaded = _n(comfy_nodes, "ArcFlowLoader").execute(model, "arc_distilled.safetensors", 1.0, 3.2).args[0]

    ms = model.get_model_object("model_sampling")
    fifty = torch.tensor([ms.percent_to_sigma(i / 50) for i in range(50)] + [0.0])
    two = torch.tensor([1.0, 0.7619, 0.0])
    lat = tiny.latent("flux", 64, 64)
    arc = _n(comfy_nodes, "ArcFlowSampler").execute().args[0]
    euler = comfy.samplers.sampler_object("euler")

    def run(m, sigmas, cond, seed, sampler):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(cond, [])
        g.set_cfg(1.0)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
        return g.sample(noise, torch.zeros_like(lat), sampler, sigmas, disable_pbar=True, seed=seed)

    assert torch.equal(run(loaded, two, captions[0], 7, arc), run(arc_model, two, captions[0], 7, arc))
    for conds in (captions[:2], [tiny.conditioning("flux", 900 + i) for i in range(2)]):  # seen, held-out captions
        e_euler, e_arc = [], []
        for c in conds:
            for seed in (5000, 5001):  # held-out noises
                ref = run(model, fifty, c, seed, euler)
                e_euler.append(float(((run(model, two, c, seed, euler) - ref) ** 2).mean() / (ref**2).mean()))
                e_arc.append(float(((run(loaded, two, c, seed, arc) - ref) ** 2).mean() / (ref**2).mean()))
        assert sum(e_arc) < 0.7 * sum(e_euler), (e_arc, e_euler)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_adapter_reproduces_the_base_model(comfy_nodes, glance, tiny, loras_dir, arch):
    """An adapter whose heads all copy the base projection (no momentum, the base norm in diffusers order) must
    sample exactly like the base model with euler: checks the norm mapping (FLUX scale/shift swap), the head
    layout and the token unpacking end to end."""
    import importlib

    distill = importlib.import_module(glance.__name__ + ".glance_core.arcflow_distill")
    model = tiny.build(arch, 0)
    heads = distill.initial_heads(model, 4, torch.Generator().manual_seed(0))
    heads["proj_out_means.bias"] = model.model.diffusion_model.state_dict()[
        "final_layer.linear.bias" if arch == "flux" else "proj_out.bias"
    ].repeat(4)
    heads["proj_out_loggamma.bias"].zero_()
    base = model.model.diffusion_model.state_dict()
    if arch == "flux":  # diffusers' norm_out emits (scale, shift); ComfyUI's FLUX final layer chunks (shift, scale)
        for p in ("weight", "bias"):
            shift, scale = base[f"final_layer.adaLN_modulation.1.{p}"].chunk(2, 0)
            heads[f"norm_out.linear.{p}"] = torch.cat([scale, shift], 0)
    else:  # Qwen-Image: the same order in both
        for p in ("weight", "bias"):
            heads[f"norm_out.linear.{p}"] = base[f"norm_out.linear.{p}"]
    tiny.save_lora(loras_dir / "identity.safetensors", heads)
    arc_model = _n(comfy_nodes, "ArcFlowLoader").execute(model, "identity.safetensors", 1.0, 3.2).args[0]
    shifted = _n(comfy_nodes, "ModelSamplingAuraFlow")().patch_aura(model, 3.2)[0]
    pos, neg, latent = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), tiny.latent(arch)
    ks = _n(comfy_nodes, "KSampler")()
    a = ks.sample(arc_model, 3, 4, 1.0, "euler", "simple", pos, neg, {"samples": latent})[0]["samples"]
    b = ks.sample(shifted, 3, 4, 1.0, "euler", "simple", pos, neg, {"samples": latent})[0]["samples"]
    assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max()))), float((a - b).abs().max())
