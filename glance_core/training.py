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
import re
import tempfile
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import GlanceError

log = logging.getLogger("comfyui-glance")

# Target layers (diffusers names, as the official recipe names them: reference glance.md §3.2).
TARGETS: dict[str, dict[str, str]] = {
    "flux": {
        "official": r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
        r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))",
        "attention": r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
        r"|to_add_out)|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))",
        "all_linear": r"(single_)?transformer_blocks\..*",
        # ArcFlow's LoRA targets (reference arcflow.md §4.3).
        "arcflow": r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
        r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)|time_text_embed\.timestep_embedder\.linear_[12]",
    },
    "qwen_image": {
        "official": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0"
        r"|to_add_out)|img_mlp\.net\.2|txt_mlp\.net\.2|img_mod\.1|txt_mod\.1)",
        "attention": r"transformer_blocks\.\d+\.attn\..*",
        "all_linear": r"transformer_blocks\..*",
        "arcflow": r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"
        r"|time_text_embed\.timestep_embedder\.linear_[12]",
    },
}
#: Official hyper-parameters per architecture: rank, alpha, learning rate (glance.md §3.2).
OFFICIAL = {"flux": (16, 64.0, 5e-4), "qwen_image": (32, 128.0, 3e-4)}


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


def architecture(model_patcher) -> str:
    import comfy.model_base

    m = model_patcher.model
    if isinstance(m, comfy.model_base.QwenImage):
        return "qwen_image"
    if isinstance(m, comfy.model_base.Flux):
        return "flux"
    raise GlanceError(f"The trainer supports FLUX and Qwen-Image models; the connected model is {type(m).__name__}.")


# ---------------------------------------------------------------------------------------------
# Trainable LoRA applied by forward hooks
# ---------------------------------------------------------------------------------------------
@dataclass
class _Target:
    name: str  # diffusers name, e.g. transformer_blocks.0.attn.to_q
    module: str  # ComfyUI module, e.g. diffusion_model.double_blocks.0.img_attn.qkv
    row: int
    rows: int
    A: torch.Tensor
    B: torch.Tensor


class TrainableLoRA:
    """LoRA factors on the model's Linear layers, trained in fp32 and applied by forward hooks.

    Initialisation as PEFT's ``gaussian``: A ~ N(0, 1/rank), B = 0 (the model starts unchanged).
    """

    def __init__(self, model_patcher, targets: str, rank: int, alpha: float, generator: torch.Generator):
        import comfy.lora

        arch = architecture(model_patcher)
        pattern = TARGETS[arch].get(targets)
        if pattern is None:
            raise GlanceError(f"Unknown target layers {targets!r}; choose one of {sorted(TARGETS[arch])}.")
        key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
        model = model_patcher.model
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.targets: list[_Target] = []
        for key in sorted(key_map):
            if not key.startswith("transformer.") or not re.fullmatch(pattern, key[len("transformer.") :]):
                continue
            target = key_map[key]
            weight_key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
            module_name = weight_key.rpartition(".")[0]
            module = model.get_submodule(module_name)
            if not isinstance(module, torch.nn.Linear):
                continue
            row, rows = (offset[1], offset[2]) if offset else (0, module.out_features)
            a = torch.randn(rank, module.in_features, generator=generator) / rank
            b = torch.zeros(rows, rank)
            self.targets.append(
                _Target(
                    key[len("transformer.") :], module_name, row, rows, a.requires_grad_(True), b.requires_grad_(True)
                )
            )
        if not self.targets:
            raise GlanceError(f"No layer of this model matches the {targets!r} target preset.")
        self.by_module: dict[str, list[_Target]] = {}
        for t in self.targets:
            self.by_module.setdefault(t.module, []).append(t)
        self.enabled = False
        self._handles: list = []

    def parameters(self) -> list[torch.Tensor]:
        return [p for t in self.targets for p in (t.A, t.B)]

    def inject(self, patcher) -> None:
        self.eject()
        for name in self.by_module:
            self._handles.append(patcher.model.get_submodule(name).register_forward_hook(self._hook(name)))

    def eject(self, patcher=None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        targets = self.by_module[name]

        def hook(module, args, out):
            if not self.enabled:
                return None
            x = args[0]
            pieces = []
            for t in targets:
                delta = torch.nn.functional.linear(
                    torch.nn.functional.linear(x, t.A.to(x.dtype)), (t.B * self.scale).to(x.dtype)
                )
                pieces.append((t.row, delta))
            if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][1].shape[-1] == out.shape[-1]:
                return out + pieces[0][1]
            full = torch.zeros_like(out)
            for row, delta in pieces:
                full = full.index_add(-1, torch.arange(row, row + delta.shape[-1], device=out.device), delta)
            return out + full

        return hook

    def state_dict(self) -> dict[str, torch.Tensor]:
        """diffusers/PEFT layout with alpha/rank folded into lora_B (strength 1.0 = as trained)."""
        sd = {}
        for t in self.targets:
            sd[f"transformer.{t.name}.lora_A.weight"] = t.A.detach().to(torch.float32).clone().contiguous()
            sd[f"transformer.{t.name}.lora_B.weight"] = (t.B.detach() * self.scale).to(torch.float32).contiguous()
        return sd


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
    def forward(ctx, run, names, n_inputs, *tensors):
        inputs = tensors[:n_inputs]
        ctx.run, ctx.names, ctx.n_inputs = run, names, n_inputs
        ctx.save_for_backward(*inputs)
        ctx.params = tensors[n_inputs:]
        with torch.no_grad():
            out = run({k: t.clone() for k, t in zip(names, inputs)})
        ctx.out_keys = list(out)
        return tuple(out[k] for k in ctx.out_keys)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
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
        return (None, None, None, *input_grads, *got)


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


