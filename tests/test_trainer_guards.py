"""One-Shot Trainer and ArcFlow Distiller on the runtimes users have: ComfyUI's training switch, the load device,
fp8 and mixed-precision weights, and bad input refused before any work (real ComfyUI, tiny FLUX, CPU)."""

from __future__ import annotations

import importlib
import json
import os
import threading
import time

import numpy as np
import pytest
import tests_helpers
import torch
from safetensors import safe_open


def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def _core_module(name: str):
    """A module-scoped fixture giving the pack's ``glance_core.<name>`` (the module ComfyUI loaded)."""

    @pytest.fixture(scope="module", name=name)
    def fixture(glance):
        return importlib.import_module(f"{glance.__name__}.glance_core.{name}")

    return fixture


training, lora_layer, lora_save, checkpoint = map(_core_module, ("training", "lora_layer", "lora_save", "checkpoint"))


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return torch.from_numpy(data.astronaut()[::4, ::4].astype(np.float32) / 255.0)[None]


@pytest.fixture
def flux(comfy_nodes, tiny):
    import comfy.sd

    with torch.inference_mode():  # as ComfyUI's executor loads models
        model = tiny.build("flux", 0)
        vae = comfy.sd.VAE(sd=tiny.tiny_vae_state_dict("flux", 0))
    return model, vae


def counting(model, on_call=None):
    """A clone of ``model`` that counts its evaluations (and runs ``on_call(n)`` before each)."""
    import comfy.patcher_extension as pe

    calls = [0]

    def wrapper(executor, *args, **kwargs):
        calls[0] += 1
        if on_call:
            on_call(calls[0])
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_count", wrapper)
    return m, calls


def train(comfy_nodes, model, positive, inference: bool = True, **kw):
    return tests_helpers.train(comfy_nodes, model, positive, inference, **{"steps": 3, **kw})


