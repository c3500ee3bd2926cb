"""Phase-Aware LoRA Loader where users run it: device copies and ComfyUI's memory accounting, partial
(lowvram) loading, fp8 and mixed-precision checkpoints, and "cuda" weights proven with FakeTensorMode."""

from __future__ import annotations

import pytest
import torch
from tests_helpers import sample


def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def phase(comfy_nodes, model, slow, fast, boundary, slow_strength=1.0, fast_strength=1.0):
    node = _n(comfy_nodes, "PhaseAwareLoRALoader")
    return node.execute(model, slow, fast, slow_strength, fast_strength, boundary).args[0]


def close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= tol * scale


def _deltas(ph):
    return [d for e in (ph.slow, ph.fast) if e for d in e.deltas.values()]


def _evaluate(patcher, ph, pos, sigmas) -> list[torch.Tensor]:
    """What the APPLY_MODEL wrapper does inside sampling: pick the expert by sigma, evaluate the model."""
    dt = patcher.model.get_dtype()
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)).to(dt)
    ctx, y, guidance = pos[0][0].to(dt), pos[0][1]["pooled_output"].to(dt), torch.full((1,), 3.5, dtype=dt)
    model = patcher.model.diffusion_model
    with torch.no_grad():
        return [
            ph.apply_model_wrapper(
                lambda x, t: model(x, t, context=ctx, y=y, guidance=guidance), x, torch.full((1,), s)
            )
            for s in sigmas
        ]


@pytest.fixture
def flux_pair(comfy_nodes, tiny, loras_dir):
    tiny.save_lora(loras_dir / "slow.safetensors", tiny.glance_lora("flux", 1))
    tiny.save_lora(loras_dir / "fast.safetensors", tiny.glance_lora("flux", 2))
    pos, neg = tiny.conditioning("flux", 1), tiny.conditioning("flux", 2)
    sigmas = _n(comfy_nodes, "SlowFastScheduler").execute(tiny.build("flux", 0), "glance_flux").args
    return pos, neg, sigmas[0], sigmas[1]


# --- Device copies: in the compute dtype, freed on unload, counted by ComfyUI -------------------------
def test_device_copies_are_counted_and_freed_when_the_model_is_unloaded(comfy_nodes, glance, tiny, flux_pair):
    import comfy.model_management as mm

    pos, neg, sigmas, boundary = flux_pair
    model = tiny.build("flux", 0)
    ours = phase(comfy_nodes, model, "slow.safetensors", "fast.safetensors", boundary)
    ph = glance.glance_core.experts.phase_loras(ours)[0]
    expected = ph.device_bytes(4)  # float32 compute
    assert expected > 0
    # ComfyUI frees room for the model by its model_size(): the experts' device copies are part of it.
    assert ours.model_size() == model.model_size() + expected
    mm.load_models_gpu([ours])  # ComfyUI's own loading (injects the hooks)
    try:
        _evaluate(ours, ph, pos, (0.99, 0.5))
        kept = [t for d in _deltas(ph) for hit in d._cache.values() for t in hit if t is not None]
        assert kept and all(t.device == ours.load_device and t.dtype == torch.float32 for t in kept)
        assert ph.cached_bytes() == expected
    finally:
        mm.unload_all_models()
    assert all(not d._cache for d in _deltas(ph)), "device copies outlive the unloaded model"
    # A whole sampling run leaves nothing behind either (ComfyUI ejects the model after it).
    sample(comfy_nodes, ours, sigmas, pos, neg, tiny.latent("flux"))
    assert ph.counts["slow"] and ph.counts["fast"] and ph.cached_bytes() == 0


def test_factors_stay_in_the_files_dtype_and_copies_in_the_compute_dtype(comfy_nodes, glance, tiny, loras_dir):
    """A bf16 LoRA on a bf16 model: no float32 host copy of the factors, bf16 device copies."""
    import comfy.model_management as mm

    sd = {k: v.to(torch.bfloat16) for k, v in tiny.glance_lora("flux", 1).items()}
    tiny.save_lora(loras_dir / "bf16.safetensors", sd)
    model = tiny.build("flux", 0, dtype=torch.bfloat16)
    ours = phase(comfy_nodes, model, "bf16.safetensors", "None", 0.0)
    ph = glance.glance_core.experts.phase_loras(ours)[0]
    assert all(t.dtype == torch.bfloat16 for d in _deltas(ph) for _, a, b, _ in d.parts for t in (a, b))
    assert sum(d.nbytes() for d in _deltas(ph)) == sum(v.numel() * 2 for v in sd.values())
    # No host copy at all: the factors are the (cached) file's own tensors.
    files = glance.glance_core.lora_files
    cached, _ = files.load_safetensors(files.resolve_in_folder("loras", "bf16.safetensors"))
    storages = {v.untyped_storage().data_ptr() for v in cached.values()}
    assert all(
        t.untyped_storage().data_ptr() in storages for d in _deltas(ph) for _, a, b, _ in d.parts for t in (a, b)
    )
    assert ours.model_size() == model.model_size() + ph.device_bytes(2)
    mm.load_models_gpu([ours])
    try:
        out = _evaluate(ours, ph, tiny.conditioning("flux", 1), (0.5,))[0]
        assert torch.isfinite(out).all() and out.dtype == torch.bfloat16
        assert ph.cached_bytes() and all(k[1] == torch.bfloat16 for d in _deltas(ph) for k in d._cache)
    finally:
        mm.unload_all_models()
    assert ph.cached_bytes() == 0


