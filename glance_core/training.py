"""Training Glance experts: a LoRA on a frozen ComfyUI model, inside ComfyUI's own sampling loop.

Two objectives:

- ``official``: the released recipe. x_σ = (1−σ)·x0 + σ·ε from ONE image latent x0, target ε − x0,
  unweighted MSE on the velocity; each step draws one of the expert's timesteps.
- ``trajectory``: targets that carry the step error. The frozen model is rolled out with fine
  Euler steps (its 50-step schedule with the Glance sigmas added, with the graph's CFG/guidance);
  for a Glance step σ_i → σ_{i+1} the expert at the teacher's state x_T(σ_i) is trained to predict
  the average velocity (x_T(σ_i) − x_T(σ_{i+1})) / (σ_i − σ_{i+1}), so that ONE Euler step lands
  on the teacher. Data-free: it needs captions, not images.

Mechanism (why): the LoRA factors are applied by forward hooks, like the inference experts
(``experts.py``), so there is no module surgery on the shared model and the trained factors are
used exactly as they are later loaded. Every step runs through ``CFGGuider.sample`` with a
one-step Sampler, so conditioning processing, model loading, wrappers and CFG are ComfyUI's own.
ComfyUI's FLUX blocks add residuals in place, which breaks autograd; each transformer block is
therefore run through a checkpoint (``dit`` block-replace patch) that recomputes it in backward
with its inputs cloned and every saved tensor copied, which is both correct and memory-saving.
Saved files use the diffusers/PEFT layout (``transformer.<name>.lora_A/lora_B.weight``) with
alpha/rank folded into lora_B, so ComfyUI and diffusers both load them at strength 1.0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import GlanceError, architectures, lora_layer
from .lora_layer import TrainableLoRA, random_normal

log = logging.getLogger("comfyui-glance")

#: Kept for bench/bench_fidelity.py until it reads the table: (rank, alpha, lr) per family.
OFFICIAL = {a.name: (a.rank, a.alpha, a.learning_rate) for a in architectures.ARCHITECTURES.values()}


def outside_inference_mode(grad: bool | None):
    """Run the function outside ComfyUI's inference mode (node execution runs inside it), with autograd on
    (True), off (False) or as the caller has it (None)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            mode = contextlib.nullcontext() if grad is None else torch.enable_grad() if grad else torch.no_grad()
            with torch.inference_mode(False), mode:
                return fn(*args, **kwargs)

        return inner

    return deco


@contextlib.contextmanager
def training_mode():
    """ComfyUI's own "a trainer is running" switch, set for the duration and restored on exit, error and Stop.

    Releases that have ``comfy.model_management.in_training`` (core's trainer sets it) route attention, RoPE
    and quantized matmuls through autograd-capable code only while it is True; older releases lack the flag
    and need nothing. The previous value is restored, so nesting and a concurrent reader see the truth."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def architecture(model_patcher) -> str:
    """The family name (kept for the ArcFlow distiller node until it reads the table)."""
    return architectures.of(model_patcher, "The trainer").name


# ---------------------------------------------------------------------------------------------
# Correct gradients through ComfyUI's in-place transformer blocks
# ---------------------------------------------------------------------------------------------
def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class _BlockCheckpoint(torch.autograd.Function):
    """Run a transformer block without keeping its activations; recompute it in backward.

    Inputs are cloned before the block runs (it adds residuals into them in place) and, during the
    recompute, every tensor autograd saves is copied, so later in-place writes cannot corrupt it.
    """

    @staticmethod
    def forward(ctx, run, block, names, n_inputs, *tensors):
        inputs = tensors[:n_inputs]
        ctx.run, ctx.block, ctx.names, ctx.n_inputs = run, block, names, n_inputs
        ctx.save_for_backward(*inputs)
        ctx.params = tensors[n_inputs:]
        with torch.no_grad():
            out = run({k: t.clone() for k, t in zip(names, inputs)})
        ctx.out_keys = list(out)
        return tuple(out[k] for k in ctx.out_keys)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with normal_weights(ctx.block.modules() if ctx.block is not None else []):
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_copy, _same):
                out = ctx.run({k: t.clone() for k, t in zip(ctx.names, inputs)})
            pairs = [(out[k], g) for k, g in zip(ctx.out_keys, grads) if g is not None and out[k].requires_grad]
            wrt = [t for t in inputs if t.requires_grad] + [p for p in ctx.params]
            got = (
                torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                if pairs
                else [None] * len(wrt)
            )
        got = list(got)
        input_grads = [got.pop(0) if t.requires_grad else None for t in inputs]
        return (None, None, None, None, *input_grads, *got)


def _frozen(fn: Callable) -> Callable:
    """``fn`` with its closure captured now. ComfyUI's ``block_wrap`` closes over the loop variable
    ``block``; the recompute in backward runs after the loop has moved on to other blocks."""
    if not getattr(fn, "__closure__", None):
        return fn
    cells = []
    for c in fn.__closure__:
        try:
            cells.append(types.CellType(c.cell_contents))
        except ValueError:  # an empty cell
            cells.append(c)
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))


def _checkpoint_patch(params: list[torch.Tensor], block: torch.nn.Module | None = None) -> Callable:
    """A ``dit`` block-replace patch that runs the original block through :class:`_BlockCheckpoint`; ``block``
    is the module whose weights are swapped for normal tensors while it is recomputed with gradients."""

    def patch(args: dict, extra: dict) -> dict:
        names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in args.items() if k not in names}
        original = _frozen(extra["original_block"])
        keys: list[str] = []

        def run(tensors: dict) -> dict:
            out = original({**others, **tensors})
            keys[:] = list(out)
            return out

        outs = _BlockCheckpoint.apply(run, block, names, len(names), *[args[k] for k in names], *params)
        return dict(zip(keys, outs))

    return patch


# ---------------------------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------------------------
@dataclass
class ExpertJob:
    """What to train: one expert's timesteps and targets."""

    expert: str  # "slow" | "fast"
    sigmas: list[float]  # the expert's evaluation sigmas, e.g. [1.0, .987, .973, .959, .943]
    next_sigmas: list[float]  # for each, the next sigma of the Glance schedule (trajectory targets)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    losses: list[float]
    drawn_sigmas: list[float]
    metadata: dict[str, str] = field(default_factory=dict)


