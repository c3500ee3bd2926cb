"""OneShotTrainer in real ComfyUI (tiny FLUX / Qwen-Image, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tests_helpers import model_state, sample, train

from glance_core import schedules

FLUX = list(schedules.PRESETS["glance_flux"])


def _n(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


@pytest.fixture(scope="module")
def photo():
    """scikit-image's astronaut (a real photograph, bundled in the wheel) as a ComfyUI IMAGE."""
    from skimage import data

    return torch.from_numpy(data.astronaut().astype(np.float32) / 255.0)[None]


@pytest.fixture
def flux(comfy_nodes, tiny):
    import comfy.sd

    with torch.inference_mode():  # as ComfyUI's executor loads models
        model = tiny.build("flux", 0)
        vae = comfy.sd.VAE(sd=tiny.tiny_vae_state_dict("flux", 0))
    return model, vae


def train_official(training, model, tiny, x0, job, steps: int):
    """The core routine on the official objective: rank 4, lr 2e-3, batch 4."""
    return training.train_expert(
        model,
        job,
        objective="official",
        positive=tiny.conditioning("flux", 1),
        rank=4,
        alpha=4.0,
        lr=2e-3,
        steps=steps,
        seed=0,
        targets="official",
        batch=4,
        x0=x0,
    )


def record_sigmas(model):
    """A clone of ``model`` whose evaluations append their sigma to the returned list."""
    import comfy.patcher_extension as pe

    seen: list[float] = []

    def wrapper(executor, x, t, *args, **kwargs):
        seen.extend(float(s) for s in t.flatten().unique())
        return executor(x, t, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_record", wrapper)
    return m, seen


def test_node_trains_both_experts_from_a_real_photo(comfy_nodes, tiny, flux, photo):
    model, vae = flux
    pos = tiny.conditioning("flux", 1)
    slow, fast, _, curve = train(comfy_nodes, model, pos, image=photo, vae=vae, steps=60, learning_rate=2e-3, batch=4)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert slow and fast and all(torch.isfinite(v).all() for v in slow.values())


def test_official_loss_falls_on_a_real_photo(comfy_nodes, glance, tiny, flux, photo):
    import importlib

    training = importlib.import_module(glance.__name__ + ".glance_core.training")
    model, vae = flux
    with torch.inference_mode():
        x0 = vae.encode(photo[:, ::8, ::8, :3])
    res = train_official(training, model, tiny, x0, training.ExpertJob("fast", FLUX[5:10], FLUX[6:11]), 80)
    first, last = np.mean(res.losses[:15]), np.mean(res.losses[-15:])
    assert last < 0.9 * first, (first, last)


def test_snapshots_are_the_shorter_runs(comfy_nodes, glance, tiny, flux, photo):
    """A learning curve from one run: the copy kept after n steps is the factors an n-step run of the same seed ends
    with, the last copy is the result, and a step count outside the run is refused before any training."""
    import importlib

    training = importlib.import_module(glance.__name__ + ".glance_core.training")
    model, vae = flux
    with torch.inference_mode():
        x0 = vae.encode(photo[:, ::8, ::8, :3])
    job = training.ExpertJob("fast", FLUX[5:10], FLUX[6:11])
    kw = dict(
        objective="official", positive=tiny.conditioning("flux", 1), rank=4, alpha=4.0, lr=2e-3, seed=0,
        targets="official", batch=2, x0=x0,
    )  # fmt: skip
    long = training.train_expert(model, job, steps=6, snapshots=(3, 6), **kw)
    short = training.train_expert(model, job, steps=3, **kw)
    assert sorted(long.snapshots) == [3, 6]
    for k, v in short.state_dict.items():
        torch.testing.assert_close(long.snapshots[3][k], v, rtol=0, atol=0)
        assert torch.equal(long.snapshots[6][k], long.state_dict[k])
    assert any(not torch.equal(long.snapshots[3][k], long.snapshots[6][k]) for k in short.state_dict)
    calls = []
    with pytest.raises(Exception, match=r"snapshots \[7\] are outside the run's steps 1\.\.6"):
        training.train_expert(model, job, steps=6, snapshots=(7,), on_step=lambda *a: calls.append(a), **kw)
    assert calls == []


@pytest.mark.parametrize("expert", ["slow", "fast"])
def test_only_the_experts_timesteps_are_drawn(comfy_nodes, tiny, flux, photo, expert):
    model, vae = flux
    rec, seen = record_sigmas(model)
    train(comfy_nodes, rec, tiny.conditioning("flux", 1), image=photo, vae=vae, expert=expert, steps=12)
    allowed = FLUX[:5] if expert == "slow" else FLUX[5:10]
    assert seen and {round(s, 5) for s in seen} <= {round(s, 5) for s in allowed}
    assert len({round(s, 5) for s in seen}) >= 3


def test_same_seed_same_lora_bit_for_bit(comfy_nodes, tiny, flux, photo):
    model, vae = flux
    pos = tiny.conditioning("flux", 1)
    a = train(comfy_nodes, model, pos, image=photo, vae=vae, seed=3)
    b = train(comfy_nodes, model, pos, image=photo, vae=vae, seed=3)
    c = train(comfy_nodes, model, pos, image=photo, vae=vae, seed=4)
    for i in (0, 1):
        assert a[i].keys() == b[i].keys()
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
        assert any(not torch.equal(a[i][k], c[i][k]) for k in a[i])


def test_saved_files_reload_identically_everywhere(comfy_nodes, tiny, flux, photo, loras_dir):
    model, vae = flux
    pos, neg = tiny.conditioning("flux", 1), tiny.conditioning("flux", 2)
    slow, fast, trained, _ = train(comfy_nodes, model, pos, image=photo, vae=vae, save_name="astro")
    files = sorted(p.name for p in loras_dir.iterdir())
    assert files == ["astro_fast.safetensors", "astro_slow.safetensors"]
    with safe_open(str(loras_dir / "astro_slow.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["glance.expert"] == "slow" and meta["glance.base_arch"] == "flux"
    assert meta["glance.rank"] == "4" and float(meta["glance.alpha"]) == 4.0 and meta["glance.steps"] == "6"
    assert json.loads(meta["glance.timesteps"]) == [round(s, 6) for s in FLUX[:5]]
    assert len(meta["glance.source_image_sha256"]) == 64 and "strength 1.0" in meta["glance.scale_convention"]
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    sig = torch.tensor(FLUX)
    lat = tiny.latent("flux", 64, 64)

    def run(m, sigmas=sig):
        return sample(comfy_nodes, m, sigmas, pos, neg, lat)

    in_graph = run(trained)
    loader = _n(comfy_nodes, "PhaseAwareLoRALoader")
    boundary = schedules.preset("glance_flux").boundary
    from_files = loader.execute(model, "astro_slow.safetensors", "astro_fast.safetensors", 1.0, 1.0, boundary).args[0]
    from_wires = loader.execute(model, "None", "None", 1.0, 1.0, boundary, slow, fast).args[0]
    assert torch.equal(run(from_files), in_graph)
    assert torch.equal(run(from_wires), in_graph)
    # Stock LoraLoaderModelOnly: the Slow file over the Slow half, the Fast file over the Fast half.
    stock = _n(comfy_nodes, "LoraLoaderModelOnly")()
    high, low = _n(comfy_nodes, "SplitSigmas").execute(sig, 5).args

    half = sample(comfy_nodes, stock.load_lora_model_only(model, "astro_slow.safetensors", 1.0)[0], high, pos, neg, lat)
    full = sample(
        comfy_nodes,
        stock.load_lora_model_only(model, "astro_fast.safetensors", 1.0)[0],
        low,
        pos,
        neg,
        half,
        add_noise=False,
    )
    assert float((full - in_graph).abs().max()) <= 1e-5 * max(1.0, float(in_graph.abs().max()))
    assert not torch.equal(in_graph, run(model)), "training changed the model's output"

    with pytest.raises(ValueError, match="astro_slow.safetensors and .*astro_fast.safetensors already exist"):
        train(comfy_nodes, model, pos, image=photo, vae=vae, save_name="astro")
    train(comfy_nodes, model, pos, image=photo, vae=vae, save_name="astro", overwrite=True, seed=9)
    assert sorted(p.name for p in loras_dir.iterdir()) == files, "atomic writes leave no temporary file"


def test_interrupt_stops_promptly_keeps_the_model_and_writes_nothing(comfy_nodes, tiny, flux, photo, loras_dir):
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    model, vae = flux
    state = model_state(model)
    calls = [0]

    def interrupt_after_5(executor, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_interrupt", interrupt_after_5)
    with pytest.raises(mm.InterruptProcessingException):
        train(comfy_nodes, m, tiny.conditioning("flux", 1), image=photo, vae=vae, steps=200, save_name="stopped")
    assert calls[0] <= 6, "training stopped at the next step"
    assert not any(loras_dir.iterdir())
    mm.unload_all_models()
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    assert all(not mod._forward_hooks for mod in model.model.modules())


def test_bad_inputs_are_named(comfy_nodes, tiny, flux, photo):
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    model, vae = flux
    pos = tiny.conditioning("flux", 1)
    state = model_state(model)
    with torch.inference_mode():
        sd4 = {k: v for k, v in TAESD(latent_channels=4).state_dict().items()}
        vae4 = comfy.sd.VAE(sd=tiny.seeded_state_dict({k: v.shape for k, v in sd4.items()}, 0))
    eps = _n(comfy_nodes, "ModelSamplingDiscrete")().patch(model, "eps", False)[0]
    cases = [
        (dict(image=photo.repeat(2, 1, 1, 1), vae=vae), "ONE image; got a batch of 2"),
        (dict(image=torch.cat([photo, photo[..., :1]], -1), vae=vae), "alpha channel"),
        (dict(image=photo[..., :1], vae=vae), "1 channel.*greyscale"),
        (dict(image=photo[:, :40, :40], vae=vae), "too small"),
        (dict(image=photo, vae=vae4), "4-channel latents but the model expects 16"),
        (dict(), "trains on an image: connect an IMAGE"),
        (dict(image=photo, vae=vae, learning_rate=1e12, steps=30), "diverged.*learning rate.*Nothing was saved"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            train(comfy_nodes, model, pos, **kw)
    with pytest.raises(ValueError, match="flow-matching model"):
        train(comfy_nodes, eps, pos, image=photo, vae=vae)
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())


def test_gradients_through_inplace_blocks_match_finite_differences(comfy_nodes, glance, tiny):
    """ComfyUI's FLUX blocks add residuals in place; the block checkpoint must still give exact gradients."""
    import importlib

    import comfy.patcher_extension as pe
    import comfy.samplers

    training = importlib.import_module(glance.__name__ + ".glance_core.training")
    checkpoint = importlib.import_module(glance.__name__ + ".glance_core.checkpoint")
    lora_layer = importlib.import_module(glance.__name__ + ".glance_core.lora_layer")
    model = tiny.build("flux", 0)
    gen = torch.Generator().manual_seed(0)
    lora = lora_layer.TrainableLoRA(model, "official", 2, 2.0, gen)
    for t in lora.targets:
        t.B.data.normal_(0, 0.1, generator=gen)
    student = model.clone()
    student.set_injections("t", [pe.PatcherInjection(inject=lora.inject, eject=lora.eject)])
    checkpoint.block_patches(student, lora.parameters())
    guider = comfy.samplers.CFGGuider(student)
    guider.set_conds(tiny.conditioning("flux", 1), [])
    guider.set_cfg(1.0)
    x = torch.randn(1, 16, 4, 4, generator=gen)
    losses = []

    def loss_fn(model_wrap, extra_args, latent):
        den = model_wrap(x, torch.full((1,), 0.7), **extra_args)
        loss = (den**2).mean()
        losses.append(loss)
        return latent

    def loss(grad: bool) -> torch.Tensor:
        with torch.enable_grad() if grad else torch.no_grad():
            guider.sample(
                torch.zeros_like(x),
                torch.zeros_like(x),
                training.one_step_sampler(loss_fn),
                torch.tensor([1.0, 0.0]),
                disable_pbar=True,
                seed=0,
            )
        return losses[-1]

    lora.enabled = True
    with checkpoint.training_mode():
        loss(True).backward()
    for t in (lora.targets[0], lora.targets[-1]):  # first double block and last single block
        direction = torch.randn(t.A.shape, generator=gen)
        analytic = float((t.A.grad * direction).sum())
        h = 1e-2
        with torch.no_grad():
            t.A += h * direction
            up = float(loss(False))
            t.A -= 2 * h * direction
            down = float(loss(False))
            t.A += h * direction
        numeric = (up - down) / (2 * h)
        assert abs(analytic - numeric) <= 2e-2 * abs(numeric) + 1e-6, (t.name, analytic, numeric)
    lora.enabled = False


@pytest.mark.parametrize("unroll", [False, True], ids=["per-step", "unrolled"])
def test_trajectory_objective_shrinks_the_gap_to_50_steps_on_held_out_seeds_and_prompts(comfy_nodes, tiny, unroll):
    """Data-free: trained from 8 captions' teacher rollouts, evaluated on other noises and other captions; per
    step from the teacher's states, or through each expert's whole phase (``unroll``, a quarter of the steps)."""
    import comfy.samplers

    with torch.inference_mode():
        model = tiny.build("flux", 0)
    captions = [tiny.conditioning("flux", 100 + i) for i in range(8)]
    held_out = [tiny.conditioning("flux", 900 + i) for i in range(3)]
    ms = model.get_model_object("model_sampling")
    fifty = torch.tensor([ms.percent_to_sigma(i / 50) for i in range(50)] + [0.0])
    glance_sigmas = torch.tensor(FLUX)
    lat = tiny.latent("flux", 64, 64)

    def run(m, sigmas, cond, seed):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(cond, [])
        g.set_cfg(1.0)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
        return g.sample(
            noise, torch.zeros_like(lat), comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=seed
        )

    def gap(m, conds, seeds):
        errs = []
        for c in conds:
            for s in seeds:
                ref = run(model, fifty, c, s)
                errs.append(float(((run(m, glance_sigmas, c, s) - ref) ** 2).mean() / (ref**2).mean()))
        return float(np.mean(errs))

    positive = [entry for c in captions for entry in c]  # a combined conditioning: one caption per entry
    _, _, trained, curve = train(
        comfy_nodes,
        model,
        positive,
        objective="trajectory",
        steps=50 if unroll else 200,
        rank=8,
        alpha=8.0,
        learning_rate=1e-3,
        batch=16,
        noises=8,
        teacher_steps=50,
        unroll=unroll,
    )
    seen_plain, seen_trained = gap(model, captions[:2], [5000, 5001]), gap(trained, captions[:2], [5000, 5001])
    held_plain, held_trained = gap(model, held_out, [5000]), gap(trained, held_out, [5000])
    assert seen_trained < 0.7 * seen_plain, (seen_plain, seen_trained)
    assert held_trained < held_plain, (held_plain, held_trained)


def test_trains_a_bf16_model(comfy_nodes, glance, tiny, photo):
    """Memory trick: base weights in bf16, LoRA factors trained in fp32."""
    import importlib

    import comfy.sd

    training = importlib.import_module(glance.__name__ + ".glance_core.training")
    with torch.inference_mode():
        model = tiny.build("flux", 0, dtype=torch.bfloat16)
        vae = comfy.sd.VAE(sd=tiny.tiny_vae_state_dict("flux", 0))
        x0 = vae.encode(photo[:, ::8, ::8, :3])
    assert next(model.model.diffusion_model.parameters()).dtype == torch.bfloat16
    res = train_official(training, model, tiny, x0, training.ExpertJob("slow", FLUX[:5], FLUX[1:6]), 40)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in res.state_dict.values())
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])


def _tiny_rollouts(glance, tiny, noises: int):
    """The pack's training and rollouts modules, a tiny FLUX, one caption and the teacher's trajectories over the
    fine grid (cfg 1) from ``noises`` noises: (training, rollouts, model, positive, grid, trajectories)."""
    import importlib

    training = importlib.import_module(glance.__name__ + ".glance_core.training")
    rollouts = importlib.import_module(glance.__name__ + ".glance_core.rollouts")
    with torch.inference_mode():
        model = tiny.build("flux", 0)
    pos = training.clone_conditioning(tiny.conditioning("flux", 1))
    grid = rollouts.fine_grid(model.get_model_object("model_sampling").percent_to_sigma, 50, FLUX)
    traj = rollouts.teacher_trajectories(model, [(pos, None)], 1.0, noises, 0, (1, 16, 4, 4), grid, FLUX)
    return training, rollouts, model, pos, grid, traj


def test_student_rollout_mixing(comfy_nodes, glance, tiny):
    """The Euler helper behind the student-rollout option reproduces the teacher's own rollout, and mixing
    student states in trains a different, finite LoRA."""
    import comfy.samplers

    training, rollouts, model, pos, grid, traj = _tiny_rollouts(glance, tiny, 4)
    states = traj["captions"][0]["states"]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, [])
    guider.set_cfg(1.0)
    seg = [g for g in grid if FLUX[6] <= g <= FLUX[5]]
    with torch.inference_mode(False), torch.no_grad():
        x = rollouts.euler(guider, states[FLUX[5]], seg, 0)
    assert torch.allclose(x, states[FLUX[6]], atol=1e-4 * float(states[FLUX[6]].abs().max()))

    job = training.ExpertJob("fast", FLUX[5:10], FLUX[6:11])
    kw = dict(
        objective="trajectory",
        positive=pos,
        rank=4,
        alpha=4.0,
        lr=1e-3,
        steps=16,
        seed=0,
        targets="official",
        batch=4,
        trajectories=traj,
    )
    plain = training.train_expert(model, job, **kw)
    mixed = training.train_expert(model, job, student_mix=1.0, **kw)
    assert all(torch.isfinite(v).all() for v in mixed.state_dict.values())
    assert any(not torch.equal(plain.state_dict[k], mixed.state_dict[k]) for k in plain.state_dict)
    assert "student_pairs" in traj["captions"][0]


def test_unrolled_loss_is_the_euler_chain_against_the_teacher_states(comfy_nodes, glance, tiny):
    """``unroll``: the first loss (LoRA still zero, so the student is the base model) is the mean over the expert's
    steps of the squared distance between the plain Euler chain from the teacher's state at its first sigma and the
    teacher's states — computed here independently through ComfyUI's guider, one Euler step at a time."""
    import comfy.samplers

    training, rollouts, model, pos, _, traj = _tiny_rollouts(glance, tiny, 1)
    states = traj["captions"][0]["states"]
    job = training.ExpertJob("fast", FLUX[5:10], FLUX[6:11])
    res = training.train_expert(
        model, job, objective="trajectory", positive=pos, rank=4, alpha=4.0, lr=1e-3, steps=3, seed=0,
        targets="official", batch=1, trajectories=traj, unroll=True,
    )  # fmt: skip
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, [])
    guider.set_cfg(1.0)
    x, expected = states[FLUX[5]], 0.0
    with torch.inference_mode(False), torch.no_grad():
        for s0, s1 in zip(job.sigmas, job.next_sigmas):
            x = rollouts.euler(guider, x, [s0, s1], 0)
            expected += float(torch.nn.functional.mse_loss(x, states[s1])) / len(job.sigmas)
    assert expected > 0 and res.losses[0] == pytest.approx(expected, rel=1e-3)
    assert res.drawn_sigmas == [FLUX[5]] * 3  # every step starts at the expert's first sigma
    assert res.losses[-1] < res.losses[0]


