"""Distil an ArcFlow adapter (LoRA + momentum heads) from the connected model, data-free.

A simplified variant of ArcFlow's objective (π-ID with an analytic rollout): for each student step σ_a → σ_b
of the few-step schedule, the student is evaluated once at its own (detached) state x_a, giving the policy.
Intermediate sigmas σ_c in the step are drawn; the state x_c is reached by moving along the detached student
policy for a (1 − r) share of the way and along the teacher (two Euler substeps) for the rest, r decaying from
1 to 0 over the first half of training; there the student's velocity is matched to the teacher's (guided)
velocity. The next step starts from the detached student rollout.

Where it differs from the official training (say so when comparing): the student's prediction is its
*instantaneous* velocity u(σ_c) = Σ π m γ^(σ_a−σ_c), where the official loss uses the policy's mean velocity
over a short window ending at σ_c; component ("GM") dropout on the detached rollout policy is off by default
(``gm_dropout``; official 0.1); the loss is the plain MSE (no ×30 rescale or segment weighting); 2 intermediate
states per step (official 4); no warm-up or 8-bit optimiser. As the official training does, the weights
exported are a power-function EMA (γ = 7) of the run's.

One patched model plays both parts: in teacher mode the heads, the new norm and the LoRA are
bypassed, so no second copy of the weights is needed. Every model call goes through ComfyUI's own
CFGGuider (the teacher with the graph's CFG, the student at cfg 1: guidance is distilled in).
Latents and noise live on the model's load device in float32 (as ComfyUI's samplers keep them; the model
casts to its compute dtype inside); the trained heads are float32 Parameters on the load device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import GlanceError, arcflow, arcflow_model, architectures, checkpoint, lora_layer, training


@dataclass
class DistillResult:
    adapter: dict[str, torch.Tensor]  # the released layout: unprefixed PEFT LoRA + norm_out + heads
    losses: list[float]
    model: object  # the student patcher (heads attached, LoRA as forward hooks)


def initial_heads(model_patcher, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Official init: means = the base projection replicated K times (+ N(0, 0.05) bias per component and
    channel), gates 0 (uniform), λ bias = ln of log-spaced γ in [0.2, 4]; norm = the base norm. float32 on the
    CPU: attach_heads puts them on the load device."""
    model = model_patcher.model
    arch = architectures.of(model, "ArcFlow")
    proj, norm = model_patcher.get_model_object(arch.proj_path), model_patcher.get_model_object(arch.norm_path)
    cfg = model.model_config.unet_config
    p2, ch = cfg.get("patch_size", 2) ** 2, cfg.get("out_channels", 16)
    hidden = proj.in_features
    w = _dense(proj.weight)
    b = _dense(proj.bias) if proj.bias is not None else torch.zeros(w.shape[0], device="cpu")
    noise = 0.05 * torch.randn(k, ch, 1, generator=gen, device="cpu").expand(k, ch, p2).reshape(-1)
    # stored in diffusers order, like a released adapter
    nw = arch.to_comfy_norm(_dense(norm.weight))
    nb = arch.to_comfy_norm(_dense(norm.bias) if norm.bias is not None else None)
    out = {
        "norm_out.linear.weight": nw,
        "proj_out_means.weight": w.repeat(k, 1),
        "proj_out_means.bias": b.repeat(k) + noise,
        "proj_out_logweights.weight": torch.zeros(k * p2, hidden, device="cpu"),
        "proj_out_logweights.bias": torch.zeros(k * p2, device="cpu"),
        "proj_out_loggamma.weight": torch.zeros((k - 1) * p2, hidden, device="cpu"),
        "proj_out_loggamma.bias": arcflow.init_loggamma_bias(k)[:, None].expand(k - 1, p2).reshape(-1).clone(),
    }
    if nb is not None:
        out["norm_out.linear.bias"] = nb
    return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of a weight, dequantising ComfyUI's quantized (mixed-precision) weights."""
    t = t.detach()
    if type(t).__name__ == "QuantizedTensor":  # ComfyUI's quantized weights (newer releases)
        t = t.dequantize()
    return t.to("cpu", torch.float32)