class _OneStep:
    """A ComfyUI Sampler whose ``sample`` runs one optimisation step with the guider as the model."""

    def __init__(self, fn: Callable):
        import comfy.samplers

        class _Sampler(comfy.samplers.Sampler):
            def sample(
                self_s,
                model_wrap,
                sigmas,
                extra_args,
                callback,
                noise,
                latent_image=None,
                denoise_mask=None,
                disable_pbar=False,
            ):
                if not torch.is_grad_enabled():
                    return fn(model_wrap, extra_args, latent_image)
                # The blocks swap their own weights while backward recomputes them (block checkpoint).
                with normal_weights(_outside_blocks(model_wrap.inner_model.diffusion_model)):
                    return fn(model_wrap, extra_args, latent_image)

        self.sampler = _Sampler()


def clone_conditioning(cond):
    """A copy of a CONDITIONING whose tensors are normal (not inference-mode) tensors."""
    out = []
    for t, d in cond:
        d2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        out.append([t.clone(), d2])
    return out


_BLOCK_LISTS = ("double_blocks", "single_blocks", "transformer_blocks")


def _outside_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of the diffusion model that are not inside a transformer block (embedders, final layer)."""
    inside = {id(m) for attr in _BLOCK_LISTS for m in getattr(diffusion_model, attr, torch.nn.ModuleList()).modules()}
    return [m for m in diffusion_model.modules() if id(m) not in inside]


@contextlib.contextmanager
def normal_weights(modules):
    """Tensors made under ``torch.inference_mode`` (ComfyUI loads models in it) cannot be saved for backward.
    While the context is open, the parameters and buffers of ``modules`` (each module's own, not its
    children's) that are such tensors are replaced by normal copies with the same values, on the same device;
    the original objects are put back on exit. The swap is short (one step, or one block's recompute), so
    ComfyUI cannot load, move or patch the shared model in between, and every other clone sees it unchanged;
    at most one block's weights are copied at a time."""
    swapped: list[tuple[torch.nn.Module, str, str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for mod in {id(m): m for m in modules}.values():
                for kind in ("_parameters", "_buffers"):
                    for name, t in list(getattr(mod, kind).items()):
                        if t is None or not t.is_inference():
                            continue
                        copy = t.detach().clone()
                        getattr(mod, kind)[name] = (
                            torch.nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy
                        )
                        swapped.append((mod, kind, name, t))
        yield
    finally:
        for mod, kind, name, original in reversed(swapped):
            getattr(mod, kind)[name] = original


def block_patches(model_patcher, params: list[torch.Tensor]) -> None:
    """Install the block checkpoint on every FLUX double/single or Qwen-Image block of a clone."""
    dm = model_patcher.model.diffusion_model
    for attr, kind in (
        ("double_blocks", "double_block"),
        ("single_blocks", "single_block"),
        ("transformer_blocks", "double_block"),
    ):
        for i, block in enumerate(getattr(dm, attr, [])):
            model_patcher.set_model_patch_replace(_checkpoint_patch(params, block), "dit", kind, i)


def _draw(n: int, batch: int, gen: torch.Generator | None, device) -> torch.Tensor:
    """``min(batch, n)`` random indices below ``n`` on ``device`` (where they index); see :func:`random_normal`."""
    if lora_layer._on_generator(gen, device):
        return torch.randint(n, (min(batch, n),), generator=gen, device=device)
    return torch.randint(n, (min(batch, n),), generator=gen, device=gen.device).to(device)


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
    idx = _draw(states[s0].shape[0], batch, gen, states[s0].device)
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
    negative: list | None,
    cfg: float,
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
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train one expert. ``x0`` (VAE latent of the image) for ``official`` — or ``images``, several
    (latent, positive) pairs visited in turn, one per step; ``trajectories``
    (from :func:`teacher_trajectories`) for ``trajectory``; ``student_mix``: in the second half, the share
    of steps trained on the student's own rollout states (refreshed 8 times), with the teacher's fine
    rollout from each as the target. Returns the saved-format state dict."""
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
    dummy_sigmas = torch.tensor([1.0, 0.0])

    if objective == "official":
        images = images or ([(x0, positive)] if x0 is not None else [])
        if not images:
            raise GlanceError("The official objective trains on an image: connect an IMAGE and a VAE.")
        guider.set_cfg(1.0)
    elif objective == "trajectory":
        if not trajectories:
            raise GlanceError("The trajectory objective needs teacher trajectories.")
    else:
        raise GlanceError(f"Unknown objective {objective!r}: choose 'official' or 'trajectory'.")

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

    step = 0

    def official_step(model_wrap, extra_args, latent):
        i = int(torch.randint(len(job.sigmas), (1,), generator=gen))
        sigma = job.sigmas[i]
        drawn.append(sigma)
        xt, target = official_pair(latent, sigma, batch, gen)
        v = velocity(model_wrap, extra_args, xt.to(latent.dtype), sigma)
        finish(torch.nn.functional.mse_loss(v.float(), target), step)
        return latent

    def trajectory_step(model_wrap, extra_args, latent, data):
        i = int(torch.randint(len(job.sigmas), (1,), generator=gen))
        s0, s1 = job.sigmas[i], job.next_sigmas[i]
        drawn.append(s0)
        own = data.get("student_pairs", {}).get(s0)
        if own is not None and float(torch.rand((), generator=gen)) < student_mix:
            states, targets = own  # the student's own states, with the teacher's average velocity from there
            idx = _draw(states.shape[0], batch, gen, states.device)
            x, target = states.index_select(0, idx), targets.index_select(0, idx)
        else:
            x, target = trajectory_pair(data["states"], s0, s1, batch, gen)
        v = velocity(model_wrap, extra_args, x, s0)
        finish(torch.nn.functional.mse_loss(v.float(), target.float()), step)
        return latent

    def student_pairs(data) -> None:
        """Roll the current student from the teacher's state at the expert's first sigma through the expert's
        steps; from each student state, the teacher's fine rollout to the next sigma gives the target."""
        grid = trajectories["grid"]
        x = data["states"][job.sigmas[0]]
        pairs = {}
        for s0, s1 in zip(job.sigmas, job.next_sigmas):
            fine = [g for g in grid if s1 <= g <= s0]
            with torch.no_grad():
                lora.enabled = False
                xt = _euler(guider, x, fine, seed)
                lora.enabled = True
                pairs[s0] = (x, (x - xt) / (s0 - s1))
                x = _euler(guider, x, [s0, s1], seed)
        data["student_pairs"] = pairs

    lora.enabled = True
    refresh = max(1, steps // 8)
    try:
        for step in range(steps):
            mm.throw_exception_if_processing_interrupted()
            if objective == "trajectory" and student_mix > 0 and step >= steps // 2 and step % refresh == 0:
                cap = trajectories["captions"][step % len(trajectories["captions"])]
                guider.set_conds(cap["positive"], cap["negative"] or [])
                guider.set_cfg(cap["cfg"])
                student_pairs(cap)
            if objective == "official":
                fn = official_step
                latent, pos = images[step % len(images)]
                guider.set_conds(pos, [])
                noise = torch.zeros_like(latent)
            else:
                data = trajectories["captions"][step % len(trajectories["captions"])]
                guider.set_conds(data["positive"], data["negative"] or [])
                guider.set_cfg(data["cfg"])
                latent = torch.zeros_like(next(iter(data["states"].values()))[:1])
                noise = latent
                fn = lambda mw, ea, lat, _d=data: trajectory_step(mw, ea, lat, _d)  # noqa: E731
            guider.sample(noise, latent, _OneStep(fn).sampler, dummy_sigmas, disable_pbar=True, seed=seed)
            if on_step:
                on_step(step, losses[-1])
    finally:
        lora.enabled = False
        opt.zero_grad(set_to_none=True)
    return TrainResult(lora.state_dict(), losses, drawn)


def _euler(guider, x: torch.Tensor, sigmas: list[float], seed: int) -> torch.Tensor:
    """Plain Euler over ``sigmas`` from state ``x`` (at sigmas[0]) with ComfyUI's sampler, through ``guider``."""
    import comfy.samplers

    if len(sigmas) < 2:
        return x
    out = {}

    def run(model, x_in, sig, extra_args=None, callback=None, disable=None):
        s_in = x_in.new_ones([x_in.shape[0]])
        for i in range(len(sig) - 1):
            den = model(x_in, sig[i] * s_in, **(extra_args or {}))
            x_in = x_in + (x_in - den) / sig[i] * (sig[i + 1] - sig[i])
        out["x"] = x_in
        return x_in

    # The state is passed as the "noise" at sigma = sigmas[0] with an empty latent: CONST noise scaling then
    # gives sigma·x, so divide first.
    s0 = float(sigmas[0])
    guider.sample(
        x / s0,
        torch.zeros_like(x),
        comfy.samplers.KSAMPLER(run),
        torch.tensor(sigmas, dtype=torch.float32),
        disable_pbar=True,
        seed=seed,
    )
    return out["x"].to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Teacher trajectories (data for the ``trajectory`` objective)
# ---------------------------------------------------------------------------------------------
def fine_grid(percent_to_sigma: Callable[[float], float], base_steps: int, glance_sigmas: list[float]) -> list[float]:
    """The base model's own ``base_steps``-step schedule with the Glance sigmas added, descending, ending in 0."""
    base = [float(percent_to_sigma(i / base_steps)) for i in range(base_steps)]
    grid = sorted(set(base) | {float(s) for s in glance_sigmas} | {0.0}, reverse=True)
    out = [grid[0]]
    for s in grid[1:]:
        if out[-1] - s > 1e-6:
            out.append(s)
        elif s in glance_sigmas:
            out[-1] = s  # keep the exact Glance value when two nearly coincide
    return out


@outside_inference_mode(grad=False)
def teacher_trajectories(
    model_patcher,
    captions: list[tuple[list, list | None]],
    cfg: float,
    noises: int,
    seed: int,
    latent_shape: tuple[int, ...],
    grid: list[float],
    keep: list[float],
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Roll the frozen model out with Euler over ``grid`` (CFG ``cfg``) from ``noises`` seeded noises per
    caption; keep the states at the sigmas in ``keep``. Runs through ComfyUI's own CFGGuider."""
    import comfy.samplers

    # Grid index → Glance sigma (the grid holds the exact Glance values; compare by index, not by float32 value).
    at = {i: s for i, s in enumerate(grid) if any(abs(s - k) < 1e-9 for k in keep)}
    keep_set = set(at.values())
    out = {"captions": [], "grid": list(grid)}
    for c, (pos, neg) in enumerate(captions):
        record: dict[float, torch.Tensor] = {}

        def euler(model, x, sigmas, extra_args=None, callback=None, disable=None, record=record):
            extra_args = extra_args or {}
            s_in = x.new_ones([x.shape[0]])
            for i in range(len(sigmas) - 1):
                if i in at:
                    record[at[i]] = x.detach().clone()
                den = model(x, sigmas[i] * s_in, **extra_args)
                x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
                if on_step:
                    on_step()
            if len(sigmas) - 1 in at:
                record[at[len(sigmas) - 1]] = x.detach().clone()
            return x

        guider = comfy.samplers.CFGGuider(model_patcher)
        guider.set_conds(pos, neg if neg is not None and cfg != 1.0 else [])
        guider.set_cfg(cfg)
        g = torch.Generator().manual_seed(seed + 7919 * c)
        noise = torch.randn((noises, *latent_shape[1:]), generator=g)
        latent = torch.zeros_like(noise)
        sig = torch.tensor(grid, dtype=torch.float32)
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(euler), sig, disable_pbar=True, seed=seed)
        missing = {float(k) for k in keep} - set(record)
        if missing:
            raise GlanceError(f"Internal: the fine grid lacks Glance sigmas {sorted(missing)}.")
        out["captions"].append(
            {
                "positive": pos,
                "negative": neg if cfg != 1.0 else None,
                "cfg": cfg,
                "states": {s: record[s].to(torch.float32) for s in keep_set},
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def image_hash(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


#: Temporary files of a save live in a hidden folder of their own next to the final file (the rename is atomic
#: there): safetensors itself writes through a hidden ``.tmp*`` file in the folder it is given, so that one lands
#: inside too. The file has an extension no loader lists. A killed run's leftovers are removed by the next save
#: planned in that folder.
TMP_PREFIX = ".glance-tmp-"
_TMP_SUFFIX = ".part"
#: This process's start (the pack is imported at server start): older temporary files belong to no live save.
_STARTED = time.time()
#: Longest file name (bytes) on the common file systems (ext4, NTFS, APFS).
NAME_MAX = 255
#: Characters refused in save_name: control characters (NUL…) and those Windows forbids in a file name, so
#: a name valid here is valid on every system the graph travels to.
_BAD_CHARS = set('<>:"|?*\\') | {chr(i) for i in range(32)} | {chr(127)}


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def plan_save(root: str, save_name: str, suffixes: list[str], overwrite: bool) -> dict[str, str]:
    """Every check that decides whether a result can be saved, done before the work: ``save_name`` (a name
    inside ``root``, optionally with sub-folders ``a/b``) → ``{suffix: path}`` for ``<name><suffix>.safetensors``.
    Refuses, naming the problem and the fix: traversal or absolute paths, control and reserved characters,
    names too long for the file system, folders that cannot be created or written, and any existing file of
    the whole set unless ``overwrite``. Also removes a killed run's temporary files in the target folder."""
    name = save_name.strip().removesuffix(".safetensors")
    if not name:
        return {}
    bad = sorted({c for c in name if c in _BAD_CHARS})
    if bad:
        raise GlanceError(
            f"save_name {_shown(save_name)} contains {', '.join(repr(c) for c in bad)}: file names cannot hold "
            f"control characters or any of < > : \" | ? * \\. Use letters, digits, '-', '_', '.' and '/' for "
            f"sub-folders. Nothing was trained."
        )
    norm = os.path.normpath(name)
    parts = name.replace(os.sep, "/").split("/")
    if os.path.isabs(name) or norm.startswith("..") or ".." in parts:
        raise GlanceError(
            f"save_name {_shown(save_name)} must be a name inside models/loras/, without '..' or a leading '/'. "
            f"Nothing was trained."
        )
    ending = f"{max(suffixes, key=len)}.safetensors"
    if any(not part.strip() or part == "." for part in parts):
        raise GlanceError(
            f"save_name {_shown(save_name)} has an empty folder or file name (a '//', a '.' or a trailing '/'): "
            f"give a file name after the last '/'. Nothing was trained."
        )
    for part in parts[:-1] + [parts[-1] + ending]:
        if len(part.encode()) > NAME_MAX:
            raise GlanceError(
                f"save_name is too long: {_shown(part)} is {len(part.encode())} bytes and file systems allow "
                f"{NAME_MAX} per name ('{ending}' included, so the file name may have at most "
                f"{NAME_MAX - len(ending.encode())} bytes before it). Shorten save_name. Nothing was trained."
            )
    root = os.path.abspath(root)
    paths = {sfx: os.path.join(root, f"{norm}{sfx}.safetensors") for sfx in suffixes}
    folder = os.path.dirname(next(iter(paths.values())))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise GlanceError(
            f"Cannot save under {folder}: {existing} is a file, not a folder. Choose another save_name. "
            f"Nothing was trained."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GlanceError(
            f"Cannot save under {folder}: {existing} is not writable by ComfyUI. Fix its permissions or choose "
            f"another save_name. Nothing was trained."
        )
    for p in paths.values():
        if os.path.isdir(p):
            raise GlanceError(f"{p} is a folder; choose another save_name. Nothing was trained.")
    taken = [p for p in paths.values() if os.path.exists(p)]
    if taken and not overwrite:
        raise GlanceError(
            f"{' and '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: choose another save_name or turn "
            f"on overwrite. Nothing was trained."
        )
    clean_stale_temporaries(folder)
    return paths


def clean_stale_temporaries(folder: str) -> list[str]:
    """Remove temporary save files in ``folder`` left by a run that was killed or failed before this process
    started (a live save in this process is never touched). Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if not n.startswith(TMP_PREFIX):
            continue
        p = os.path.join(folder, n)
        try:
            if os.path.getmtime(p) >= _STARTED:
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p)
            log.info("Glance: removed %s, left by an interrupted save", p)
        except OSError:
            pass
    return removed


def _temp_path(path: str) -> str:
    """A fresh temporary file path for ``path``, inside its own hidden folder next to it."""
    folder = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(folder)
    return os.path.join(folder, "file" + _TMP_SUFFIX)


def _remove(tmp: str) -> None:
    """Remove a temporary file made by :func:`_temp_path` and its folder."""
    shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)


def save_files_atomic(files: list[tuple[str, dict[str, torch.Tensor], dict[str, str]]], overwrite: bool) -> list[str]:
    """Write several files all-or-nothing: every file goes to a temporary file in its folder first; only when
    all are written (and none of the targets appeared meanwhile, unless ``overwrite``) are they renamed into
    place. If a rename fails, the files already placed are removed and replaced ones restored, so either
    the whole set is written or none of it is. Returns the written paths."""
    from safetensors.torch import save_file

    paths = [p for p, _, _ in files]

    def check_free() -> None:
        taken = [p for p in paths if os.path.exists(p)]
        if taken and not overwrite:
            raise GlanceError(
                f"{' and '.join(taken)} appeared while training: choose another save_name or turn on overwrite. "
                f"Nothing was written."
            )

    check_free()
    temps: list[str] = []
    current = paths[0]
    try:
        for path, sd, meta in files:
            current = path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temps.append(_temp_path(path))
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
                temps[-1],
                metadata={k: str(v) for k, v in meta.items()},
            )
    except BaseException as e:
        for t in temps:
            _remove(t)
        if isinstance(e, OSError):
            raise GlanceError(
                f"Could not write {current}: {e.strerror or e}. Free disk space or fix the folder's permissions. "
                f"Nothing was written."
            ) from e
        raise
    placed: list[str] = []
    backups: dict[str, str] = {}
    try:
        check_free()
        for path, tmp in zip(paths, temps):
            if os.path.exists(path):
                backups[path] = _temp_path(path)
                os.replace(path, backups[path])
            os.replace(tmp, path)
            placed.append(path)
    except BaseException as e:
        for p in placed:
            with contextlib.suppress(OSError):
                os.remove(p)
        for p, b in backups.items():
            try:
                os.replace(b, p)
                _remove(b)
            except OSError:
                log.error("Glance: could not put %s back; the previous file is kept at %s", p, b)
        for t in temps:
            _remove(t)
        if isinstance(e, OSError):
            raise GlanceError(
                f"Could not write {paths[len(placed)]}: {e.strerror or e}. Nothing was written (the files of this "
                f"save that were already in place were removed, replaced ones restored)."
            ) from e
        raise
    for t in [*temps, *backups.values()]:
        _remove(t)
    return paths


def save_lora_atomic(
    path: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool = False
) -> str:
    """Write one file all-or-nothing (see :func:`save_files_atomic`)."""
    return save_files_atomic([(path, state_dict, metadata)], overwrite)[0]


def metadata_for(
    arch: str,
    expert: str,
    objective: str,
    rank: int,
    alpha: float,
    sigmas: list[float],
    steps: int,
    seed: int,
    lr: float,
    targets: str,
    image_sha256: str | None,
    captions: int,
) -> dict[str, str]:
    return {
        "glance.format": "1",
        "glance.base_arch": arch,
        "glance.expert": expert,
        "glance.objective": objective,
        "glance.rank": str(rank),
        "glance.alpha": str(alpha),
        "glance.scale_convention": "alpha/rank folded into lora_B: load at strength 1.0 (no alpha tensors)",
        "glance.timesteps": json.dumps([round(s, 6) for s in sigmas]),
        "glance.steps": str(steps),
        "glance.seed": str(seed),
        "glance.learning_rate": str(lr),
        "glance.targets": targets,
        "glance.source_image_sha256": image_sha256 or "",
        "glance.captions": str(captions),
    }
