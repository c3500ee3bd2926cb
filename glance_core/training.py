"""Training a Glance expert: a LoRA on a frozen ComfyUI model, inside ComfyUI's own sampling loop.

Two objectives:

- ``official``: the released recipe. x_σ = (1−σ)·x0 + σ·ε from ONE image latent x0, target ε − x0,
  unweighted MSE on the velocity; each step draws one of the expert's timesteps.
- ``trajectory``: targets that carry the step error. The frozen model is rolled out with fine
  Euler steps (``rollouts``: its 50-step schedule with the Glance sigmas added, with the graph's CFG/guidance);
  for a Glance step σ_i → σ_{i+1} the expert at the teacher's state x_T(σ_i) is trained to predict
  the average velocity (x_T(σ_i) − x_T(σ_{i+1})) / (σ_i − σ_{i+1}), so that ONE Euler step lands
  on the teacher. Data-free: it needs captions, not images.

Mechanism (why): the factors are an adapter of ``lora_layer.LoRALayers``, the same forward hooks as the
inference experts, so there is no module surgery on the shared model and the trained factors are used exactly
as they are later loaded. The whole run is ONE ``CFGGuider.sample`` call whose Sampler runs the loop and points
the processed conditioning at each step's caption (as core's trainer does), so conditioning processing, model
loading, wrappers and CFG are ComfyUI's own and happen once; gradients pass ComfyUI's in-place blocks through
``checkpoint``.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from . import GlanceError, architectures
from .checkpoint import _outside_blocks, block_patches, normal_weights, outside_inference_mode, training_mode
from .lora_layer import TrainableLoRA, random_indices, random_normal
from .rollouts import euler_steps

#: Kept for bench/bench_fidelity.py until it reads the table: (rank, alpha, lr) per family.
OFFICIAL = {a.name: (a.rank, a.alpha, a.learning_rate) for a in architectures.ARCHITECTURES.values()}


@dataclass
class ExpertJob:
    """What to train: one expert's timesteps and targets."""

    expert: str  # "slow" | "fast"
    sigmas: list[float]  # the expert's evaluation sigmas, e.g. [1.0, .987, .973, .959, .943]
    next_sigmas: list[float]  # for each, the next sigma of the Glance schedule (trajectory targets)


def expert_jobs(schedule) -> dict[str, ExpertJob]:
    """The Slow and Fast jobs of a ``schedules.SlowFastSchedule``: each expert's sigmas and the next ones."""
    k, s = schedule.slow_steps, list(schedule.sigmas)
    return {"slow": ExpertJob("slow", s[:k], s[1 : k + 1]), "fast": ExpertJob("fast", s[k:-1], s[k + 1 :])}


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    losses: list[float]
    drawn_sigmas: list[float]
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``{steps done: state dict}`` at the steps asked for with ``snapshots`` (a learning curve in one run).
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


@functools.cache
def _sampler_class() -> type:
    import comfy.samplers

    class OneStepSampler(comfy.samplers.Sampler):
        """A ComfyUI Sampler whose ``sample`` runs ``fn`` with the guider as the model: one step (the ArcFlow
        distiller) or a whole training loop (:func:`train_expert`)."""

        def __init__(self, fn: Callable | None = None, swap: bool = True):
            self.fn, self.swap = fn, swap

        def sample(
            self,
            model_wrap,
            sigmas,
            extra_args,
            callback,
            noise,
            latent_image=None,
            denoise_mask=None,
            disable_pbar=False,
        ):
            if not torch.is_grad_enabled() or not self.swap:
                return self.fn(model_wrap, extra_args, latent_image)
            # The blocks swap their own weights while backward recomputes them (block checkpoint).
            with normal_weights(_outside_blocks(model_wrap.inner_model.diffusion_model)):
                return self.fn(model_wrap, extra_args, latent_image)

    return OneStepSampler


def one_step_sampler(fn: Callable | None = None, swap: bool = True):
    """A ComfyUI Sampler running ``fn(model_wrap, extra_args, latent)`` once per ``guider.sample``; ``swap``: with
    the weights outside the blocks swapped for normal tensors (off when ``fn`` swaps per step itself)."""
    return _sampler_class()(fn, swap)


def clone_conditioning(cond):
    """A copy of a CONDITIONING whose tensors are normal (not inference-mode) tensors."""
    out = []
    for t, d in cond:
        d2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        out.append([t.clone(), d2])
    return out