def check_resolution(model_patcher, resolution: int) -> int:
    """The pixel size must give whole patches of latent (the VAE's factor, 8, or 1 in pixel space, × the model's
    patch) and at least two a side."""
    patch = model_patcher.model.model_config.unet_config.get("patch_size", 2)
    vae = getattr(model_patcher.model.latent_format, "spacial_downscale_ratio", 8)
    multiple = vae * patch
    if resolution < 2 * multiple or resolution % multiple:
        lo = max(2 * multiple, resolution // multiple * multiple)
        raise GlanceError(
            f"ArcFlow Distiller: resolution {resolution} is not a multiple of {multiple} px (the VAE's {vae} × the "
            f"model's {patch}×{patch} patch) of at least {2 * multiple}: use {lo} or {lo + multiple}."
        )
    return resolution


def draw(gen: torch.Generator, shape: tuple[int, ...], steps: int, intermediates: int) -> tuple[torch.Tensor, list]:
    """One iteration's noise (float32, CPU: the same numbers for a seed on every device, as ComfyUI's noise)
    and the fractions of each step where its intermediate states lie."""
    noise = torch.randn(shape, generator=gen, device="cpu")
    fractions = [
        [0.05 + 0.95 * float(torch.rand((), generator=gen, device="cpu")) for _ in range(intermediates)]
        for _ in range(steps)
    ]
    return noise, fractions


def iteration(
    noise: torch.Tensor,
    fractions: list[list[float]],
    sched: list[float],
    r: float,
    device: torch.device,
    teacher_velocity: Callable,
    student_policy: Callable,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> list[torch.Tensor]:
    """One distillation iteration (see the module doc): ``backward`` of each student step's loss as soon as it is
    known (its graph is freed before the next step); returns the losses. ``teacher_velocity(x, σ)`` and
    ``student_policy(x, σ, grad)`` evaluate the model."""
    x = noise.to(device=device, dtype=torch.float32)
    losses = []
    for i, step_fractions in enumerate(fractions):
        sa, sb = sched[i], sched[i + 1]
        pol = student_policy(x, sa, False).detach()
        # Intermediate states and the teacher's velocity there (no gradients).
        pairs = []
        for u in step_fractions:
            sc = sa - u * (sa - sb)
            smid = sa - (1.0 - r) * (sa - sc)
            xc = x - pol.displacement(sa, smid).to(x.dtype)
            if smid > sc:  # the teacher's share of the way, in two Euler substeps
                for s0, s1 in ((smid, (smid + sc) / 2), ((smid + sc) / 2, sc)):
                    xc = xc + teacher_velocity(xc, s0) * (s1 - s0)
            pairs.append((sa - sc, teacher_velocity(xc, sc)))
        # The student's velocities there, with gradients (LoRA on while backward recomputes blocks).
        student = student_policy(x, sa, True)
        with torch.enable_grad():
            loss = sum(torch.nn.functional.mse_loss(student.velocity(el), v) for el, v in pairs) / len(pairs)
            backward(loss)
        losses.append(loss)
        x = (x - pol.displacement(sa, sb).to(x.dtype)).detach()
    return losses


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], t: int, gamma: float) -> None:
    """Update ``t`` (1-based) of the power-function EMA (Karras et al.), β = (1 − 1/t)^(γ+1): the average weighs
    the t-th weights ∝ t^γ, so it follows the run and forgets its start (γ = 0 is the plain running mean)."""
    beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1.0 - beta)