# ---------------------------------------------------------------------------------------------
# ComfyUI's training switch
# ---------------------------------------------------------------------------------------------
def test_training_switch_is_on_while_training_and_restored_after_error_and_stop(comfy_nodes, tiny, flux, photo):
    """Releases with ``comfy.model_management.in_training`` (0.33) only backpropagate through FLUX's RoPE while it
    is True: the trainer sets it for its steps and puts the previous value back after an error and after Stop.
    Releases without it (0.3.75) do not get one invented."""
    import comfy.model_management as mm

    model, vae = flux
    pos = tiny.conditioning("flux", 1)
    has_flag = hasattr(mm, "in_training")
    seen = []
    m, _ = counting(model, lambda n: seen.append(getattr(mm, "in_training", None)))
    train(comfy_nodes, m, pos, image=photo, vae=vae, expert="slow", steps=2)
    assert seen and all(v is (True if has_flag else None) for v in seen), seen
    assert getattr(mm, "in_training", None) is (False if has_flag else None)

    with pytest.raises(ValueError, match="diverged"):
        train(comfy_nodes, model, pos, image=photo, vae=vae, learning_rate=1e12, steps=30)
    assert getattr(mm, "in_training", None) is (False if has_flag else None)

    stop, calls = counting(model, lambda n: mm.interrupt_current_processing(True) if n == 3 else None)
    with pytest.raises(mm.InterruptProcessingException):
        train(comfy_nodes, stop, pos, image=photo, vae=vae, steps=50)
    assert calls[0] <= 4
    assert getattr(mm, "in_training", None) is (False if has_flag else None)
    if has_flag:  # nested in a caller that set it: left as the caller had it
        mm.in_training = True
        try:
            train(comfy_nodes, model, pos, image=photo, vae=vae, expert="slow", steps=1)
            assert mm.in_training is True
        finally:
            mm.in_training = False


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------
def test_training_step_hot_path_stays_on_a_cuda_load_device(comfy_nodes, tiny, training, lora_layer):
    """FakeTensorMode makes "cuda" tensors on this CPU build and raises on any cpu/cuda mix: the LoRA factors,
    their forward hooks on every target layer, the official noise/target and the trajectory states/targets of a
    training step all live on the model's load device. (Fake CUDA cannot record autograd here, hence no_grad.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    patcher = tiny.build("flux", 0, device="cuda")  # load device cuda; ComfyUI would move the weights there
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        lora = lora_layer.TrainableLoRA(patcher, "official", 4, 4.0, None)
        assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in lora.parameters())
        lora.enabled = True
        outs = []
        for name in lora.by_module:
            mod = patcher.model.get_submodule(name)
            x = torch.randn(1, 8, mod.in_features, device="cuda", dtype=torch.bfloat16)
            out = torch.randn(1, 8, mod.out_features, device="cuda", dtype=torch.bfloat16)
            y = lora.layers.hook_for(name)(mod, (x,), out)
            assert y.device.type == "cuda" and y.dtype == torch.bfloat16
            outs.append(y.float().mean())
        latent = torch.randn(1, 16, 4, 4, device="cuda")
        xt, target = training.official_pair(latent, 0.5, 2, None)
        states = {s: torch.randn(4, 16, 4, 4, device="cuda") for s in (0.5, 0.3)}
        xs, ts = training.trajectory_pair(states, 0.5, 0.3, 2, None)
        loss = torch.nn.functional.mse_loss(xt + sum(outs), target) + torch.nn.functional.mse_loss(xs, ts)
        assert {t.device.type for t in (xt, target, xs, ts, loss)} == {"cuda"}


def test_shared_base_model_is_never_mutated(comfy_nodes, tiny, flux, photo):
    """Every clone of a loaded model shares its modules: training must leave the very same weight objects in
    place (ComfyUI's loaders, offloading and patch backups hold on to them), with the same values."""
    model, vae = flux
    before = {k: (v, v.is_inference(), v.detach().clone()) for k, v in model.model.named_parameters()}
    train(comfy_nodes, model, tiny.conditioning("flux", 1), image=photo, vae=vae, steps=2)
    after = dict(model.model.named_parameters())
    assert after.keys() == before.keys()
    for k, (obj, inference, value) in before.items():
        assert after[k] is obj and obj.is_inference() == inference and torch.equal(obj, value), k


def test_same_noise_from_a_seed_on_every_device(training):
    """A CPU generator draws the same noise wherever the tensor goes (a seed = the same LoRA on CPU and GPU)."""
    a = training.random_normal((2, 3), torch.Generator().manual_seed(5), "cpu")
    b = torch.randn((2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_trains_on_fp8_weights_loaded_like_unetloader(comfy_nodes, tiny, flux, photo, tmp_path, training):
    """UNETLoader with weight_dtype fp8_e4m3fn (runs on CPU with manual casting): the experts train, finite, and
    the fp8 base stays bit-identical."""
    import folder_paths

    import devtools.comfy_testkit  # noqa: F401  (lets ComfyUI's detection read the tiny config from the file)

    d = tmp_path / "diffusion_models"
    tiny.save(d / "tiny_flux.safetensors", "flux", 0)
    folder_paths.add_model_folder_path("diffusion_models", str(d))
    try:
        with torch.inference_mode():
            (model,) = _n(comfy_nodes, "UNETLoader")().load_unet("tiny_flux.safetensors", "fp8_e4m3fn")
    finally:
        folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(d))
    weights = [p for p in model.model.diffusion_model.parameters() if p.ndim == 2]
    assert weights and all(p.dtype == torch.float8_e4m3fn for p in weights)
    state = tests_helpers.model_state(model)
    _, vae = flux
    slow, fast, trained, _ = train(comfy_nodes, model, tiny.conditioning("flux", 1), image=photo, vae=vae, steps=4)
    assert slow and fast and all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in slow.values())
    assert any(float(v.abs().max()) > 0 for k, v in fast.items() if "lora_B" in k)
    assert all(
        torch.equal(v.view(torch.uint8), state[k].view(torch.uint8))
        for k, v in tests_helpers.model_state(model).items()
    )


def test_mixed_precision_linear_layers_are_trained(comfy_nodes, tiny, photo, flux, training, lora_layer):
    """ComfyUI's mixed-precision ops (quantized checkpoints) use a Linear class that is not torch.nn.Linear: its
    layers are LoRA targets like any other, not "no layer matches"."""
    import json

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops

    plain = flux[0]
    sd = tiny.state_dict("flux", 0)
    # Releases that read per-layer quantization from the checkpoint (0.33): one fused qkv layer stored as fp8
    # with a scale, as a mixed-precision checkpoint holds it.
    per_layer_quant = hasattr(comfy.ops, "_load_quantized_module")
    if per_layer_quant:
        key = "double_blocks.0.img_attn.qkv"
        scale = sd[key + ".weight"].abs().max() / 448.0
        sd[key + ".weight"] = (sd[key + ".weight"] / scale).to(torch.float8_e4m3fn)
        sd[key + ".weight_scale"] = scale.reshape(())
        sd[key + ".comfy_quant"] = torch.tensor(
            list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8
        )
    with torch.inference_mode():
        mc = tiny.model_config("flux")
        mc.custom_operations = comfy.ops.mixed_precision_ops({}, torch.float32)
        m = mc.get_model({})
        m.load_model_weights(sd, "")
        model = comfy.model_patcher.ModelPatcher(
            m, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
        )
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert not isinstance(qkv, torch.nn.Linear)
    if per_layer_quant:
        assert type(qkv.weight).__name__ == "QuantizedTensor" or "Quantized" in type(qkv.weight.data).__name__
    lora = lora_layer.TrainableLoRA(model, "official", 2, 2.0, torch.Generator().manual_seed(0))
    expect = lora_layer.TrainableLoRA(plain, "official", 2, 2.0, torch.Generator().manual_seed(0))
    assert [t.name for t in lora.targets] == [t.name for t in expect.targets]
    # The library routine (the node's phase-aware output is the loader's business).
    with torch.inference_mode():
        x0 = flux[1].encode(photo[:, ::2, ::2, :3])
    job = training.ExpertJob("slow", [1.0, 0.97], [0.97, 0.9])
    res = training.train_expert(
        model, job, objective="official", positive=tiny.conditioning("flux", 1), rank=2,
        alpha=2.0, lr=1e-3, steps=3, seed=0, targets="official", x0=x0,
    )  # fmt: skip
    assert res.state_dict.keys() == expect.state_dict().keys()
    assert all(torch.isfinite(v).all() for v in res.state_dict.values()) and all(map(np.isfinite, res.losses))
    assert float(res.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].abs().max()) > 0