# --- Partial loading: ComfyUI's lowvram load with a small weight budget ------------------------------
def test_partial_loading_gives_the_same_output_and_keeps_no_copies(comfy_nodes, glance, tiny, flux_pair):
    import comfy.model_management as mm

    pos, neg, _, boundary = flux_pair
    mm.unload_all_models()
    ours = phase(comfy_nodes, tiny.build("flux", 0), "slow.safetensors", "fast.safetensors", boundary)
    ph = glance.glance_core.experts.phase_loras(ours)[0]

    def run(sigma: float) -> torch.Tensor:
        return _evaluate(ours, ph, pos, (sigma,))[0]

    ours.patch_model(device_to=ours.load_device, lowvram_model_memory=0)  # full load
    full = [run(0.99), run(0.5)]
    assert ph.cached_bytes() > 0
    ours.unpatch_model(ours.offload_device)
    assert ph.cached_bytes() == 0
    # A budget of ~1/4 of the weights: the rest stays offloaded and is cast per layer by comfy.ops.
    budget = ours.model_size() // 4
    ours.patch_model(device_to=ours.load_device, lowvram_model_memory=budget)
    try:
        assert ours.model.model_lowvram and ours.model.lowvram_patch_counter >= 0
        assert any(getattr(m, "comfy_cast_weights", False) for m in ours.model.modules())
        partial = [run(0.99), run(0.5)]
        assert all(not d._cache for d in _deltas(ph)), "a partially loaded model must not pin expert copies"
    finally:
        ours.unpatch_model(ours.offload_device)
    assert ph.counts == {"slow": 2, "fast": 2}
    for a, b in zip(full, partial):
        assert close(a, b), float((a - b).abs().max())
    assert not close(full[0], full[1], 1e-3)


# --- fp8 weights (UNETLoader weight_dtype fp8_e4m3fn) and mixed-precision Linear classes --------------
@pytest.fixture
def unet_dir(comfy_nodes, tmp_path):
    import folder_paths

    import devtools.comfy_testkit  # noqa: F401  (lets UNETLoader detect the tiny config)

    d = tmp_path / "diffusion_models"
    d.mkdir()
    folder_paths.add_model_folder_path("diffusion_models", str(d), is_default=True)
    yield d
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(d))
    folder_paths.filename_list_cache.pop("diffusion_models", None)


def test_loader_on_fp8_weights(comfy_nodes, tiny, flux_pair, unet_dir):
    pos, neg, sigmas, boundary = flux_pair
    tiny.save(unet_dir / "tiny_flux.safetensors", "flux", 0)
    unet = _n(comfy_nodes, "UNETLoader")()
    fp8 = unet.load_unet("tiny_flux.safetensors", "fp8_e4m3fn")[0]
    fp32 = unet.load_unet("tiny_flux.safetensors", "default")[0]
    assert fp8.model.get_dtype() == torch.float8_e4m3fn
    lat = tiny.latent("flux")
    base8 = sample(comfy_nodes, fp8, sigmas, pos, neg, lat)
    ours8 = sample(
        comfy_nodes, phase(comfy_nodes, fp8, "slow.safetensors", "fast.safetensors", boundary), sigmas, pos, neg, lat
    )
    base32 = sample(comfy_nodes, fp32, sigmas, pos, neg, lat)
    ours32 = sample(
        comfy_nodes, phase(comfy_nodes, fp32, "slow.safetensors", "fast.safetensors", boundary), sigmas, pos, neg, lat
    )
    assert torch.isfinite(ours8).all() and not close(ours8, base8, 1e-2)
    # The experts' effect on fp8 weights is their effect on full-precision weights, up to fp8 rounding.
    effect8, effect32 = ours8 - base8, ours32 - base32
    rel = float((effect8 - effect32).norm() / effect32.norm())
    assert rel < 0.25, rel