@checkpoint.outside_inference_mode(grad=None)
@checkpoint.training_mode()
def distill(
    model_patcher,
    captions: list[tuple[list, list | None]],
    *,
    teacher_cfg: float,
    iterations: int,
    steps: int = 2,
    shift: float = 3.2,
    k: int = 16,
    rank: int = 16,
    lr: float = 1e-3,
    batch: int = 4,
    seed: int = 0,
    latent_shape: tuple[int, ...],
    intermediates: int = 2,
    targets: str = "arcflow",
    ema_gamma: float | None = 7.0,
    gm_dropout: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> DistillResult:
    """Distil (see module doc). ``captions``: (positive, negative) conditionings, cloned outside inference mode."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import comfy.samplers

    if k < 2:
        raise GlanceError(f"ArcFlow needs at least 2 momentum components (got K = {k}).")
    if not (math.isfinite(lr) and lr > 0):
        raise GlanceError(f"ArcFlow Distiller: learning_rate must be a finite number > 0 (got {lr}); try 1e-3.")
    gen = torch.Generator().manual_seed(seed)
    student = model_patcher.clone()
    lora = lora_layer.TrainableLoRA(model_patcher, targets, rank, float(rank), gen)
    student.set_injections(f"arcflow_lora_{seed}", [pe.PatcherInjection(inject=lora.inject, eject=lora.eject)])
    state = arcflow_model.attach_heads(student, initial_heads(model_patcher, k, gen), k, shift, trainable=True)
    heads, norm = student.attachments[arcflow_model.STATE_KEY + "_modules"]
    head_params = list(heads.heads.parameters())
    norm_params = list(norm.linear.parameters())
    gamma_params = [p for name, p in heads.named_parameters() if "loggamma" in name]
    other_heads = [p for p in head_params if all(p is not g for g in gamma_params)]
    params = lora.parameters() + head_params + norm_params
    checkpoint.block_patches(student, params)
    opt = torch.optim.AdamW(
        [{"params": lora.parameters() + other_heads + norm_params}, {"params": gamma_params, "lr": lr * 0.1}],
        lr=lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    sched = arcflow.schedule(steps, shift)
    guider = comfy.samplers.CFGGuider(student)
    dummy = torch.tensor([1.0, 0.0], device="cpu")
    losses: list[float] = []

    def call(x: torch.Tensor, sigma: float, teacher: bool, fn: Callable, cond) -> None:
        """One ComfyUI model evaluation of the patched model, in teacher or student mode."""
        pos, neg = cond
        state.teacher_mode, lora.enabled, state.record = teacher, not teacher, not teacher
        use_cfg = teacher and teacher_cfg != 1.0 and neg is not None
        guider.set_conds(pos, neg if use_cfg else [])
        guider.set_cfg(teacher_cfg if use_cfg else 1.0)

        def one(model_wrap, extra_args, latent):
            s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
            fn(model_wrap(x, s, **extra_args))
            return latent

        guider.sample(
            torch.zeros_like(x[:1]),
            torch.zeros_like(x[:1]),
            training.one_step_sampler(one),
            dummy,
            disable_pbar=True,
            seed=seed,
        )

    def teacher_velocity(x, sigma, cond) -> torch.Tensor:
        out = {}
        with torch.no_grad():
            call(x, sigma, True, lambda den: out.setdefault("v", (x - den) / sigma), cond)
        return out["v"].to(torch.float32)

    def student_policy(x, sigma, cond, grad: bool):
        out = {}
        with torch.enable_grad() if grad else torch.no_grad():
            call(x, sigma, False, lambda den: out.setdefault("p", state.policy(x)), cond)
        state.raw = None
        if not grad and gm_dropout > 0:  # the rollout's policy loses whole components (official "GM dropout")
            return out["p"].without(torch.rand((x.shape[0], k), generator=gen, device="cpu") < gm_dropout)
        return out["p"]

    shape = (batch, *latent_shape[1:])
    ema = [p.detach().clone() for p in params] if ema_gamma is not None else []  # None: the last weights
    try:
        for it in range(iterations):
            mm.throw_exception_if_processing_interrupted()
            cond = captions[it % len(captions)]
            r = max(0.0, 1.0 - it / max(1, iterations // 2))  # teacher share, 1 → 0 over the first half
            noise, fractions = draw(gen, shape, steps, intermediates)
            step_losses = iteration(
                noise,
                fractions,
                sched,
                r,
                student.load_device,
                lambda x, s, c=cond: teacher_velocity(x, s, c),
                lambda x, s, grad, c=cond: student_policy(x, s, c, grad),
            )
            values = [float(v.detach()) for v in step_losses]
            if not all(math.isfinite(v) for v in values):
                raise GlanceError(
                    f"ArcFlow distillation diverged at iteration {it + 1} (loss {values}): lower the "
                    f"learning rate ({lr}). Nothing was saved."
                )
            torch.nn.utils.clip_grad_norm_(params, 50.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema:
                ema_update(ema, params, it + 1, ema_gamma)
            losses.append(sum(values) / steps)
            if on_step:
                on_step(it, losses[-1])
    finally:
        state.teacher_mode, lora.enabled, state.record, state.raw = False, True, False, None
        for p in params:
            p.requires_grad_(False)
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for e, p in zip(ema, params):  # the averaged weights are what is exported and sampled
            p.copy_(e)
    adapter = {key[len("transformer.") :]: v for key, v in lora.state_dict().items()}
    adapter.update(arcflow_model.export_heads(student))
    return DistillResult(adapter, losses, student)