def test_a_partially_loaded_model_trains_like_a_fully_loaded_one(comfy_nodes, tiny, training, checkpoint, lora_layer):
    """Low VRAM: ComfyUI loads only part of the model and casts the other layers' weights per call
    (``comfy_cast_weights``). A training step's loss and LoRA gradients on such a model equal those on the fully
    loaded one, and the base model is unchanged after unloading. (CPU runs never partially load on their own, so
    the student clone is loaded with a 1-byte budget the way ComfyUI's loader does on a small GPU.)"""
    import comfy.patcher_extension as pe

    with torch.inference_mode():
        model = tiny.build("flux", 0)
    state = tests_helpers.model_state(model)
    cond = tiny.conditioning("flux", 1)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 8, 8, generator=gen)
    xt, target = training.official_pair(x0, 0.7, 2, gen)

    def step(budget: int | None):
        lora = lora_layer.TrainableLoRA(model, "official", 2, 2.0, torch.Generator().manual_seed(1))
        for t in lora.targets:
            t.B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        student = model.clone()
        student.set_injections("t", [pe.PatcherInjection(inject=lora.inject, eject=lora.eject)])
        checkpoint.block_patches(student, lora.parameters())
        with torch.inference_mode(False), checkpoint.training_mode():
            if budget is None:
                student.load(student.load_device, full_load=True)
            else:
                student.load(student.load_device, lowvram_model_memory=budget)
            lowvram = [m for m in student.model.modules() if getattr(m, "comfy_cast_weights", False)]
            lora.inject(student)
            lora.enabled = True
            try:
                dm_opts = student.model_options["transformer_options"]
                sigma = torch.full((2,), 0.7)
                c = {"c_crossattn": cond[0][0].repeat(2, 1, 1), "y": cond[0][1]["pooled_output"].repeat(2, 1)}
                with checkpoint.normal_weights(checkpoint._outside_blocks(student.model.diffusion_model)):
                    den = student.model.apply_model(
                        xt, sigma, guidance=torch.full((2,), 1.0), transformer_options=dm_opts, **c
                    )
                    loss = torch.nn.functional.mse_loss(((xt - den) / 0.7).float(), target)
                    loss.backward()
            finally:
                lora.enabled = False
                lora.eject()
                student.unpatch_model(student.offload_device)
        return float(loss.detach()), [t.A.grad.clone() for t in lora.targets], len(lowvram)

    full_loss, full_grads, n_full = step(None)
    part_loss, part_grads, n_low = step(1)
    assert n_full == 0 and n_low > 10, (n_full, n_low)
    assert part_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(full_grads, part_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7) and float(a.abs().max()) > 0
    assert all(torch.equal(v, state[k]) for k, v in tests_helpers.model_state(model).items())