def official_pair(
    latent: torch.Tensor, sigma: float, batch: int, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official objective's input x_σ = (1−σ)·x0 + σ·ε and target ε − x0 for ``batch`` noises, in fp32 on
    the latent's device. ε comes from the CPU generator, so a seed gives the same run on any device."""
    x = latent.repeat(batch, *([1] * (latent.ndim - 1))).to(torch.float32)
    eps = random_normal(x.shape, gen, x.device)
    return (1.0 - sigma) * x + sigma * eps, eps - x


def trajectory_pair(
    states: dict[float, torch.Tensor], s0: float, s1: float, batch: int, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher states at ``s0`` and the average velocity to ``s1`` (the trajectory target), on the states'
    device."""
    idx = random_indices(states[s0].shape[0], batch, gen, states[s0].device)
    x = states[s0].index_select(0, idx)
    return x, (x - states[s1].index_select(0, idx)) / (s0 - s1)


@outside_inference_mode(grad=True)
@training_mode()
def train_expert(
    model_patcher,
    job: ExpertJob,
    *,
    objective: str,
    positive: list,
    rank: int,
    alpha: float,
    lr: float,
    steps: int,
    seed: int,
    targets: str,
    batch: int = 1,
    x0: torch.Tensor | None = None,
    images: list[tuple[torch.Tensor, list]] | None = None,
    trajectories: dict | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    student_mix: float = 0.0,
    unroll: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    snapshots: Collection[int] = (),
) -> TrainResult:
    """Train one expert. ``x0`` (VAE latent of the image) for ``official`` — or ``images``, several
    (latent, positive) pairs visited in turn, one per step; ``trajectories``
    (from :func:`teacher_trajectories`) for ``trajectory``; ``student_mix``: in the second half, the share
    of steps trained on the student's own rollout states (refreshed 8 times), with the teacher's fine
    rollout from each as the target; ``unroll``: each step runs the expert's whole phase instead (see
    ``unrolled_step``; ``student_mix`` is then unused); ``snapshots``: step counts after which a copy of the
    factors is kept in ``TrainResult.snapshots``. Returns the saved-format state dict."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import comfy.samplers

    gen = torch.Generator().manual_seed(seed)
    lora = TrainableLoRA(model_patcher, targets, rank, alpha, gen)
    params = lora.parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
    student = model_patcher.clone()
    key = f"glance_train_{uuid.uuid4().hex[:8]}"
    student.set_injections(key, [pe.PatcherInjection(inject=lora.inject, eject=lora.eject)])
    block_patches(student, params)
    guider = comfy.samplers.CFGGuider(student)
    losses: list[float] = []
    drawn: list[float] = []
    kept: dict[int, dict[str, torch.Tensor]] = {}
    bad = [n for n in snapshots if not 1 <= n <= steps]
    if bad:
        raise GlanceError(f"snapshots {bad} are outside the run's steps 1..{steps}: ask for step counts within it.")

    # Every step's conditioning is processed once, up front: the guider gets all of them as ONE positive list
    # and each step points the processed list at its own entries (as core's trainer does).
    if objective == "official":
        images = images or ([(x0, positive)] if x0 is not None else [])
        if not images:
            raise GlanceError("The official objective trains on an image: connect an IMAGE and a VAE.")
        if len({tuple(lat.shape) for lat, _ in images}) > 1:
            raise GlanceError("The training images must share one size: resize or crop them to the same size.")
        sources = [pos for _, pos in images]
        negative, cfg = [], 1.0
        latent = torch.cat([lat for lat, _ in images])
    elif objective == "trajectory":
        if not trajectories:
            raise GlanceError("The trajectory objective needs teacher trajectories.")
        caps = trajectories["captions"]
        sources = [c["positive"] for c in caps]
        negative, cfg = caps[0]["negative"] or [], caps[0]["cfg"]  # one negative and CFG for all captions
        latent = torch.zeros_like(next(iter(caps[0]["states"].values()))[:1])
    else:
        raise GlanceError(f"Unknown objective {objective!r}: choose 'official' or 'trajectory'.")
    bounds = [0]
    for src in sources:
        bounds.append(bounds[-1] + len(src))
    guider.set_conds([entry for src in sources for entry in src], negative)
    guider.set_cfg(cfg)

    def velocity(model_wrap, extra_args, x, sigma):
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        den = model_wrap(x, s, **extra_args)
        return (x - den) / sigma

    def finish(loss: torch.Tensor, step: int) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise GlanceError(
                f"Training the {job.expert} expert diverged at step {step + 1} (loss = {value}). Likely cause: a "
                f"learning rate ({lr}) too high for this model, or fp16 overflow. Lower the learning rate or load the "
                f"model in bf16/fp32. Nothing was saved."
            )
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value)

    def official_step(model_wrap, extra_args, latent: torch.Tensor, step: int) -> None:
        i = int(torch.randint(len(job.sigmas), (1,), generator=gen))
        sigma = job.sigmas[i]
        drawn.append(sigma)
        xt, target = official_pair(latent, sigma, batch, gen)
        v = velocity(model_wrap, extra_args, xt.to(latent.dtype), sigma)
        finish(torch.nn.functional.mse_loss(v.float(), target), step)

    def trajectory_step(model_wrap, extra_args, data: dict, step: int) -> None:
        i = int(torch.randint(len(job.sigmas), (1,), generator=gen))
        s0, s1 = job.sigmas[i], job.next_sigmas[i]
        drawn.append(s0)
        own = data.get("student_pairs", {}).get(s0)
        if own is not None and float(torch.rand((), generator=gen)) < student_mix:
            states, targets = own  # the student's own states, with the teacher's average velocity from there
            idx = random_indices(states.shape[0], batch, gen, states.device)
            x, target = states.index_select(0, idx), targets.index_select(0, idx)
        else:
            x, target = trajectory_pair(data["states"], s0, s1, batch, gen)
        v = velocity(model_wrap, extra_args, x, s0)
        finish(torch.nn.functional.mse_loss(v.float(), target.float()), step)

    def unrolled_step(model_wrap, extra_args, data: dict, step: int) -> None:
        """The expert's whole phase from the teacher's state at its first sigma, Euler step after Euler step with
        gradients through all of them: each state is matched to the teacher's there (the student is trained on
        its own states, and the large steps weigh by their size in the image)."""
        states, phase = data["states"], [*job.sigmas, job.next_sigmas[-1]]
        start = states[phase[0]]
        idx = random_indices(start.shape[0], batch, gen, start.device)
        terms: list[torch.Tensor] = []

        def match(i: int, x: torch.Tensor) -> None:
            if i:
                terms.append(torch.nn.functional.mse_loss(x.float(), states[phase[i]].index_select(0, idx).float()))

        euler_steps(model_wrap, start.index_select(0, idx), phase, extra_args, on_state=match)
        drawn.append(phase[0])
        finish(sum(terms) / len(job.sigmas), step)

    def student_pairs(model_wrap, extra_args, data: dict) -> None:
        """Roll the current student from the teacher's state at the expert's first sigma through the expert's
        steps; from each student state, the teacher's fine rollout to the next sigma gives the target."""
        grid = trajectories["grid"]
        x = data["states"][job.sigmas[0]]
        pairs = {}
        with torch.no_grad():
            for s0, s1 in zip(job.sigmas, job.next_sigmas):
                fine = torch.tensor([g for g in grid if s1 <= g <= s0], dtype=torch.float32, device=x.device)
                lora.enabled = False
                xt = euler_steps(model_wrap, x, fine, extra_args).to(torch.float32)
                lora.enabled = True
                pairs[s0] = (x, (x - xt) / (s0 - s1))
                x = euler_steps(model_wrap, x, fine[[0, -1]], extra_args).to(torch.float32)
        data["student_pairs"] = pairs

    refresh = max(1, steps // 8)

    def loop(model_wrap, extra_args, latent_in: torch.Tensor) -> None:
        """The whole run inside ONE sampling call: the model is loaded, patched and hooked once."""
        for step in range(steps):
            mm.throw_exception_if_processing_interrupted()
            k = step % len(sources)
            model_wrap.conds["positive"] = positives[bounds[k] : bounds[k + 1]]
            with normal_weights(_outside_blocks(model_wrap.inner_model.diffusion_model)):
                if objective == "official":
                    official_step(model_wrap, extra_args, latent_in[k : k + 1], step)
                else:
                    data = caps[k]
                    if student_mix > 0 and not unroll and step >= steps // 2 and step % refresh == 0:
                        student_pairs(model_wrap, extra_args, data)
                    (unrolled_step if unroll else trajectory_step)(model_wrap, extra_args, data, step)
            if step + 1 in snapshots:
                kept[step + 1] = lora.state_dict()
            if on_step:
                on_step(step, losses[-1])

    positives: list = []

    def run(model_wrap, extra_args, latent_in):
        positives[:] = model_wrap.conds["positive"]  # the processed entries, in the order given
        try:
            loop(model_wrap, extra_args, latent_in)
        finally:
            model_wrap.conds["positive"] = list(positives)
        return latent_in

    lora.enabled = True
    try:
        guider.sample(
            torch.zeros_like(latent),
            latent,
            one_step_sampler(run, swap=False),
            torch.tensor([1.0, 0.0]),
            disable_pbar=True,
            seed=seed,
        )
    finally:
        lora.enabled = False
        opt.zero_grad(set_to_none=True)
    return TrainResult(lora.state_dict(), losses, drawn, snapshots=kept)