def _checkpoint_patch(params: list[torch.Tensor]) -> Callable:
    """A ``dit`` block-replace patch that runs the original block through :class:`_BlockCheckpoint`."""

    def patch(args: dict, extra: dict) -> dict:
        names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in args.items() if k not in names}
        original = _frozen(extra["original_block"])
        keys: list[str] = []

        def run(tensors: dict) -> dict:
            out = original({**others, **tensors})
            keys[:] = list(out)
            return out

        outs = _BlockCheckpoint.apply(run, names, len(names), *[args[k] for k in names], *params)
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
                return fn(model_wrap, extra_args, latent_image)

        self.sampler = _Sampler()


def clone_conditioning(cond):
    """A copy of a CONDITIONING whose tensors are normal (not inference-mode) tensors."""
    out = []
    for t, d in cond:
        d2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
        out.append([t.clone(), d2])
    return out


def _normal_weights(model: torch.nn.Module) -> None:
    """Tensors made under ``torch.inference_mode`` (ComfyUI loads models in it) cannot be saved for
    backward. Replace such parameters and buffers by normal tensors with the same values (a new
    Parameter object: swapping ``.data`` is not enough). The model stays bit-identical."""
    with torch.no_grad():
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()


def block_patches(model_patcher, params: list[torch.Tensor]) -> None:
    """Install the block checkpoint on every FLUX double/single or Qwen-Image block of a clone."""
    dm = model_patcher.model.diffusion_model
    patch = _checkpoint_patch(params)
    for attr, kind in (
        ("double_blocks", "double_block"),
        ("single_blocks", "single_block"),
        ("transformer_blocks", "double_block"),
    ):
        for i in range(len(getattr(dm, attr, []))):
            model_patcher.set_model_patch_replace(patch, "dit", kind, i)


@outside_inference_mode(grad=True)
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
        x = latent.repeat(batch, *([1] * (latent.ndim - 1))).to(torch.float32)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        xt = (1.0 - sigma) * x + sigma * eps
        v = velocity(model_wrap, extra_args, xt.to(latent.dtype), sigma)
        finish(torch.nn.functional.mse_loss(v.float(), (eps - x).float()), step)
        return latent

    def trajectory_step(model_wrap, extra_args, latent, data):
        i = int(torch.randint(len(job.sigmas), (1,), generator=gen))
        s0, s1 = job.sigmas[i], job.next_sigmas[i]
        drawn.append(s0)
        own = data.get("student_pairs", {}).get(s0)
        if own is not None and float(torch.rand((), generator=gen)) < student_mix:
            states, targets = own  # the student's own states, with the teacher's average velocity from there
            idx = torch.randint(states.shape[0], (min(batch, states.shape[0]),), generator=gen)
            x, target = states[idx], targets[idx]
        else:
            states = data["states"]
            n = states[s0].shape[0]
            idx = torch.randint(n, (min(batch, n),), generator=gen)
            x = states[s0][idx]
            target = (states[s0][idx] - states[s1][idx]) / (s0 - s1)
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

    _normal_weights(model_patcher.model)
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


def save_lora_atomic(
    path: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool = False
) -> str:
    """Write ``state_dict`` to ``path`` via a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise GlanceError(f"{path} already exists; choose another save_name or enable overwrite. Nothing was written.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