def test_vae_with_trainable_weights_does_not_tie_steps_together(comfy_nodes, tiny, photo):
    """A VAE built outside inference mode (a script, after another training node) has weights that require grad;
    the image latent is encoded without autograd, so every step backpropagates on its own graph."""
    import comfy.sd

    model = tiny.build("flux", 0)
    vae = comfy.sd.VAE(sd=tiny.tiny_vae_state_dict("flux", 0))
    assert any(p.requires_grad for p in vae.first_stage_model.parameters())
    slow, fast, _, _ = train(comfy_nodes, model, tiny.conditioning("flux", 1), inference=False, image=photo, vae=vae)
    assert slow and fast and all(torch.isfinite(v).all() for v in fast.values())


# ---------------------------------------------------------------------------------------------
# Bad input costs no work
# ---------------------------------------------------------------------------------------------
def test_bad_numbers_and_choices_are_named_before_any_work(comfy_nodes, tiny, flux, photo, loras_dir):
    model, vae = flux
    m, calls = counting(model)
    pos = tiny.conditioning("flux", 1)
    wide = torch.rand(1, 64, 640, 3)  # 10:1, which the 32-px floor at resolution 64 squashed to 2:1
    cases = [
        (dict(learning_rate=float("nan")), "learning_rate must be a finite number \\(got nan\\)"),
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number \\(got inf\\)"),
        (dict(alpha=float("nan")), "alpha must be a finite number \\(got nan\\)"),
        (dict(boundary_sigma=float("nan")), "boundary_sigma must be a finite number \\(got nan\\)"),
        (dict(expert="medium"), "expert 'medium' is not one of 'both', 'slow', 'fast'"),
        (dict(objective="arcflow"), "objective 'arcflow' is not one of 'official', 'trajectory'"),
        (dict(target_layers="mlp"), "target_layers 'mlp' is not one of 'official', 'attention', 'all_linear'"),
        (dict(batch=0), "batch is 0: it must be at least 1"),
        (dict(rank=-1), "rank is -1: it must be at least 0"),
        (dict(image=wide), "640×64 px: aspect ratios beyond 4:1"),
        (dict(image=torch.where(photo > 0.5, float("nan"), photo)), "NaN or infinite pixel values"),
    ]
    for kw, msg in cases:
        args = dict(image=photo, vae=vae, save_name="never")
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            train(comfy_nodes, m, pos, **args)
    with pytest.raises(ValueError, match="empty conditioning"):
        train(comfy_nodes, m, [], image=photo, vae=vae)
    assert calls[0] == 0 and not any(loras_dir.iterdir())