def test_loader_accepts_mixed_precision_linear_layers(comfy_nodes, glance, tiny, flux_pair):
    """ComfyUI's mixed-precision/quantized checkpoints use a Linear class that is not torch.nn.Linear."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    pos, neg, sigmas, boundary = flux_pair
    mc = tiny.model_config("flux")
    mc.custom_operations = comfy.ops.mixed_precision_ops({}, torch.float32)
    model = mc.get_model({})
    model.load_model_weights(tiny.state_dict("flux", 0), "")
    qkv = model.diffusion_model.double_blocks[0].img_attn.qkv
    assert not isinstance(qkv, torch.nn.Linear), "the runtime's mixed-precision Linear changed: update this test"
    mixed = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    lat = tiny.latent("flux")
    ours = sample(
        comfy_nodes, phase(comfy_nodes, mixed, "slow.safetensors", "fast.safetensors", boundary), sigmas, pos, neg, lat
    )
    plain = sample(
        comfy_nodes,
        phase(comfy_nodes, tiny.build("flux", 0), "slow.safetensors", "fast.safetensors", boundary),
        sigmas,
        pos,
        neg,
        lat,
    )
    assert close(ours, plain), float((ours - plain).abs().max())


# --- "cuda" weights: FakeTensorMode raises on any cpu/cuda mix -----------------------------------
@pytest.mark.parametrize("lowvram", [False, True], ids=["loaded", "partially_loaded"])
def test_expert_hooks_on_cuda_weights_never_mix_devices(comfy_nodes, glance, tiny, lowvram):
    """Both experts with "cuda" factors (as a LORA_MODEL trained on the GPU has), a Slow and a Fast evaluation
    through the hooks of every targeted layer of the real ComfyUI FLUX model, bf16 activations on "cuda"
    (FakeTensorMode): any tensor the hooks create or keep on the CPU raises FakeTensorDeviceMismatchError.
    (This CPU build of torch cannot run a whole "cuda" Linear or a CPU→"cuda" copy under FakeTensorMode, so
    the layer's own output is a "cuda" stand-in and the factors start on "cuda".)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    E = glance.glance_core.experts
    cuda = torch.device("cuda", 0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def on_cuda(t: torch.Tensor) -> torch.Tensor:
        return mode.fake_tensor_converter.from_meta_and_device(mode, t.to("meta"), cuda)

    patcher = tiny.build("flux", 0)
    slow = E.build_expert(patcher, tiny.glance_lora("flux", 1), 1.0, "slow")
    fast = E.build_expert(patcher, tiny.native_lora("flux", 2), 0.8, "fast")
    diff = {"diffusion_model.double_blocks.0.img_attn.proj.diff_b": 0.1 * torch.ones(64)}
    fast.deltas.update(E.build_expert(patcher, diff, 1.0, "diff").deltas)  # a dense (bias) part
    for expert in (slow, fast):
        for d in expert.deltas.values():
            d.parts = [(r, on_cuda(a), on_cuda(b), s) for r, a, b, s in d.parts]
            d.dense = None if d.dense is None else on_cuda(d.dense)
            d.bias = None if d.bias is None else on_cuda(d.bias)
    ph = E.PhaseLoRA(slow, fast, 0.9)
    ph.inject(patcher)
    patcher.model.model_lowvram = lowvram  # what ComfyUI's load() sets after a partial load
    assert set(fast.deltas) - set(slow.deltas), "the Fast expert must reach layers Slow does not"
    seen = []

    def every_layer(x, t):
        with mode:
            for name in ph.modules:
                layer = patcher.model.get_submodule(name)
                x_in = torch.empty(2, 3, layer.in_features, device=cuda, dtype=torch.bfloat16)
                out = torch.zeros(2, 3, layer.out_features, device=cuda, dtype=torch.bfloat16)
                for hook in layer._forward_hooks.values():
                    hooked = hook(layer, (x_in,), out)
                    out = out if hooked is None else hooked
                assert out.device == cuda and out.dtype == torch.bfloat16
                seen.append(name)
        return x

    try:
        for sigma in (0.95, 0.3):  # Slow, then the switch to Fast
            ph.apply_model_wrapper(every_layer, None, torch.full((1,), sigma))
        assert ph.counts == {"slow": 1, "fast": 1} and len(seen) == 2 * len(ph.modules)
        copies = [t for d in _deltas(ph) for hit in d._cache.values() for t in hit if t is not None]
        if lowvram:
            assert not copies, "a partially loaded model keeps no expert copies"
        else:
            assert copies and all(t.device == cuda and t.dtype == torch.bfloat16 for t in copies)
    finally:
        ph.eject(patcher)
        patcher.model.model_lowvram = False
    assert ph.cached_bytes() == 0
    # The check has teeth: a CPU tensor in the same computation raises.
    with mode, pytest.raises(Exception, match="[Dd]evice"):
        torch.empty(2, 64, device=cuda) @ torch.empty(64, 3)