def test_official_flux_training_uses_guidance_one(comfy_nodes, tiny, flux, photo):
    """The released FLUX recipe feeds guidance 1.0 while training, whatever the caption's FluxGuidance says."""
    import comfy.patcher_extension as pe

    model, vae = flux
    seen = []

    def wrapper(executor, x, t, *args, **kwargs):
        seen.append(float(kwargs["guidance"].flatten()[0]))
        return executor(x, t, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_guidance", wrapper)
    pos = tiny.conditioning("flux", 1, guidance=3.5)
    train(comfy_nodes, m, pos, image=photo, vae=vae, expert="slow", steps=3)
    assert seen and set(seen) == {1.0}


def test_each_training_step_sees_its_own_caption(comfy_nodes, glance, tiny):
    """The whole run is one sampling call with every caption's conditioning processed once: step k still trains
    on caption k mod n (not on the first caption only)."""
    import importlib

    import comfy.patcher_extension as pe

    training = importlib.import_module(glance.__name__ + ".glance_core.training")
    rollouts = importlib.import_module(glance.__name__ + ".glance_core.rollouts")
    with torch.inference_mode():
        model = tiny.build("flux", 0)
    caps = [training.clone_conditioning(tiny.conditioning("flux", 10 + i)) for i in range(3)]
    grid = rollouts.fine_grid(model.get_model_object("model_sampling").percent_to_sigma, 12, FLUX)
    traj = rollouts.teacher_trajectories(model, [(c, None) for c in caps], 1.0, 2, 0, (1, 16, 4, 4), grid, FLUX)
    seen = []

    def spy(executor, x, t, *args, **kwargs):
        context = args[1] if len(args) > 1 else kwargs["c_crossattn"]  # apply_model(x, t, c_concat, c_crossattn…)
        seen.append(context[0].detach().clone())
        return executor(x, t, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_spy", spy)
    job = training.ExpertJob("fast", FLUX[5:10], FLUX[6:11])
    training.train_expert(
        m, job, objective="trajectory", positive=caps[0], rank=2, alpha=2.0, lr=1e-3, steps=6, seed=0,
        targets="official", batch=2, trajectories=traj,
    )  # fmt: skip
    assert len(seen) == 6
    for k, ctx in enumerate(seen):
        assert torch.equal(ctx, caps[k % 3][0][0][0].to(ctx)), f"step {k} did not see caption {k % 3}"