@pytest.mark.parametrize(
    "name, msg",
    [
        ("x" * 300, r"save_name is too long: 'x+…' is 317 bytes .* at most 238 bytes"),
        ("é" * 121 + "a", "is too long"),  # 243 bytes of UTF-8: over the 238 left by "_slow.safetensors"
        ("astro\x00", r"contains '\\x00'"),
        ("a<b", "contains '<'"),
        ("line\nbreak", r"contains '\\n'"),
        ("../escape", "without '..'"),
        ("/abs", "without '..' or a leading '/'"),
        ("sub//name", "empty folder or file name"),
        ("sub/", "empty folder or file name"),
    ],
)
def test_save_name_that_cannot_be_saved_is_refused_before_training(
    comfy_nodes, tiny, flux, photo, loras_dir, name, msg
):
    model, vae = flux
    m, calls = counting(model)
    with pytest.raises(ValueError, match=msg):
        train(comfy_nodes, m, tiny.conditioning("flux", 1), image=photo, vae=vae, save_name=name)
    assert calls[0] == 0 and not any(loras_dir.iterdir())


def test_any_existing_file_of_the_pair_is_refused_before_training(comfy_nodes, tiny, flux, photo, loras_dir):
    model, vae = flux
    m, calls = counting(model)
    (loras_dir / "astro_fast.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"astro_fast.safetensors already exists: .*Nothing was trained"):
        train(comfy_nodes, m, tiny.conditioning("flux", 1), image=photo, vae=vae, save_name="astro")
    (loras_dir / "sub").write_bytes(b"a file where a folder is asked for")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(comfy_nodes, m, tiny.conditioning("flux", 1), image=photo, vae=vae, save_name="sub/astro")
    assert calls[0] == 0
    assert sorted(p.name for p in loras_dir.iterdir()) == ["astro_fast.safetensors", "sub"]
    # A sub-folder that does not exist yet is created at save time.
    train(comfy_nodes, model, tiny.conditioning("flux", 1), image=photo, vae=vae, save_name="new/astro", steps=1)
    assert sorted(p.name for p in (loras_dir / "new").iterdir()) == ["astro_fast.safetensors", "astro_slow.safetensors"]


def test_a_pair_file_appearing_during_training_writes_neither(comfy_nodes, tiny, flux, photo, loras_dir):
    model, vae = flux
    intruder = loras_dir / "astro_fast.safetensors"

    def appear(n: int) -> None:
        if n == 2:
            intruder.write_bytes(b"someone else's file")

    m, _ = counting(model, appear)
    with pytest.raises(ValueError, match=r"astro_fast.safetensors appeared while training.*Nothing was written"):
        train(comfy_nodes, m, tiny.conditioning("flux", 1), image=photo, vae=vae, save_name="astro")
    assert sorted(p.name for p in loras_dir.iterdir()) == ["astro_fast.safetensors"]
    assert intruder.read_bytes() == b"someone else's file"


def test_pair_writes_are_all_or_nothing_and_leftovers_are_cleaned(comfy_nodes, lora_save, loras_dir):
    import folder_paths

    a = {"w": torch.ones(2, 2)}
    shared = torch.zeros(4)
    bad = {"x": shared, "y": shared}  # safetensors refuses tensors that share memory: the second file fails
    paths = [str(loras_dir / "p_slow.safetensors"), str(loras_dir / "p_fast.safetensors")]
    with pytest.raises(RuntimeError):
        lora_save.save_files_atomic([(paths[0], a, {}), (paths[1], bad, {})], overwrite=False)
    assert not any(loras_dir.iterdir()), "neither file nor any temporary file stays"
    # While a file is written, nothing but our temporary folder appears next to the targets.
    seen: set[str] = set()
    big = {"w": torch.randn(16, 1024, 1024)}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(os.listdir(loras_dir))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        lora_save.save_files_atomic([(str(loras_dir / "big.safetensors"), big, {})], overwrite=False)
    finally:
        done.set()
        watcher.join()
    assert seen - {"big.safetensors"} and all(n.startswith(lora_save.TMP_PREFIX) for n in seen - {"big.safetensors"})
    assert sorted(p.name for p in loras_dir.iterdir()) == ["big.safetensors"]
    (loras_dir / "big.safetensors").unlink()

    # Overwrite replaces both; the old files come back if the set cannot be placed.
    lora_save.save_files_atomic([(p, a, {"v": "1"}) for p in paths], overwrite=False)
    b = {"w": torch.full((2, 2), 2.0)}
    lora_save.save_files_atomic([(p, b, {"v": "2"}) for p in paths], overwrite=True)
    for p in paths:
        with safe_open(p, "pt") as f:
            assert f.metadata()["v"] == "2" and torch.equal(f.get_tensor("w"), b["w"])

    # A killed run's temporaries (older than this process) go at the next save; a live one stays. No loader
    # lists them meanwhile.
    # safetensors itself writes through a hidden .tmp* file in the folder it is given: it lands in ours.
    stale = loras_dir / f"{lora_save.TMP_PREFIX}999-dead"
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"x" * 1000)
    stale_file = loras_dir / f"{lora_save.TMP_PREFIX}998-dead.part"
    stale_file.write_bytes(b"x")
    live = loras_dir / f"{lora_save.TMP_PREFIX}{os.getpid()}-live"
    live.mkdir()
    old = lora_save._STARTED - 3600
    for p in (stale, stale_file):
        os.utime(p, (old, old))
    folder_paths.filename_list_cache.pop("loras", None)
    assert not [n for n in folder_paths.get_filename_list("loras") if lora_save.TMP_PREFIX in n]
    assert lora_save.plan_save(str(loras_dir), "next", ["_slow", "_fast"], overwrite=False)
    assert not stale.exists() and not stale_file.exists() and live.exists()
    assert time.time() >= lora_save._STARTED


def test_distiller_save_name_is_checked_before_distilling(comfy_nodes, tiny, loras_dir):
    model = tiny.build("flux", 0)
    m, calls = counting(model)
    distiller = _n(comfy_nodes, "ArcFlowDistiller")
    args = dict(iterations=2, steps=2, components=2, rank=2, learning_rate=1e-3, batch=1, resolution=32, seed=0)
    for name, msg in [("d" * 250, "save_name is too long"), ("a\x00b", r"contains '\\x00'")]:
        with pytest.raises(ValueError, match=msg), torch.inference_mode():
            distiller.execute(m, tiny.conditioning("flux", 1), save_name=name, **args)
    (loras_dir / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="taken.safetensors already exists"), torch.inference_mode():
        distiller.execute(m, tiny.conditioning("flux", 1), save_name="taken", **args)
    assert calls[0] == 0


def test_unwired_boundary_with_connected_sigmas_is_the_models_own(comfy_nodes, tiny, flux, photo, loras_dir):
    """Sigmas wired in, boundary left at its default: the FLUX boundary (0.934885) splits the FLUX schedule 5 + 5.
    (The old default 0.9 was Qwen-Image's: it put σ = 0.92665 into the Slow expert on FLUX.)"""
    from safetensors import safe_open

    from glance_core import schedules

    model, vae = flux
    sigmas = torch.tensor(schedules.PRESETS["glance_flux"])
    train(
        comfy_nodes,
        model,
        tiny.conditioning("flux", 1),
        steps=1,
        image=photo,
        vae=vae,
        sigmas=sigmas,
        save_name="auto_boundary",
    )
    for expert, expected in (("slow", sigmas[:5]), ("fast", sigmas[5:10])):
        with safe_open(str(loras_dir / f"auto_boundary_{expert}.safetensors"), "pt") as f:
            drawn = json.loads(f.metadata()["glance.timesteps"])
        assert drawn == pytest.approx([float(s) for s in expected], abs=1e-6), expert
